"""Compile a frontend IRModule for a target: tuned records first, hand schedules for the rest, then `tvm.compile`.

Order (records are keyed by the fused TIR functions, so legalize + fuse must run before applying them):
0. the frontend already put the tuned records of its linear kernels in place (`frontend.linears`: a decode
   kernel's own record, a prefill kernel's static proxy's trace replayed on it);
   how many it found is logged here, one line per compile;
1. `agile_tvm.tune.records.apply_schedules` legalizes, fuses and applies `schedules/<target>/` when it exists;
2. every TIR function still unscheduled gets a hand schedule (`hand_schedule`): the kernels of
   `agile_tvm.kernels` arrive scheduled; the frontend's own loops and the legalized float ops get
   multi-threading on their outer loop and vectorization of the innermost loop;
3. `tvm.compile` runs the rest of the default pipeline.
"""

from __future__ import annotations

import sys


def _tuned_kernels_line(mod) -> str | None:
    """'tuned records: 5 of 15 linear kernels (schedules/x86-avx2) ...': what the frontend found for the kernels
    it marked (`frontend.linears.LinearEmitter._tuned_kernel`); None when there are no integer linear kernels."""
    marks = [str(f.attrs["agile_tvm.schedule"]).split() for _, f in mod.functions.items()
             if f.attrs is not None and "agile_tvm.schedule" in f.attrs]
    if not marks:
        return None
    targets = sorted({m[1] for m in marks if len(m) > 1})
    if not targets:
        return (f"tuned records: none for this target (no schedules/<target>/ records for its ISA, or --no-tuned): "
                f"{len(marks)} linear kernels keep their hand schedules")
    found = sum(m[0] == "record" for m in marks)
    return (f"tuned records: {found} of {len(marks)} linear kernels (schedules/{targets[0]}); the rest keep their "
            f"hand schedules")


def compile_relax(mod, target, target_name: str | None):
    """(Executable, short description of what scheduled the module)."""
    import tvm
    from tvm import relax

    info = []
    tuned = _tuned_kernels_line(mod)
    if tuned:
        print(tuned, file=sys.stderr, flush=True)
        info.append(tuned)
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
