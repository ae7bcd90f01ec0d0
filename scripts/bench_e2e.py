#!/usr/bin/env python
"""Table-4 style end-to-end benchmark -> results/e2e.json (see agile_tvm/runtime/bench.py for what is timed).

    # export the checkpoints first (or pass --ckpts to export here), then time them next to the peers:
    scripts/bench_e2e.py --ckpts ckpt/fp ckpt/agileq8 ckpt/agileq4 --work build/e2e
    scripts/bench_e2e.py --modules build/e2e/fp build/e2e/agileq8 --tokens 128,512 --peers torch,torch-int8

2 threads for every engine (TVM_NUM_THREADS, torch.set_num_threads, llama-bench -t 2). Engines are interleaved:
each round times every engine once, medians over rounds (this machine drifts +-30% over minutes). llama.cpp is
timed when `scripts/setup-llamacpp` has built it. Run it when the machine is quiet; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from agile_tvm.errors import UserError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpts", nargs="*", default=[], help="quantized checkpoints to export (into --work) and time")
    p.add_argument("--modules", nargs="*", default=[], help="already exported module folders to time")
    p.add_argument("--work", default="build/e2e", help="where --ckpts are exported")
    p.add_argument("--target", default="host")
    p.add_argument("--tokens", default="128,512,2048")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-depth", type=int, default=128,
                   help="tokens in the KV cache before decode is timed (llama-bench -d); attention grows with it")
    p.add_argument("--peers", default="torch,torch-int8,llama.cpp")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", "--repeat", dest="rounds", type=int, default=5,
                   help="interleaved rounds (every engine timed once per round); medians are reported")
    p.add_argument("-o", "--output", default="results/e2e.json")
    args = p.parse_args()
    try:
        from agile_tvm.runtime.bench import run_bench
        from agile_tvm.runtime.export import export

        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
        modules = list(args.modules)
        for ckpt in args.ckpts:
            out = Path(args.work) / Path(ckpt).name
            if not (out / "manifest.json").exists():
                export(ckpt, args.target, out,
                       max_seq_len=max(max(tokens), args.decode_depth) + args.decode_tokens + 8)
            modules.append(str(out))
        if not modules:
            raise UserError("nothing to time: give --ckpts or --modules")
        peers = [x for x in args.peers.split(",") if x.strip()]
        run_bench(modules, tokens, args.decode_tokens, peers, args.model, args.rounds, args.output,
                  decode_depth=args.decode_depth)
    except UserError as err:
        print(f"bench_e2e: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
