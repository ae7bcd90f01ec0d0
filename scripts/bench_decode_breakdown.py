#!/usr/bin/env python
"""Where a decode step's time goes: each kernel of an exported module's decode function, timed cold, next to the
whole step and the bytes its weights take. With ``--prefill N``, the same for a prefill of N tokens.

Decode is memory bound (`agile-tvm bench` reports the weight bytes a step reads and the GB/s that makes), so this
asks which kernels stream their weights slower than the rest. The step's kernel calls and their arguments are
captured once through the VM's instrument hook; then, per kernel, all its calls of one step (one per layer, each on
its own layer's weights) run back to back after an eviction of the caches (a 64 MB read), as in the model where
each layer's weights come from DRAM. The per-call Python overhead (~1-2 us) is included, so small kernels read a
little slow. Records {"module", "kernel", "calls", "ms_per_step", "us_per_call", "weight_mb_per_call",
"weight_gb_s"} go to results/decode_breakdown.json; "step" records the whole decode step (medians).

Prefill is compute bound, so ``--prefill N`` times its kernels warm (no eviction) and adds each kernel's share of the
kernels' sum; records go to results/prefill_breakdown.json, "step" then being the whole prefill.

    TVM_NUM_THREADS=2 .venv/bin/python scripts/bench_decode_breakdown.py out/e2e/agileq8-pow2
    TVM_NUM_THREADS=2 .venv/bin/python scripts/bench_decode_breakdown.py out/e2e/agileq8-pow2 --prefill 512
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEPTH = 128  # tokens in the cache when the step runs (as `agile-tvm bench` and llama-bench -d 128)


def capture_step(lm, cache, past, ids):
    """[(kernel symbol, args)] of one step on `ids` after `past` cached tokens, in call order (VM builtins left
    out)."""
    calls = []

    def instrument(func, symbol, before, ret, *args):
        if before and not symbol.startswith("vm."):
            calls.append((symbol, args))
        return 0

    lm.vm.set_instrument(instrument)
    lm.step(ids, past, cache)
    lm.vm.set_instrument(lambda *a: 0)  # the hook cannot be removed; a no-op keeps later steps honest enough
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", help="exported module folder (agile-tvm export)")
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="break down a prefill of N tokens instead of a decode step")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("-o", "--out", help="records (default results/decode_breakdown.json, with --prefill "
                    "results/prefill_breakdown.json)")
    a = ap.parse_args(argv)
    out = Path(a.out or ROOT / "results" / ("prefill_breakdown.json" if a.prefill else "decode_breakdown.json"))

    import numpy as np
    import tvm

    from agile_tvm.frontend.graph import GATHER_KERNELS
    from agile_tvm.runtime import load_module

    lm = load_module(a.module)
    lib = tvm.runtime.load_module(str(lm.out_dir / lm.manifest["library"])).imports[0]
    rng = np.random.RandomState(0)
    steps = []
    if a.prefill:
        if not 1 <= a.prefill <= lm.max_seq_len:
            ap.error(f"--prefill {a.prefill}: the module takes 1 to {lm.max_seq_len} tokens")
        ids = rng.randint(0, lm.vocab_size, size=(1, a.prefill)).astype(np.int32)
        for _ in range(max(3, a.repeat // 3)):
            cache = lm.new_cache()
            t0 = time.perf_counter()
            lm.step(ids, 0, cache)
            steps.append(time.perf_counter() - t0)
        calls = capture_step(lm, lm.new_cache(), 0, ids)
    else:
        cache = lm.new_cache()
        lm.step(rng.randint(0, lm.vocab_size, size=(1, DEPTH)).astype(np.int32), 0, cache)
        past = DEPTH
        for _ in range(40):
            t0 = time.perf_counter()
            lm.step(np.array([[5]], np.int32), past, cache)
            steps.append(time.perf_counter() - t0)
            past += 1
        calls = capture_step(lm, cache, past, np.array([[5]], np.int32))

    weights = {hash(w) for w in lm.weights}  # ffi objects hash by the underlying object, not the wrapper
    evict = np.ones(64 * 1024 * 1024 // 4, np.float32)
    by_kernel = collections.defaultdict(list)
    for symbol, args in calls:
        by_kernel[symbol].append(args)
    records = []
    for symbol, argsets in by_kernel.items():
        func = lib.get_function(symbol)
        times = []
        for _ in range(a.repeat):
            if not a.prefill:
                evict.sum()
            t0 = time.perf_counter()
            for args in argsets:
                func(*args)
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        wbytes = sum(x.numpy().nbytes for x in argsets[0] if hash(x) in weights) if argsets else 0
        rec = {"module": str(a.module), "kernel": symbol, "calls": len(argsets), "ms_per_step": round(sec * 1e3, 4),
               "us_per_call": round(sec / len(argsets) * 1e6, 2), "weight_mb_per_call": round(wbytes / 1e6, 4),
               "weight_gb_s": round(wbytes * len(argsets) / sec / 1e9, 2)
               if wbytes and not symbol.startswith(GATHER_KERNELS) else None}  # a gather reads a row, not the table
        records.append(rec)
    records.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in records)
    for r in records:
        r["share"] = round(r["ms_per_step"] / total, 4)
    step_ms = statistics.median(steps) * 1e3
    records.append({"module": str(a.module), "kernel": "prefill" if a.prefill else "step", "tokens": a.prefill or 1,
                    "calls": 1, "ms_per_step": round(step_ms, 4),
                    "kernels_ms_per_step": round(total, 4), "decode_weight_mb":
                    round(lm.manifest.get("decode_weight_bytes", 0) / 1e6, 2)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, out)

    what = f"prefill of {a.prefill} tokens" if a.prefill else f"decode step at depth {DEPTH}"
    how = "warm" if a.prefill else "cold"
    print(f"{what}: {step_ms:.3f} ms (median of {len(steps)}); its kernels run {how} one by one: {total:.3f} ms")
    print("| kernel | calls | ms per step | share | us per call | weight MB per call | GB/s |\n"
          "|---|---|---|---|---|---|---|")
    for r in records[:-1]:
        if r["ms_per_step"] >= 0.01:
            gbs = "-" if r["weight_gb_s"] is None else f"{r['weight_gb_s']:.1f}"
            print(f"| {r['kernel'][:70]} | {r['calls']} | {r['ms_per_step']:.3f} | {r['share']:.1%} | "
                  f"{r['us_per_call']:.1f} | {r['weight_mb_per_call']:.3f} | {gbs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
