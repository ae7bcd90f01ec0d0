"""Board profiles: how to start each kind of board, and which ISA features a tuning target needs from it.

Emulated boards are qemu user mode CPU models: the Raspberry Pi 4 is a Cortex-A72 (armv8.0, NEON, no dotprod:
SDOT raises SIGILL), and the Snapdragon 870 (Cortex-A77 big cores) is emulated as a Cortex-A76, qemu 7.2's closest
model with the same ISA (armv8.2 + dotprod). Emulated timings say nothing about the real boards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BoardProfile:
    name: str
    machine: str             # platform.machine() on the board
    qemu_cpu: str | None     # None: runs natively on the host


PROFILES = {
    "native": BoardProfile("native", "x86_64", None),
    "pi4": BoardProfile("pi4", "aarch64", "cortex-a72"),
    "sd870": BoardProfile("sd870", "aarch64", "cortex-a76"),
}
EMULATED = ("pi4", "sd870")

# What a target's code needs from the board it runs on: machine and ISA feature names as the board reports them
# (x86: /proc/cpuinfo flags; aarch64: AT_HWCAP names).
TARGET_NEEDS = {
    "x86-avx512": ("x86_64", ("avx512f", "avx512bw")),
    "x86-avx2": ("x86_64", ("avx2", "fma")),
    "x86-vnni": ("x86_64", ("avx512f", "avx512bw", "avx512_vnni")),
    "pi4": ("aarch64", ("asimd",)),
    "sd870": ("aarch64", ("asimd", "asimddp")),
}


def boards_root() -> Path:
    """Where `scripts/setup-boards` put the emulated userland (`AGILE_TVM_BOARDS` overrides)."""
    return Path(os.environ.get("AGILE_TVM_BOARDS", Path.home() / ".cache" / "agile-tvm" / "boards"))


def aarch64_userland() -> tuple[Path, Path] | None:
    """(sysroot, site-packages) of the emulated aarch64 board, or None when setup-boards has not run."""
    root = boards_root() / "aarch64"
    if not (root / ".ready").exists():
        return None
    return root / "sysroot", root / "site-packages"


def missing_features(target_name: str, machine: str, features: list[str]) -> list[str]:
    """What the board lacks to run `target_name` code: ["machine aarch64"] or the missing ISA feature names."""
    need = TARGET_NEEDS.get(target_name)
    if need is None:
        return []
    want_machine, want_features = need
    if machine != want_machine:
        return [f"machine {want_machine} (board is {machine})"]
    have = set(features)
    return [f for f in want_features if f not in have]


def host_x86_target() -> str | None:
    """The x86 tuning target this machine can run: x86-avx512 with AVX-512BW, else x86-avx2 (None if neither)."""
    import platform

    from agile_tvm.rpc.board_worker import cpu_features

    if platform.machine() != "x86_64":
        return None
    feats = cpu_features()
    for name in ("x86-avx512", "x86-avx2"):
        if not missing_features(name, "x86_64", feats):
            return name
    return None
