"""Host-side board supervisor: keeps one board RPC server process alive and registered with the tracker.

The board worker already survives crashing sessions (it forks one child per session), but the worker itself can
die too (killed, OOM, a crash outside a session). The supervisor restarts it on the same port with a short
backoff, so a board under a key stays available for the whole tuning run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from agile_tvm.errors import UserError
from agile_tvm.rpc.profiles import PROFILES, aarch64_userland

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder that holds agile_tvm/


def board_command(key: str, profile: str, host: str, port: int, tracker: str | None) -> tuple[list[str], dict]:
    """argv and environment of one board worker process (native Python, or aarch64 Python under qemu)."""
    if profile not in PROFILES:
        raise UserError(f"unknown board profile {profile!r}: use one of {', '.join(PROFILES)}")
    worker_args = ["-m", "agile_tvm.rpc.board_worker", "--host", host, "--port", str(port), "--key", key,
                   "--profile", profile]
    if tracker:
        worker_args += ["--tracker", tracker]
    env = dict(os.environ)
    prof = PROFILES[profile]
    if prof.qemu_cpu is None:
        # measure as the model runs: on every core (TVM's own default here is 1 thread, and a schedule tuned on
        # one thread picked tile counts 10-20% slower on two); TVM_NUM_THREADS set by the user wins
        env.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT)] + [p for p in [env.get("PYTHONPATH")] if p])
        return [sys.executable, "-u", *worker_args], env
    userland = aarch64_userland()
    if userland is None:
        raise UserError(f"the emulated {profile} board needs the aarch64 userland: run scripts/setup-boards first")
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if qemu is None:
        raise UserError("qemu-aarch64-static not found: run scripts/setup-boards (installs qemu-user-static)")
    sysroot, site = userland
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "QEMU_"))}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{PACKAGE_PARENT}", TVM_USE_RUNTIME_LIB="1",
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", TVM_NUM_THREADS="1")
    argv = [qemu, "-cpu", prof.qemu_cpu, "-L", str(sysroot), str(sysroot / "usr/bin/python3.11"), "-u",
            *worker_args]
    return argv, env


class Supervisor:
    """Run a board worker and restart it whenever it exits, until stopped."""

    def __init__(self, key: str, profile: str, host: str, port: int, tracker: str | None, log=None):
        self.argv, self.env = board_command(key, profile, host, port, tracker)
        self.key, self.profile, self.port = key, profile, port
        self.log = log or (lambda msg: print(f"{time.strftime('%H:%M:%S')} [supervisor {key}/{profile}] {msg}",
                                             file=sys.stderr, flush=True))
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.restarts = 0

    def start_worker(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=str(PACKAGE_PARENT))
        self.log(f"board worker pid {self.proc.pid} on port {self.port}")

    def stop(self, *_):
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def run(self) -> int:
        """Block: keep the worker alive; SIGTERM/SIGINT stop the worker and return 0."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        backoff = 0.5
        while not self.stopping:
            started = time.time()
            self.start_worker()
            code = self.proc.wait()
            if self.stopping:
                break
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            self.restarts += 1
            backoff = 0.5 if time.time() - started > 30 else min(backoff * 2, 10.0)
            self.log(f"board worker died ({how}); restart #{self.restarts} in {backoff:.1f} s")
            time.sleep(backoff)
        return 0
