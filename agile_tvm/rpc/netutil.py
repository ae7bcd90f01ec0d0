"""Small network helpers shared by the tracker, boards and tuner."""

from __future__ import annotations

import socket
import sys

from agile_tvm.errors import UserError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_hostport(text: str, what: str = "tracker") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), or a UserError that shows the expected form."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"bad {what} address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (tests use these instead of fixed ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def warn_if_exposed(host: str, what: str) -> None:
    """RPC servers execute whatever code they are sent: say so loudly when reachable beyond this machine."""
    if host not in LOCAL_HOSTS:
        bar = "!" * 78
        print(f"{bar}\nWARNING: the {what} is bound to {host}, not 127.0.0.1. A TVM RPC server runs ANY code it is\n"
              f"sent, with your user's rights: anyone who can reach {host} can run programs on this machine.\n"
              f"Use it only on a trusted, isolated network.\n{bar}", file=sys.stderr, flush=True)


def check_reachable(host: str, port: int, what: str, fix: str, timeout: float = 5.0) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"{what} unreachable at {host}:{port} ({exc.strerror or exc}): {fix}") from None
