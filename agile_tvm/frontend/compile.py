"""Compile a frontend IRModule for a target: tuned records first, hand schedules for the rest, then `tvm.compile`.

Order (records are keyed by the fused TIR functions, so legalize + fuse must run before applying them):
1. `agile_tvm.tune.records.apply_schedules` legalizes, fuses and applies `schedules/<target>/` when it exists;
2. every TIR function still unscheduled gets a hand schedule (`hand_schedule`): the kernels of
   `agile_tvm.kernels` arrive scheduled; the frontend's own loops and the legalized float ops get
   multi-threading on their outer loop and vectorization of the innermost loop;
3. `tvm.compile` runs the rest of the default pipeline.
"""

from __future__ import annotations


def compile_relax(mod, target, target_name: str | None):
    """(Executable, short description of what scheduled the module)."""
    import tvm
    from tvm import relax

    info = []
    applied = False
    if target_name:
        try:
            from agile_tvm.tune.records import apply_schedules, schedule_database

            if schedule_database(target_name) is not None:
                mod = apply_schedules(mod, target, target_name)
                applied = True
                info.append(f"records schedules/{target_name}")
        except ImportError:
            pass
    if not applied:
        with target, tvm.transform.PassContext(opt_level=3):
            mod = relax.pipeline.zero_pipeline()(mod)
    from agile_tvm.frontend.schedule import hand_schedule_module

    mod, count = hand_schedule_module(mod, target)
    info.append(f"{count} hand-scheduled functions")
    with tvm.transform.PassContext(opt_level=3):
        ex = tvm.compile(mod, target=target)
    return ex, ", ".join(info)
