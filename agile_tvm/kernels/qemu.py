"""Run cross-compiled kernels on the emulated aarch64 board (qemu user mode), for correctness and ISA checks.

One qemu process runs a batch of kernels: each job is (shared library, function name, argument arrays, indices of
the output arguments). The aarch64 Python + TVM runtime userland comes from ``scripts/setup-boards``. Timings under
emulation mean nothing; what this proves is that the code is right on aarch64 and (with ``-cpu cortex-a72``) that
it uses no instruction the Pi 4 lacks: SDOT raises SIGILL there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from agile_tvm.errors import UserError

#: qemu CPU models standing in for the named targets (qemu 7.2 has no cortex-a77; the A76 has the same ISA level).
QEMU_CPU = {"pi4": "cortex-a72", "sd870": "cortex-a76"}

_RUNNER = r"""
import json, sys
import numpy as np
import tvm
jobs = json.load(open(sys.argv[1]))
dev = tvm.cpu()
for job in jobs:
    lib = tvm.runtime.load_module(job["lib"])
    data = np.load(job["inputs"])
    args = [tvm.runtime.tensor(data[f"a{i}"], dev) for i in range(job["nargs"])]
    lib[job["func"]](*args)
    np.savez(job["outputs"], **{f"o{i}": args[i].numpy() for i in job["out_idx"]})
    print("done", job["func"], flush=True)
"""


def userland() -> tuple[Path, Path] | None:
    """(sysroot, site-packages) of the emulated board, or None if scripts/setup-boards has not run."""
    root = Path(os.environ.get("AGILE_TVM_BOARDS", Path.home() / ".cache" / "agile-tvm" / "boards")) / "aarch64"
    if not (root / ".ready").exists():
        return None
    return root / "sysroot", root / "site-packages"


def available() -> bool:
    return userland() is not None and shutil.which("qemu-aarch64-static") is not None


def run(target_name: str, jobs: list[tuple[str, str, list[np.ndarray], list[int]]], timeout: float = 300.0):
    """Run jobs on the emulated board of ``target_name``; returns a list of {arg index: output array} per job.

    Raises ``RuntimeError`` carrying the exit status when the process dies (e.g. -4 = SIGILL).
    """
    ul = userland()
    qemu = shutil.which("qemu-aarch64-static")
    if ul is None or qemu is None:
        raise UserError("the emulated aarch64 board is missing: run scripts/setup-boards")
    sysroot, site = ul
    with tempfile.TemporaryDirectory(prefix="agile-qemu-") as tmp:
        manifest = []
        for n, (lib, func, args, out_idx) in enumerate(jobs):
            inp = os.path.join(tmp, f"in{n}.npz")
            np.savez(inp, **{f"a{i}": np.array(a, order="C") for i, a in enumerate(args)})
            manifest.append(dict(lib=os.path.abspath(lib), func=func, inputs=inp, nargs=len(args),
                                 out_idx=list(out_idx), outputs=os.path.join(tmp, f"out{n}.npz")))
        with open(os.path.join(tmp, "jobs.json"), "w") as f:
            json.dump(manifest, f)
        with open(os.path.join(tmp, "runner.py"), "w") as f:
            f.write(_RUNNER)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "QEMU_"))}
        env.update(PYTHONPATH=str(site), TVM_USE_RUNTIME_LIB="1", PYTHONDONTWRITEBYTECODE="1", TVM_NUM_THREADS="1")
        argv = [qemu, "-cpu", QEMU_CPU[target_name], "-L", str(sysroot), str(sysroot / "usr/bin/python3.11"),
                os.path.join(tmp, "runner.py"), os.path.join(tmp, "jobs.json")]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"qemu {QEMU_CPU[target_name]} exited with {proc.returncode}: {proc.stderr[-2000:]}")
        results = []
        for job in manifest:
            with np.load(job["outputs"]) as d:
                results.append({int(k[1:]): d[k] for k in d.files})
        return results
