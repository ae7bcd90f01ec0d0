"""Compile and export kernels: one place that knows how to link for each target."""

from __future__ import annotations

import os


def build(func, target):
    """Compile a PrimFunc (or IRModule) for ``target``; returns the runtime Module (call by global symbol)."""
    import tvm

    from agile_tvm.targets import get_target

    return tvm.compile(func, target=get_target(target)).mod


def export(func, target, path: str) -> str:
    """Compile and write a shared library for ``target`` (cross-linked for aarch64), atomically."""
    import tvm
    from tvm.support import cc

    from agile_tvm.targets import CROSS_COMPILERS, TARGETS, get_target

    ex = tvm.compile(func, target=get_target(target))
    name = target if isinstance(target, str) else None
    fcompile = None
    if name in CROSS_COMPILERS or (name in TARGETS and "aarch64" in TARGETS[name]["mtriple"]):
        fcompile = cc.cross_compiler(CROSS_COMPILERS.get(name, "aarch64-linux-gnu-g++"))
    tmp = f"{path}.tmp{os.getpid()}.so"
    ex.export_library(tmp, fcompile=fcompile)
    os.replace(tmp, path)
    return path
