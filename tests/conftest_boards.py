"""A throwaway RPC cluster for the rpc/tune tests: a tracker, one native x86 board and, when
`scripts/setup-boards` has run, emulated `pi4` and `sd870` boards, all on 127.0.0.1 with ports picked free at
runtime. Every process gets its own session and is killed by process group at teardown.

Import the fixtures into a test module with `from conftest_boards import rpc_cluster  # noqa: F401`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agile_tvm.rpc.netutil import free_port  # noqa: E402
from agile_tvm.rpc.profiles import aarch64_userland  # noqa: E402

SETUP_HINT = "emulated boards not set up: run scripts/setup-boards first"


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "agile_tvm.cli", *args]


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port = free_port()
        self.tracker = f"127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.emulated = aarch64_userland() is not None

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_tracker(self):
        self.spawn("tracker", cli("tracker", "--port", str(self.port)))

    def start_board(self, key: str, emulate: str | None = None):
        argv = cli("board", "--key", key, "--tracker", self.tracker)
        if emulate:
            argv += ["--emulate", emulate]
        return self.spawn(f"board-{key}", argv)

    def summary(self) -> dict:
        from tvm import rpc

        return rpc.connect_tracker("127.0.0.1", self.port).summary()

    def boards(self, key: str) -> int:
        try:
            return sum(1 for s in self.summary()["server_info"] if s.get("key") == "server:" + key)
        except Exception:  # noqa: BLE001 - tracker still starting
            return 0

    def wait_boards(self, keys, timeout: float = 120.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(self.boards(k) for k in keys):
                return
            time.sleep(0.5)
        logs = {p.name: p.read_text()[-800:] for p in self.tmp.glob("*.log")}
        raise AssertionError(f"boards {keys} did not register in {timeout} s: {logs}")

    def worker_pid(self, key: str) -> int:
        """pid of the board worker (the supervisor's child) for a board started here."""
        import psutil

        children = psutil.Process(self.procs[f"board-{key}"].pid).children()
        assert children, f"board {key} has no worker process"
        return children[0].pid

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def stop(self, name: str):
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self):
        for name in list(self.procs):
            if name != "tracker":
                self.stop(name)
        self.stop("tracker")


_CLUSTER: Cluster | None = None


@pytest.fixture(scope="session")
def rpc_cluster(request, tmp_path_factory):
    """One cluster per pytest run, even when several test modules import this fixture (each import makes its own
    session fixture, so the cluster itself is cached here and torn down when the run ends)."""
    global _CLUSTER
    if _CLUSTER is None:
        cluster = Cluster(tmp_path_factory.mktemp("rpc"))
        request.config.add_cleanup(cluster.stop_all)
        cluster.start_tracker()
        cluster.start_board("x86")
        keys = ["x86"]
        if cluster.emulated:
            cluster.start_board("pi4", "pi4")
            cluster.start_board("sd870", "sd870")
            keys += ["pi4", "sd870"]
        cluster.wait_boards(keys)
        _CLUSTER = cluster
    return _CLUSTER


def need_emulated(cluster: Cluster):
    if not cluster.emulated:
        pytest.skip(SETUP_HINT)
