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


#: Runs per measurement of a cold-cache (`cold`) candidate: each is one call after flushing its arguments.
COLD_REPEAT = 25


def make_runner(host: str, port: int, key: str, n_boards: int, *, session_timeout: float, number: int,
                repeat: int, min_repeat_ms: int, board_wait: float, cold: bool = False):
    """`cold`: flush every argument but the first (the activations) from the caches before each timed call, so
    the weights come from memory as they do in the model (x86 boards: TVM's flush uses clflush). Decode GEMVs
    must be measured so: with the weights cache-resident, the tuner preferred more tiles in flight and K chunks,
    3-9% faster warm, but 20-55% slower cold and 9% slower decode in the model; the hand schedule's single
    sequential weight stream per thread is what the prefetcher follows."""
    from tvm.s_tir import meta_schedule as ms

    os.environ[BOARD_WAIT_ENV] = str(board_wait)  # read by create_session in the runner workers
    evaluator = (ms.runner.EvaluatorConfig(number=1, repeat=COLD_REPEAT, min_repeat_ms=0, enable_cpu_cache_flush=True)
                 if cold else ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                                        enable_cpu_cache_flush=False))
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                       session_timeout_sec=int(session_timeout), session_priority=1),
        evaluator_config=evaluator,
        f_create_session=create_session,
        f_cleanup=cleanup,
        max_workers=max(1, n_boards),
    )


def measure_cold(workload, target) -> bool:
    """Decode GEMVs (M = 1) on x86 are measured with their weights flushed from the caches (`make_runner`):
    in the model they stream from memory."""
    return workload.info is not None and workload.info["m"] == 1 and "x86" in str(target.attrs.get("mtriple", ""))


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
