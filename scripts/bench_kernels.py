#!/usr/bin/env python
"""Benchmark the agile-tvm linear kernels against TVM FP32 and torch on SmolLM2's linear shapes.

Records {"target", "M", "N", "K", "impl", "gflops", "median_ms"} into results/kernels.json (GFLOP/s = 2*M*N*K /
median time; integer ops counted like flops) and prints a markdown table. All implementations are timed in the same
run with 2 threads (TVM_NUM_THREADS=2, torch.set_num_threads(2)); each number is the median of ``--repeat`` timings
of at least ``--min-ms`` ms each (``min_ms`` is recorded too: on a shared machine it is the steadier number).
M = 1 uses the GEMV (decode) variant of each TVM kernel (``m=1``).
"W4A8" has per-channel weights; "W4A8 g32" groups of 32 (checkpoint v1: integer zero points, one activation scale);
"W4A8 g32 v2" the v2 default (groups of 32 with float offsets wmin, per-token activation scales: ``act="token"``,
``has_wmin=True``); "W4A8 g32 intscale" the v2 GEMM on the power-of-two scale grid that agileq8's prefill runs
(kernels/int_scales.py, x86, M > 1 only). The TVM kernels time the linear only: activation quantization is its own
kernel (timed as ``act-quant`` and, v2 per token with group sums of 32, ``act-quant token``; N = K).

    .venv/bin/python scripts/bench_kernels.py                 # full grid, host target, 2 threads, wall time
    .venv/bin/python scripts/bench_kernels.py --quick         # fewer repeats
    .venv/bin/python scripts/bench_kernels.py --cpu-time      # 1 thread, process CPU time

Both modes write results/kernels.json; each record carries "timing": "wall-2threads" or "cpu-1thread", and a run
replaces only the records of its own mode.

On a loaded machine wall-clock medians of multi-threaded torch collapse (OpenMP threads wait for descheduled
siblings); ``--cpu-time`` measures per-core throughput that the load barely moves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
MS = [1, 128, 512]
IMPLS = ["W4A8", "W4A8 g32", "W4A8 g32 v2", "W4A8 nibble", "W4A8 g32 intscale", "W8A8", "W4A4", "TVM FP32",
         "torch FP32", "torch int8 dynamic"]
PREFILL_ONLY = {"W4A8 g32 intscale"}  # GEMM-only kernels: no M = 1 record


CPU_CLOCK = False  # --cpu-time: one thread, process CPU time instead of wall time


def time_tvm(mod, name, args, repeat, min_ms):
    """(median, min) seconds per call over ``repeat`` timings of >= min_ms each."""
    import tvm

    if CPU_CLOCK:
        f = mod[name]
        return time_torch(lambda: f(*args), repeat, min_ms)
    fn = mod.time_evaluator(name, tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=int(min_ms))
    res = fn(*args).results
    return statistics.median(res), min(res)


def time_torch(fn, repeat, min_ms):
    clock = time.process_time if CPU_CLOCK else time.perf_counter
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    number = max(1, int(min_ms / 1e3 / one))
    res = []
    for _ in range(repeat):
        t0 = clock()
        for _ in range(number):
            fn()
        res.append((clock() - t0) / number)
    return statistics.median(res), min(res)


def tvm_case(impl, N, K, M, target):
    """(compiled module, symbol, tvm args) for one TVM implementation."""
    import numpy as np
    import tvm

    from agile_tvm import kernels as k
    from agile_tvm.kernels import cases
    from agile_tvm.kernels.fp32 import fp32_linear_func, pack_fp32_weights

    m = 1 if M == 1 else None
    if impl == "TVM FP32":
        rng = np.random.default_rng(0)
        func = fp32_linear_func(N, K, target, m=m)
        args = [rng.standard_normal((M, K)).astype(np.float32),
                pack_fp32_weights(rng.standard_normal((N, K)).astype(np.float32), target),
                np.zeros((M, N), np.float32)]
        want = None
    elif impl == "act-quant":
        func = k.quantize_act_func(K, 8, target, m=m)
        args, _, want = cases.quantize_case(K, M, 8)
    elif impl == "act-quant token":
        func = k.quantize_act_token_func(K, 8, target, group_size=32, m=m)
        args, _, want = cases.quantize_token_case(K, M, 8, group_size=32)
        want = want[3]  # checked on xsum, the last output, which depends on all the others
    elif impl == "W4A8 g32":
        func = k.w4a8_linear_func(N, K, target, group_size=32, m=m)
        args, _, want = cases.linear_case("w4a8", N, K, M, target, group_size=32)
    elif impl == "W4A8 g32 v2":
        func = k.w4a8_linear_func(N, K, target, group_size=32, m=m, act="token", has_wmin=True)
        args, _, want, bound = cases.linear_v2_case("w4a8", N, K, M, target, group_size=32, has_wmin=True,
                                                    bound=True)
    elif impl == "W4A8 g32 intscale":  # the v2 GEMM on the power-of-two scale grid (agileq8 prefill, x86)
        from agile_tvm.kernels.int_scales import int_scale_linear_func

        func = int_scale_linear_func(N, K, target, group_size=32)
        args, _, want, _ = cases.int_scale_case(N, K, M, target)
    elif impl == "W4A8 nibble":  # 4-bit weights in memory, unpacked in registers (x86)
        func = k.w4a8_linear_func(N, K, target, m=m, wfmt="nibble")
        args, _, want = cases.linear_case("w4a8", N, K, M, target, wfmt="nibble")
    else:
        kind = impl.lower()
        maker = {"w4a8": k.w4a8_linear_func, "w8a8": k.w8a8_linear_func, "w4a4": k.w4a4_linear_func}[kind]
        func = maker(N, K, target, m=m)
        args, _, want = cases.linear_case(kind, N, K, M, target)
    mod = k.build(func, target)
    name = str(func.attrs["global_symbol"])
    targs = [tvm.runtime.tensor(np.array(a, order="C"), tvm.cpu()) for a in args]
    if want is not None:  # never time a wrong kernel
        mod[name](*targs)
        got = targs[-1].numpy()
        if impl == "W4A8 g32 v2":
            ok = bool((np.abs(got.astype(np.float64) - want) <= bound).all())
        elif impl == "W4A8 g32 intscale":
            ok = np.array_equal(got, want)  # bit for bit its numpy twin
        elif got.dtype != np.float32:
            ok = np.array_equal(got, want)
        else:
            ok = np.allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))
        if not ok:
            raise SystemExit(f"{impl} N={N} K={K} M={M}: result differs from numpy reference")
    return mod, name, targs


def attention_cases(M, N, target, Hq=9, Hkv=3, D=64):
    """QK (causal), log2 codes and AttnV on realistic inputs: AttnV gets the codes of the causal softmax.
    Records use N = keys, K = head dim; GFLOP/s counts the full 2*Hq*M*N*D (causal work is about half)."""
    import numpy as np
    import tvm

    from agile_tvm import kernels as k
    from agile_tvm.kernels import cases, reference

    def prep(func, args):
        mod = k.build(func, target)
        return mod, str(func.attrs["global_symbol"]), [tvm.runtime.tensor(np.array(x, order="C")) for x in args]

    qk_args, _, s = cases.qk_case(Hq, Hkv, D, M, N, causal=True)
    e = np.exp(s - s.max(-1, keepdims=True))
    p = (e / e.sum(-1, keepdims=True)).astype(np.float32)
    codes, pmax = reference.log2_softmax_quant(p, 4)
    av_args, _, _ = cases.attn_v_case(Hq, Hkv, D, M, N, 4)
    av_args[0], av_args[2] = codes, pmax
    return {
        "QK int8 causal": prep(k.qk_int8_func(Hq, Hkv, D, target, causal=True), qk_args),
        "log2 softmax codes": prep(k.log2_softmax_quant_func(Hq, 4, target),
                                   [p, np.zeros(p.shape, np.uint8), np.zeros(p.shape[:2], np.float32)]),
        "AttnV log2": prep(k.attn_v_log2_func(Hq, Hkv, D, 4, target), av_args),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="host")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--min-ms", type=float, default=30.0, help="minimum duration of one timing")
    ap.add_argument("--quick", action="store_true", help="repeat 3, min-ms 10")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--attention", action="store_true",
                    help="also time the attention kernels (SmolLM2 heads 9/3, D 64): causal prefill M = N = 128 "
                         "and 512, decode M = 1 with N = 2048")
    ap.add_argument("--cpu-time", action="store_true",
                    help="1 thread, CPU time of this process (robust on a loaded machine)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results",
                                                  "kernels.json"),
                    help="JSON results; records of the other timing mode already in the file are kept")
    a = ap.parse_args(argv)
    global CPU_CLOCK
    CPU_CLOCK = a.cpu_time
    threads = 1 if a.cpu_time else 2
    os.environ["TVM_NUM_THREADS"] = str(threads)
    mode = "cpu-1thread" if a.cpu_time else "wall-2threads"
    if a.quick:
        a.repeat, a.min_ms = 3, 10.0
    ms = [int(x) for x in a.ms.split(",")]
    impls = [x.strip() for x in a.impls.split(",")]

    import torch

    from agile_tvm.targets import get_target

    torch.set_num_threads(threads)
    target_str = str(get_target(a.target))
    load_before = os.getloadavg()
    records = []

    def add(impl, M, N, K, secs):
        sec, best = secs
        flops = None if impl.startswith("act-quant") else round(2.0 * M * N * K / sec / 1e9, 2)
        rec = {"target": a.target, "M": M, "N": N, "K": K, "impl": impl, "gflops": flops,
               "median_ms": round(sec * 1e3, 4), "min_ms": round(best * 1e3, 4), "timing": mode}
        records.append(rec)
        print(f"{impl:>20} M={M:<4} N={N:<5} K={K:<5} {rec['median_ms']:9.4f} ms "
              + ("" if flops is None else f"{flops:8.1f} GFLOP/s"), flush=True)

    for N, K in SHAPES:
        for M in ms:
            for impl in impls:
                if M == 1 and impl in PREFILL_ONLY:
                    continue
                if impl.startswith("torch"):
                    x = torch.randn(M, K)
                    lin = torch.nn.Linear(K, N, bias=False)
                    if impl == "torch FP32":
                        w = lin.weight.detach()
                        fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
                    else:
                        qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                                      dtype=torch.qint8)
                        fn = lambda: qlin(x)  # noqa: E731
                    with torch.inference_mode():
                        sec = time_torch(fn, a.repeat, a.min_ms)
                else:
                    mod, name, targs = tvm_case(impl, N, K, M, a.target)
                    sec = time_tvm(mod, name, targs, a.repeat, a.min_ms)
                add(impl, M, N, K, sec)
    if a.attention:
        for M, N in ((128, 128), (512, 512), (1, 2048)):
            for impl, (mod, name, targs) in attention_cases(M, N, a.target).items():
                secs = time_tvm(mod, name, targs, a.repeat, a.min_ms)
                add(impl, M, N, 64, secs)
                if impl.startswith("log2"):
                    records[-1]["gflops"] = None
    for K in sorted({k for _, k in SHAPES}):
        for M in ms:  # recorded with N = K and gflops = null: an elementwise kernel
            for impl in ("act-quant", "act-quant token"):
                mod, name, targs = tvm_case(impl, K, K, M, a.target)
                add(impl, M, K, K, time_tvm(mod, name, targs, a.repeat, a.min_ms))

    meta = {"target": a.target, "target_json": target_str, "machine": platform.processor() or platform.machine(),
            "cpu": _cpu_name(), "threads": threads, "clock": "process CPU time" if a.cpu_time else "wall",
            "repeat": a.repeat, "min_ms": a.min_ms, "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    doc = {"meta": {}, "records": []}
    if os.path.exists(out):
        try:
            with open(out) as f:
                old = json.load(f)
            doc["meta"] = {k: v for k, v in old.get("meta", {}).items() if k != mode and isinstance(v, dict)}
            doc["records"] = [r for r in old.get("records", []) if r.get("timing") not in (mode, None)]
        except (OSError, ValueError):
            pass
    doc["meta"][mode] = meta
    doc["records"] += records
    tmp = out + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, out)
    print()
    print(markdown_table(records, meta))
    att = [r for r in records if r["impl"] in ("QK int8 causal", "log2 softmax codes", "AttnV log2")]
    if att:
        print()
        print("| attention (9/3 heads, D 64) | M | N | QK int8 causal ms | log2 codes ms | AttnV ms |")
        print("|---|---|---|---|---|---|")
        for M, N in sorted({(r["M"], r["N"]) for r in att}, key=lambda x: (x[0] == 1, x[0])):
            ms_ = {r["impl"]: r["median_ms"] for r in att if (r["M"], r["N"]) == (M, N)}
            print(f"| {'decode' if M == 1 else 'prefill'} | {M} | {N} | {ms_.get('QK int8 causal')} | "
                  f"{ms_.get('log2 softmax codes')} | {ms_.get('AttnV log2')} |")
    return 0


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown_table(records, meta):
    """GFLOP/s per shape and M, with the ratios the issue asks for."""
    by = {(r["N"], r["K"], r["M"], r["impl"]): r["gflops"] for r in records}
    records = [r for r in records if r["impl"] in IMPLS]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in records)]
    ratios = [("W4A8", "TVM FP32"), ("W4A8", "torch FP32"), ("W4A4", "W8A8"), ("W4A8", "W4A8 g32"),
              ("W4A8", "W4A8 g32 v2"),  # GFLOP/s ratios; these two are g32 time / per-channel time
              ("W4A8 g32 intscale", "torch FP32"), ("W4A8 g32 intscale", "torch int8 dynamic")]  # agileq8 prefill
    head = "| K -> N | M | " + " | ".join(impls) + " | " + " | ".join(f"{x} / {y}" for x, y in ratios) + " |"
    lines = [f"GFLOP/s (2*M*N*K / median {meta['clock']}), {meta['cpu']}, {meta['threads']} thread(s), "
             f"load average "
             f"{meta['loadavg_before'][0]} -> {meta['loadavg_after'][0]} (provisional on a shared machine)", "",
             head, "|" + "---|" * (len(impls) + 2 + len(ratios))]
    shapes = sorted({(r["N"], r["K"]) for r in records if r["impl"] in impls}, key=lambda s: SHAPES.index(s)
                    if s in SHAPES else 99)
    for N, K in shapes:
        for M in sorted({r["M"] for r in records}):
            if (N, K, M, impls[0]) not in by:
                continue
            vals = [by.get((N, K, M, i)) for i in impls]

            def ratio(a, b):
                x, y = by.get((N, K, M, a)), by.get((N, K, M, b))
                return f"{x / y:.2f}x" if x and y else "-"

            lines.append(f"| {K} -> {N} | {M} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals)
                         + " | " + " | ".join(ratio(x, y) for x, y in ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
