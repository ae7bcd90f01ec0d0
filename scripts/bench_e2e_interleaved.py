#!/usr/bin/env python
"""Prefill 512 and decode of agileq8 vs eager torch FP32 and torch dynamic int8, interleaved: every round times
each engine once, so drift of this shared machine over minutes (+-30% seen between runs of bench_e2e.py, which times
one engine after the other) hits all engines alike. Ratios are of the medians over rounds, plus per-round ratios.

  scripts/bench_e2e_interleaved.py --module out/e2e/agileq8 --rounds 5 -o results/e2e_interleaved.json
"""

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from agile_tvm.models import load_model
from agile_tvm.runtime import load_module
from agile_tvm.runtime.bench import THREADS, _prompt, _torch_decode_rate, _tvm_decode_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", required=True, help="exported agile-tvm module folder")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("-o", "--output", default="results/e2e_interleaved.json")
    args = ap.parse_args()

    torch.set_num_threads(THREADS)
    fp = load_model(args.model).model.eval()
    q8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp), {torch.nn.Linear}, dtype=torch.qint8)
    tvm = load_module(args.module)
    prompt, short = _prompt(args.tokens, tvm.vocab_size), _prompt(128, tvm.vocab_size)

    def torch_prefill(m):
        with torch.no_grad():
            t = time.perf_counter()
            m(torch.as_tensor(prompt), logits_to_keep=1, use_cache=True)
            return (time.perf_counter() - t) * 1e3

    def tvm_prefill():
        t = time.perf_counter()
        tvm.step(prompt, 0, tvm.new_cache())
        return (time.perf_counter() - t) * 1e3

    engines = {
        "torch": (lambda: torch_prefill(fp), lambda: _torch_decode_rate(fp, torch.as_tensor(short), args.decode_tokens)),
        "torch-int8": (lambda: torch_prefill(q8),
                       lambda: _torch_decode_rate(q8, torch.as_tensor(short), args.decode_tokens)),
        tvm.manifest["scheme"]: (tvm_prefill, lambda: _tvm_decode_rate(tvm, short, args.decode_tokens)),
    }
    for prefill, _ in engines.values():  # warm-up
        prefill()
    raw = {k: {"prefill_ms": [], "decode_tok_s": []} for k in engines}
    for r in range(args.rounds):
        for name, (prefill, decode) in engines.items():
            raw[name]["prefill_ms"].append(prefill())
            raw[name]["decode_tok_s"].append(decode())
        print(r, {k: (round(v["prefill_ms"][-1]), round(v["decode_tok_s"][-1], 1)) for k, v in raw.items()}, flush=True)
    ours = tvm.manifest["scheme"]
    med = {k: {m: float(np.median(x)) for m, x in v.items()} for k, v in raw.items()}
    ratios = {peer: {"prefill_x": med[peer]["prefill_ms"] / med[ours]["prefill_ms"],
                     "prefill_x_per_round": [p / q for p, q in zip(raw[peer]["prefill_ms"], raw[ours]["prefill_ms"])],
                     "decode_x": med[ours]["decode_tok_s"] / med[peer]["decode_tok_s"]}
              for peer in ("torch", "torch-int8")}
    out = {"tokens": args.tokens, "decode_tokens": args.decode_tokens, "rounds": args.rounds, "threads": THREADS,
           "module": args.module, "median": med, "ratios_vs_peers": ratios, "raw": raw}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.output).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.output)
    print(json.dumps({"median": med, "ratios": {k: {m: v for m, v in r.items() if m != "prefill_x_per_round"}
                                                for k, r in ratios.items()}}))


if __name__ == "__main__":
    main()
