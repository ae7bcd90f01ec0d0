"""The RPC tracker (run in the foreground) and the client-side questions the tuner asks it.

Boards register under a key; `tune` asks the tracker for a board under that key for every measurement, so several
boards under one key measure in parallel.
"""

from __future__ import annotations

import json
import socket
import time

from agile_tvm.errors import UserError
from agile_tvm.rpc.netutil import check_reachable


def run_tracker(host: str, port: int) -> int:
    """Serve the TVM tracker in this process until killed (no Popen worker, so no orphan on exit)."""
    import asyncio

    from tvm.rpc import base
    from tvm.rpc.tracker import TrackerServerHandler

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot bind the tracker to {host}:{port} ({exc.strerror}): pick another --port") from None
    sock.listen(64)
    print(f"agile-tvm tracker listening on {host}:{port}", flush=True)
    asyncio.set_event_loop(asyncio.new_event_loop())
    TrackerServerHandler(sock, base.random_key("tracker")).run()
    return 0


def tracker_fix(host: str, port: int) -> str:
    return f"start one with `agile-tvm tracker --port {port}` or pass the right --tracker HOST:PORT"


def connect(host: str, port: int):
    """A TrackerSession, or a UserError saying the tracker is unreachable."""
    from tvm import rpc

    check_reachable(host, port, "RPC tracker", tracker_fix(host, port))
    try:
        return rpc.connect_tracker(host, port)
    except Exception as exc:  # noqa: BLE001 - a non-tracker on that port
        raise UserError(f"{host}:{port} did not answer as a TVM RPC tracker ({exc}): {tracker_fix(host, port)}") \
            from None


def boards_under_key(host: str, port: int, key: str) -> list[dict]:
    """The server entries the tracker lists for `key` (registered boards, busy or free)."""
    summary = connect(host, port).summary()
    return [s for s in summary.get("server_info", []) if s.get("key", "") == "server:" + key]


def all_keys(host: str, port: int) -> list[str]:
    summary = connect(host, port).summary()
    return sorted({s["key"].split(":", 1)[1] for s in summary.get("server_info", []) if ":" in s.get("key", "")})


def wait_for_boards(host: str, port: int, key: str, count: int = 1, timeout: float = 0.0) -> list[dict]:
    """Wait up to `timeout` s until `count` boards are registered under `key`; UserError naming the keys seen."""
    deadline = time.time() + timeout
    while True:
        boards = boards_under_key(host, port, key)
        if len(boards) >= count:
            return boards
        if time.time() >= deadline:
            seen = all_keys(host, port)
            raise UserError(
                f"no board under key {key!r} on tracker {host}:{port} (keys registered: "
                f"{', '.join(seen) if seen else 'none'}): start one with `agile-tvm board --key {key} "
                f"--tracker {host}:{port}` (add --emulate pi4|sd870 for an emulated board)")
        time.sleep(0.5)


def board_info(host: str, port: int, key: str, timeout: float = 60.0) -> dict:
    """Ask one board under `key` what it is (machine, ISA features) over a short RPC session."""
    from tvm import rpc

    try:
        tracker = rpc.connect_tracker(host, port)
        sess = tracker.request(key, priority=2, session_timeout=timeout, max_retry=3)
        info = sess.get_function("agile_tvm.board.info")()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"could not query a board under key {key!r} ({str(exc).splitlines()[0][:160]}): is it an "
                        f"`agile-tvm board`? upstream rpc_server boards cannot report their ISA") from None
    return json.loads(str(info))
