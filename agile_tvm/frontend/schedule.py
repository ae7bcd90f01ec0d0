"""A generic CPU hand schedule for TIR functions nobody else scheduled (the frontend's loops, legalized float ops).

The default TVM pipeline leaves such functions as single-threaded scalar loops. This schedule, applied per
top-level block, fuses the leading spatial loops (up to two: rows x columns, or heads x queries) and runs them
in parallel, unless the block has only a few static iterations (`SERIAL_BELOW`); LLVM then vectorizes the simple
inner loops. Functions marked `tir.is_scheduled` (the kernels of
`agile_tvm.kernels`, records applied from `schedules/<target>/`) are left alone.
"""

from __future__ import annotations


def _leading_spatial(sch, block) -> int:
    iters = sch.get(block).iter_vars
    count = 0
    for iv in iters:
        if int(iv.iter_type) != 0:  # 0 = data parallel
            break
        count += 1
    return count


#: A block with fewer static iterations than this stays serial: below it a thread-pool round trip costs more than
#: the work (the decode function's one-row ops, e.g. a [1, 576] reshape copy in every layer).
SERIAL_BELOW = 16384


def _static_iterations(sch, loops) -> int | None:
    """The number of iterations of the loop nest, or None when an extent is symbolic."""
    total = 1
    for loop in loops:
        extent = sch.get(loop).extent
        if not hasattr(extent, "value"):
            return None
        total *= int(extent.value)
    return total


def hand_schedule(func):
    """Parallelize the outer spatial loops of every top-level block of `func` (blocks of a few static iterations
    stay serial, `SERIAL_BELOW`); returns the new PrimFunc."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root):
        loops = sch.get_loops(block)
        if not loops:
            continue
        small = _static_iterations(sch, loops)
        if small is not None and small < SERIAL_BELOW:
            continue
        spatial = min(_leading_spatial(sch, block), len(loops), 2)
        if spatial == 0:
            continue
        try:
            outer = sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0]
            sch.parallel(outer)
        except Exception:  # noqa: BLE001 - a block shape the generic rule cannot handle stays serial
            continue
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def hand_schedule_module(mod, target):
    """Apply `hand_schedule` to every unscheduled PrimFunc of an IRModule; returns (module, count)."""
    from tvm import tirx

    count = 0
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tir.is_scheduled" in func.attrs and bool(func.attrs["tir.is_scheduled"]):
            continue
        try:
            updates[gv] = hand_schedule(func)
            count += 1
        except Exception:  # noqa: BLE001 - e.g. opaque blocks: keep the function as it is
            continue
    for gv, func in updates.items():
        mod[gv] = func
    return mod, count
