#!/usr/bin/env python
"""Benchmark the tuned schedules: untuned vs hand schedule vs tuned GFLOP/s per kernel, measured in one run.

    .venv/bin/python scripts/bench_tuning.py [--target x86-avx2] [--out results/tuning.json]

"untuned" is the kernel's TE compiled with TVM's default (unscheduled) lowering, "hand" the kernels' own
schedule (agile_tvm.kernels.schedule), "tuned" the record in schedules/<target>/ (verified at export). All three
run here, back to back, same inputs; trials and minutes come from tune_logs/<target>/curve.jsonl. The machine is
shared: numbers are medians of several repeats and provisional.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def gflops(rt_mod, arrays, flops: float, repeat: int) -> float:
    import numpy as np
    import tvm

    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    timer = rt_mod.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=50)
    return flops / float(np.median(timer(*tensors).results)) / 1e9


def curve_minutes(work_dir: Path) -> dict[str, float]:
    """Wall minutes spent per kernel, from the first to the last trial logged for it (all sessions)."""
    from agile_tvm.tune.progress import read_curve

    spans: dict[str, list[float]] = {}
    prev = None
    out: dict[str, float] = {}
    for row in read_curve(work_dir):
        t = row.get("t")
        if t is None:
            continue
        if prev is not None and 0 < t - prev < 600:
            out[row["task"]] = out.get(row["task"], 0.0) + (t - prev)
        prev = t
        spans.setdefault(row["task"], []).append(t)
    return {k: round(v / 60, 2) for k, v in out.items()}


def main() -> int:
    from agile_tvm.rpc.profiles import host_x86_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="default: the x86 target this machine runs")
    parser.add_argument("--out", default=str(REPO / "results" / "tuning.json"))
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    target_name = args.target or host_x86_target()
    if target_name is None:
        print("bench_tuning: this machine runs no x86 tuning target", file=sys.stderr)
        return 2

    from agile_tvm.tune.intrinsics import import_cpu_intrinsics

    import_cpu_intrinsics()
    import tvm

    from agile_tvm.tune import progress, records
    from agile_tvm.tune.export import random_args, run_local
    from agile_tvm.tune.targets import tuning_target
    from agile_tvm.tune.workloads import hand_scheduled_func, linear_func, model_config, model_kernel_names

    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from agile_tvm.tune.export import verify_schedule

    target = tuning_target(target_name)
    tune_db = (records.open_database(records.tune_logs_root() / target_name, create=False)
               if (records.tune_logs_root() / target_name / records.RECORD_FILE).exists() else None)
    sched_dir = records.schedules_root() / target_name
    manifest = json.loads((sched_dir / "manifest.json").read_text()) if (sched_dir / "manifest.json").exists() else {}
    work_dir = records.tune_logs_root() / target_name
    trials = progress.trials_done(work_dir)
    minutes = curve_minutes(work_dir)
    rows = []
    for name in model_kernel_names(model_config("smollm2-135m")):
        wbits, n, k, m = (int(p[1:]) if i else int(p[1]) for i, p in enumerate(name.split("_")))
        ref = linear_func(wbits, n, k, m, target_name)
        flops = 2.0 * m * n * k
        arrays = random_args(ref, seed=1)
        row = {"kernel": name, "M": m, "N": n, "K": k}
        untuned = tvm.compile(ref, target=target).mod
        want = run_local(untuned, [a.copy() for a in arrays])[-1]
        row["untuned_gflops"] = round(gflops(untuned, arrays, flops, args.repeat), 2)
        hand = tvm.compile(hand_scheduled_func(wbits, n, k, m, target_name), target=target).mod
        hand_ok = bool(abs(run_local(hand, [a.copy() for a in arrays])[-1] - want).max() <= 1e-5 * abs(want).max())
        row["hand_gflops"] = round(gflops(hand, arrays, flops, args.repeat), 2)
        row["hand_matches_untuned"] = hand_ok
        # tuned: the best of the top records in tune_logs/ re-measured here (what export does), shipped or not
        best = None
        if tune_db is not None:
            mod = _normalize_mod(ref)
            if tune_db.has_workload(mod):
                for rec in tune_db.get_top_k(tune_db.commit_workload(mod), 5):
                    sch = tvm.s_tir.Schedule(mod)
                    rec.trace.apply_to_schedule(sch, remove_postproc=False)
                    ok, _ = verify_schedule(sch, mod, target)
                    if ok:
                        g = gflops(tvm.compile(sch.mod, target=target).mod, arrays, flops, args.repeat)
                        best = g if best is None else max(best, g)
        row["tuned_gflops"] = None if best is None else round(best, 2)
        row["tuned_over_hand"] = None if best is None else round(best / row["hand_gflops"], 2)
        row["shipped_in_schedules"] = records.tuned_func(ref, target_name) is not None
        row["trials"] = trials.get(name, 0)
        row["tuning_minutes"] = minutes.get(name)
        row["tuning_best_gflops_on_board"] = manifest.get("kernels", {}).get(name, {}).get("gflops")
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "what": "SmolLM2-135M linear kernels (W4A8), GFLOP/s = 2*M*N*K/t, medians; untuned vs hand vs tuned "
                "(best verified of the top-5 tuning records, re-measured here); shipped = exported to schedules/ "
                "(only records faster than the hand schedule are)",
        "target": target_name, "machine": platform.processor() or platform.machine(),
        "cpu_flags_note": "this machine has AVX2 but no AVX-512: x86-avx512 cannot be measured here"
        if target_name != "x86-avx512" else "",
        "provisional": "shared 2-core machine, other heavy jobs running; ratios matter more than absolutes",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "total_trials": sum(r["trials"] for r in rows),
        "total_tuning_minutes": round(sum(r["tuning_minutes"] or 0 for r in rows), 1),
        "kernels": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
