"""The MetaSchedule RPC runner: measure candidates on boards found through the tracker.

Differences from the stock RPCRunner setup: a session is only requested once a board is registered under the key
(waiting a bounded time, so a dead board turns into a clear error instead of a hang), cleanup never masks the
real error of a crashed session, and one runner worker per board measures in parallel.
"""

from __future__ import annotations

import os
import time

BOARD_WAIT_ENV = "AGILE_TVM_BOARD_WAIT"


def create_session(rpc_config):
    """Wait (bounded) until a board is registered under the key, then open a session with it."""
    from tvm import rpc

    wait = float(os.environ.get(BOARD_WAIT_ENV, "120"))
    deadline = time.time() + wait
    key = rpc_config.tracker_key
    while True:
        try:
            tracker = rpc.connect_tracker(rpc_config.tracker_host, rpc_config.tracker_port)
            servers = [s for s in tracker.summary()["server_info"] if s.get("key") == "server:" + key]
        except Exception:  # noqa: BLE001 - tracker restarting: keep waiting
            servers = []
        if servers:
            return tracker.request(key, priority=rpc_config.session_priority,
                                   session_timeout=rpc_config.session_timeout_sec, max_retry=3)
        if time.time() > deadline:
            raise RuntimeError(f"AGILE_NO_BOARD: no board under key {key!r} on tracker "
                               f"{rpc_config.tracker_host}:{rpc_config.tracker_port} for {wait:.0f} s")
        time.sleep(1.0)


def cleanup(session, remote_path) -> None:
    """Remove the uploaded candidate; a session that died with its kernel has nothing left to clean."""
    if session is None or remote_path is None:
        return
    try:
        session.remove(remote_path)
        session.remove("")
    except Exception:  # noqa: BLE001 - keep the measurement's own error
        pass


def make_runner(host: str, port: int, key: str, n_boards: int, *, session_timeout: float, number: int,
                repeat: int, min_repeat_ms: int, board_wait: float):
    from tvm.s_tir import meta_schedule as ms

    os.environ[BOARD_WAIT_ENV] = str(board_wait)  # read by create_session in the runner workers
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                       session_timeout_sec=int(session_timeout), session_priority=1),
        evaluator_config=ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                                   enable_cpu_cache_flush=False),
        f_create_session=create_session,
        f_cleanup=cleanup,
        max_workers=max(1, n_boards),
    )


def classify_error(msg: str) -> str:
    """'build', 'no-board', 'board-lost' (session died: crash, killed board, dropped link), 'timeout' or 'run'."""
    if not msg:
        return "ok"
    if "AGILE_NO_BOARD" in msg:
        return "no-board"
    if "Timeout" in msg or "timeout" in msg:
        return "timeout"
    lowered = msg.lower()
    for needle in ("connection", "socket", "broken pipe", "closed", "rpc session", "reset by peer", "eof"):
        if needle in lowered:
            return "board-lost"
    return "run"
