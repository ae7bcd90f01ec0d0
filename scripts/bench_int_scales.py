#!/usr/bin/env python
"""The integer-scale prefill GEMM (kernels/int_scales.py) against the float-epilogue GEMM, same run, 2 threads.

Kernel level: SmolLM2's linear shapes at M = 512, both kernels on the same weights (on the pow2 grid, so both
compute the same linear), interleaved timings, medians. Records {"target", "M", "N", "K", "impl", "median_ms",
"gops"} and "speedup" (float-epilogue time / integer-scale time) go to results/int_scales.json.
Model level (``--modules A B``): two exported modules (e.g. agileq8 quantized with --scale-grid pow2 and with
float), prefill timed per round as the minimum of 3 calls (transient interference on a shared machine only ever
adds time), modules alternating ABBA; the per-round ratio B / A, its median, range and how often A was faster.

    TVM_NUM_THREADS=2 .venv/bin/python scripts/bench_int_scales.py
    TVM_NUM_THREADS=2 .venv/bin/python scripts/bench_int_scales.py --modules out/e2e/agileq8-pow2 out/e2e/agileq8-float
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576)]  # (N, K): gate/up, down, q/o, k/v


def kernel_ab(M: int, rounds: int) -> list[dict]:
    import numpy as np
    import tvm

    from agile_tvm.kernels import build, cases, int_scales, layout
    from agile_tvm.kernels.linear import w4a8_linear_func

    target, dev, gs = "host", tvm.cpu(), 32
    records = []
    for N, K in SHAPES:
        args0, _, _, k = cases.int_scale_case(N, K, M, target, group_size=gs)
        q, c, d, e, xq, zp, s, xsum = (k[name] for name in ("q", "c", "d", "e", "xq", "zp", "s", "xsum"))
        packed = layout._pack_nibbles(q, np.zeros((N, K // gs), np.int8), layout._isa(target))
        wscale = np.ldexp(c.astype(np.float64), e[:, None]).astype(np.float16)  # exact: the compact tables
        wmin = np.ldexp(d.astype(np.float64), e[:, None]).astype(np.float16)
        tiled = lambda t: layout.tile_tables(t, target, 4, "nibble")  # noqa: E731
        new = int_scales.int_scale_linear_func(N, K, target, group_size=gs)
        old = w4a8_linear_func(N, K, target, group_size=gs, act="token", has_wmin=True, wfmt="nibble",
                               tables="tiled", compact=True)
        runs = {}
        for impl, func, arrays in (
                ("float epilogue", old, (xq, packed["wpack"], tiled(packed["wsum"].astype(np.int16)), tiled(wscale),
                                         tiled(wmin), s, zp, xsum)),
                ("integer scales", new, tuple(args0[:-1]))):
            name = str(func.attrs["global_symbol"])
            args = [tvm.runtime.tensor(a, dev) for a in arrays] + [tvm.runtime.tensor(np.zeros((M, N), np.float32),
                                                                                     dev)]
            runs[impl] = (build(func, target).time_evaluator(name, dev, number=5, repeat=5), args, [])
        for _ in range(rounds):
            for timer, args, times in runs.values():
                times += list(timer(*args).results)
        y_old, y_new = runs["float epilogue"][1][-1].numpy(), runs["integer scales"][1][-1].numpy()
        assert np.abs(y_old - y_new).max() <= 1e-5 * np.abs(y_old).max(), "the two kernels disagree"
        med = {impl: statistics.median(r[2]) for impl, r in runs.items()}
        for impl, t in med.items():
            records.append({"target": "host", "M": M, "N": N, "K": K, "impl": impl, "median_ms": round(t * 1e3, 4),
                            "gops": round(2 * M * N * K / t / 1e9, 1),
                            "speedup": round(med["float epilogue"] / t, 3)})
        print(f"M={M} N={N} K={K}: float epilogue {med['float epilogue'] * 1e3:.3f} ms, integer scales "
              f"{med['integer scales'] * 1e3:.3f} ms: {med['float epilogue'] / med['integer scales']:.3f}x", flush=True)
    return records


def model_ab(a: str, b: str, tokens: list[int], rounds: int) -> list[dict]:
    from agile_tvm.runtime import load_module
    from agile_tvm.runtime.bench import _prompt

    mods = {a: load_module(a), b: load_module(b)}
    records = []
    for n in tokens:
        ids = _prompt(n, mods[a].vocab_size)

        def best_of_3(lm):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                lm.step(ids, 0, lm.new_cache())
                best = min(best, time.perf_counter() - t0)
            return best * 1e3

        for lm in mods.values():
            best_of_3(lm)  # warm up
        times = {a: [], b: []}
        for r in range(rounds):
            for key in ((a, b) if r % 2 == 0 else (b, a)):
                times[key].append(best_of_3(mods[key]))
                time.sleep(0.1)
        ratios = [tb / ta for ta, tb in zip(times[a], times[b])]
        rec = {"tokens": n, "module_a": a, "module_b": b, "a_ms": round(statistics.median(times[a]), 1),
               "b_ms": round(statistics.median(times[b]), 1), "b_over_a": round(statistics.median(ratios), 3),
               "min": round(min(ratios), 3), "max": round(max(ratios), 3), "a_faster": sum(x > 1 for x in ratios),
               "rounds": rounds}
        records.append(rec)
        print(f"prefill {n}: {a} {rec['a_ms']} ms, {b} {rec['b_ms']} ms; per round {b} / {a}: {rec['b_over_a']}x "
              f"({rec['min']}-{rec['max']}), {a} faster in {rec['a_faster']}/{rounds}", flush=True)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--M", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modules", nargs=2, metavar=("A", "B"), help="also time prefill of two exported modules")
    p.add_argument("--tokens", default="512,2048")
    p.add_argument("--model-rounds", type=int, default=15)
    p.add_argument("-o", "--output", default=str(ROOT / "results" / "int_scales.json"))
    args = p.parse_args(argv)
    out = {"kernels": kernel_ab(args.M, args.rounds), "threads": os.environ["TVM_NUM_THREADS"]}
    if args.modules:
        out["model"] = model_ab(*args.modules, [int(t) for t in args.tokens.split(",")], args.model_rounds)
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
