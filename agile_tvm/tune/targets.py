"""Tuning targets: the named targets of agile_tvm.targets plus what MetaSchedule insists on (`num-cores`)."""

from __future__ import annotations

import os

from agile_tvm.errors import UserError

# Cores of the real boards (MetaSchedule sizes parallel loops by this). x86 targets run on this machine.
BOARD_CORES = {"pi4": 4, "sd870": 8}


def target_dict(name: str, num_cores: int | None = None) -> dict:
    from agile_tvm.targets import TARGETS

    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}: choose one of {', '.join(TARGETS)}")
    cores = num_cores or BOARD_CORES.get(name) or os.cpu_count() or 1
    return dict(TARGETS[name], **{"num-cores": int(cores)})


def tuning_target(name: str, num_cores: int | None = None):
    import tvm

    return tvm.target.Target(target_dict(name, num_cores))


def target_name_of(target) -> str | None:
    """The name in agile_tvm.targets.TARGETS of a tvm Target (same mtriple and mcpu), or None (e.g. "host")."""
    from agile_tvm.targets import TARGETS

    for name, d in TARGETS.items():
        if str(target.attrs.get("mcpu", "")) == d.get("mcpu") and str(target.attrs.get("mtriple", "")) == d.get(
                "mtriple"):
            return name
    return None
