#!/usr/bin/env python
"""Benchmark the tuned schedules: untuned vs hand schedule vs tuned GFLOP/s per kernel, measured in one run.

    .venv/bin/python scripts/bench_tuning.py [--target x86-avx2] [--set v2|v1|all] [--out results/tuning.json]

Kernel sets: "v2" (default) the kernels the frontend emits for the model that was tuned (`agile-tvm tune --model
CKPT` keeps them in tune_logs/<target>/kernels.json: the decode GEMVs with the per-token quantizer inside, fused
q/k/v and gate/up, the INT8 LM head; the static M=512 proxies of the prefill kernels, and for those also the
symbolic-M kernel itself, hand and with the proxy's trace replayed: what the model runs); "v1" the earlier W4A8 shapes `w4a8_n{N}_k{K}_m{M}` (rows of
a set not measured are kept from the previous results file, with their own date).

"untuned" is the kernel's TE compiled with TVM's default (unscheduled) lowering, "hand" the kernels' own
schedule (agile_tvm.kernels.schedule), "tuned" the best verified of the top-5 records in tune_logs/ re-measured
here (what export does), "shipped" whether schedules/<target>/ has a record for it (the frontend applies those).
All run here on the same inputs, hand and tuned round by round in turn (this machine's speed drifts); decode
GEMVs with cold caches (weights flushed before each call, as in the model: `runner.measure_cold`); trials and
minutes come from tune_logs/<target>/curve.jsonl.
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


def measure(name, target_name, target, specs, tune_db, trials, minutes, repeat) -> dict:
    """One kernel: untuned, hand and tuned GFLOP/s here, back to back on the same inputs."""
    import tvm
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from agile_tvm.tune import records
    from agile_tvm.tune.export import (interleaved_gflops, outputs_match, random_args, run_local, time_gflops,
                                       verify_schedule)
    from agile_tvm.tune.runner import measure_cold
    from agile_tvm.tune.workloads import PREFILL_PROXY_M, hand_func, workload

    wl = workload(name, target_name, specs)
    ref, flops = wl.func, wl.flops
    arrays = random_args(ref, seed=1)
    spec = specs.get(name)
    shape = ({"M": int(spec["options"].get("m") or 1), "N": int(spec["N"]), "K": int(spec["K"])} if spec else
             dict(zip("NKM", (int(p[1:]) for p in name.split("_")[1:]))))
    row = {"kernel": name, **shape}
    cold = measure_cold(wl, target)
    row["cold_caches"] = cold
    untuned = tvm.compile(ref, target=target).mod
    want = run_local(untuned, [a.copy() for a in arrays])
    row["untuned_gflops"] = round(time_gflops(untuned, arrays, flops, repeat, cold=cold), 2)
    hand = tvm.compile(hand_func(name, target_name, specs), target=target).mod
    row["hand_matches_untuned"] = outputs_match(run_local(hand, [a.copy() for a in arrays]), want)[0]
    tuned = []  # the top records in tune_logs/ that verify, re-measured here (what export does), shipped or not
    mod = _normalize_mod(ref)
    if tune_db is not None and tune_db.has_workload(mod):
        for rec in tune_db.get_top_k(tune_db.commit_workload(mod), 5):
            sch = tvm.s_tir.Schedule(mod)
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
            if verify_schedule(sch, mod, target)[0]:
                tuned.append(tvm.compile(sch.mod, target=target).mod)
    measured = interleaved_gflops([hand] + tuned, arrays, flops, cold)
    row["hand_gflops"] = round(measured[0], 2)
    best = max(measured[1:]) if tuned else None
    row["tuned_gflops"] = None if best is None else round(best, 2)
    row["tuned_over_hand"] = None if best is None else round(best / row["hand_gflops"], 2)
    if spec is not None and spec["options"].get("m") == PREFILL_PROXY_M:
        # a prefill proxy: what the model runs is the symbolic-M kernel, hand or with the proxy's trace replayed
        row.update(symbolic_gflops(spec, ref, target_name, target, tune_db, arrays, flops, repeat, want))
    row["shipped_in_schedules"] = records.tuned_func(ref, target_name) is not None
    row["trials"] = trials.get(name, 0)
    row["tuning_minutes"] = minutes.get(name)
    print(json.dumps(row), flush=True)
    return row


def symbolic_gflops(spec, proxy, target_name, target, tune_db, arrays, flops, repeat, want) -> dict:
    """The symbolic-M kernel of a prefill proxy at the proxy's M: hand-scheduled, and with the best tuning
    record's trace replayed (`records.replayed_func`, what the frontend compiles), checked against `want`."""
    import tvm

    from agile_tvm.tune import records
    from agile_tvm.tune.export import interleaved_gflops, outputs_match, run_local, time_gflops
    from agile_tvm.tune.workloads import kernel_func

    symbolic = dict(spec, options=dict(spec["options"], m=None))
    out = {}
    hand = tvm.compile(kernel_func(symbolic, target_name, schedule=True), target=target).mod
    tuned = records.replayed_func(kernel_func(symbolic, target_name), proxy, target_name, tune_db) \
        if tune_db is not None else None
    if tuned is None:
        out["hand_symbolic_gflops"] = round(time_gflops(hand, arrays, flops, repeat), 2)
        return out
    mod = tvm.compile(tuned, target=target).mod
    out["tuned_symbolic_matches_untuned"] = outputs_match(run_local(mod, [a.copy() for a in arrays]), want)[0]
    g_hand, g_tuned = interleaved_gflops([hand, mod], arrays, flops, cold=False)
    out["hand_symbolic_gflops"], out["tuned_symbolic_gflops"] = round(g_hand, 2), round(g_tuned, 2)
    out["tuned_symbolic_over_hand"] = round(g_tuned / g_hand, 2)
    return out


def main() -> int:
    from agile_tvm.rpc.profiles import host_x86_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="default: the x86 target this machine runs")
    parser.add_argument("--out", default=str(REPO / "results" / "tuning.json"))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--set", choices=("v2", "v1", "all"), default="v2", help="which kernels to measure")
    args = parser.parse_args()
    target_name = args.target or host_x86_target()
    if target_name is None:
        print("bench_tuning: this machine runs no x86 tuning target", file=sys.stderr)
        return 2

    from agile_tvm.tune.export import measure_on_all_cores
    from agile_tvm.tune.intrinsics import import_cpu_intrinsics

    measure_on_all_cores()
    import_cpu_intrinsics()
    from agile_tvm.tune import progress, records
    from agile_tvm.tune.targets import tuning_target
    from agile_tvm.tune.workloads import model_config, model_kernel_names, read_kernel_specs

    target = tuning_target(target_name)
    work_dir = records.tune_logs_root() / target_name
    tune_db = (records.open_database(work_dir, create=False)
               if (work_dir / records.RECORD_FILE).exists() else None)
    specs = read_kernel_specs(work_dir)
    trials = progress.trials_done(work_dir)
    minutes = curve_minutes(work_dir)
    names = {"v2": list(specs), "v1": model_kernel_names(model_config("smollm2-135m"))}
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    sets = ["v2", "v1"] if args.set == "all" else [args.set]
    result = {
        "what": "SmolLM2-135M linear kernels, GFLOP/s = 2*M*N*K/t (N of a fused kernel: all its outputs, padded), "
                "medians; untuned vs hand vs tuned (best verified of the top-5 tuning records, re-measured here); "
                "shipped = exported to schedules/ (only records faster than the hand schedule are). v2: the kernels "
                "the frontend emits for the agileq8 checkpoint: decode (M=1) and the static M=512 proxies of the "
                "prefill kernels, with *_symbolic_*: the symbolic-M prefill kernel itself at M=512, hand and with "
                "the proxy's best trace replayed (what the model runs); v1: the earlier W4A8 shapes",
        "target": target_name, "machine": platform.processor() or platform.machine(),
        "cpu_flags_note": "this machine has AVX2 but no AVX-512: x86-avx512 cannot be measured here"
        if target_name != "x86-avx512" else "",
        "provisional": "shared 2-core machine, other heavy jobs running; ratios matter more than absolutes",
    }
    for kernel_set in ("v2", "v1"):
        if kernel_set not in sets:
            if previous.get(kernel_set):
                result[kernel_set] = previous[kernel_set]
            elif kernel_set == "v1" and previous.get("kernels"):  # results written before the v2 kernels
                result["v1"] = {k: previous[k] for k in ("date", "total_trials", "total_tuning_minutes", "kernels")
                                if k in previous}
            continue
        rows = [measure(name, target_name, target, specs, tune_db, trials, minutes, args.repeat)
                for name in names[kernel_set]]
        result[kernel_set] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "total_trials": sum(r["trials"] for r in rows),
            "total_tuning_minutes": round(sum(r["tuning_minutes"] or 0 for r in rows), 1),
            "kernels": rows,
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
