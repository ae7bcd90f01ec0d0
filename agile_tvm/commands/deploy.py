"""`agile-tvm export`, `agile-tvm run` and `agile-tvm bench`: compile a quantized checkpoint, run it, time it."""

from __future__ import annotations

from agile_tvm.errors import UserError


def register(subparsers) -> None:
    from agile_tvm.targets import target_names

    p = subparsers.add_parser("export", help="compile a quantized checkpoint into a .so + weights folder")
    p.add_argument("--model", required=True, help="quantized checkpoint folder (output of `agile-tvm quantize`)")
    p.add_argument("--target", default="host", choices=target_names(),
                   help="compilation target (default: host, this CPU)")
    p.add_argument("-o", "--output", required=True, help="output folder for model.so, weights, manifest")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="longest sequence (prompt + generated) the module accepts (default: min(model, 2048))")
    p.add_argument("--no-tuned", action="store_true", help="ignore schedules/<target>/ records (hand schedules only)")
    p.add_argument("--prune-beta", type=float, default=None,
                   help="token pruning ratio beta in [0, 1) instead of the checkpoint's schedule (0: no pruning)")
    p.add_argument("--prune-start", type=int, default=None,
                   help="first pruning layer with --prune-beta (default 0: half the depth)")
    p.set_defaults(func=_export)

    p = subparsers.add_parser("run", help="greedy generation with an exported module, locally or over RPC")
    p.add_argument("--module", required=True, help="folder written by `agile-tvm export`")
    p.add_argument("--prompt", default=None, help="text prompt (needs the tokenizer exported with the module)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tracker", default=None, help="RPC tracker HOST:PORT to run on a board")
    p.add_argument("--key", default=None, help="RPC device key of the board (with --tracker)")
    p.set_defaults(func=_run)

    p = subparsers.add_parser("bench", help="end-to-end latency table (Table 4 style) -> results/e2e.json")
    p.add_argument("--modules", nargs="+", required=True, help="exported module folders to time")
    p.add_argument("--tokens", default="128,512,2048", help="prefill lengths")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-depth", type=int, default=128,
                   help="tokens in the KV cache before decode is timed (llama-bench -d); attention grows with it")
    p.add_argument("--peers", default="torch,torch-int8,llama.cpp", help="peer engines to time in the same run")
    p.add_argument("--model", default="smollm2-135m", help="model spec for the peers (agile_tvm.models.load_model)")
    p.add_argument("--rounds", "--repeat", dest="rounds", type=int, default=5,
                   help="interleaved rounds (every engine timed once per round); medians are reported")
    p.add_argument("-o", "--output", default="results/e2e.json")
    p.set_defaults(func=_bench)


def _export(args) -> int:
    from agile_tvm.runtime.export import export

    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise UserError("--max-seq-len must be at least 1")
    if args.prune_start is not None and args.prune_beta is None:
        raise UserError("--prune-start needs --prune-beta (the pruning ratio)")
    export(args.model, args.target, args.output, max_seq_len=args.max_seq_len, tuned=not args.no_tuned,
           prune_beta=args.prune_beta, prune_start=args.prune_start)
    return 0


def connect(tracker: str | None, key: str | None):
    """An RPC session on the board `key` behind `tracker` (HOST:PORT), or None for local runs."""
    if tracker is None:
        if key is not None:
            raise UserError("--key needs --tracker HOST:PORT")
        return None
    if not key:
        raise UserError("--tracker needs --key (the board's device key, e.g. pi4)")
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--tracker {tracker!r} must be HOST:PORT")
    from tvm import rpc

    try:
        return rpc.connect_tracker(host, int(port)).request(key, priority=1, session_timeout=600)
    except Exception as err:  # noqa: BLE001 - connection refused, unknown key, ...
        raise UserError(f"cannot get board {key!r} from tracker {tracker} ({err}): start the boards "
                        f"(scripts/setup-boards) or check the key") from None


def _run(args) -> int:
    import numpy as np

    from agile_tvm.runtime import load_module

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    lm = load_module(args.module, remote=connect(args.tracker, args.key))
    tok = lm.tokenizer
    if args.prompt_ids:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UserError("--prompt-ids must be comma-separated integers") from None
    elif args.prompt is not None:
        if tok is None:
            raise UserError(f"{args.module} has no tokenizer.json (a tiny test model?): pass --prompt-ids instead")
        ids = tok.encode(args.prompt).ids
    else:
        raise UserError("give --prompt TEXT or --prompt-ids 1,2,3")
    eos = lm.manifest.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    out, stats = lm.generate(np.array([ids]), args.max_new_tokens, eos_token_id=eos)
    text = tok.decode(out) if tok is not None else " ".join(map(str, out))
    print(text)
    rate = f"{stats['decode_tok_s']:.1f} tok/s" if stats["decode_tok_s"] else "n/a"
    where = f"board {args.key}" if args.tracker else "local"
    print(f"[{where}] prompt {stats['prompt_tokens']} tokens, prefill {stats['prefill_ms']:.1f} ms, "
          f"{stats['new_tokens']} new tokens, decode {rate}")
    return 0


def _bench(args) -> int:
    from agile_tvm.runtime.bench import run_bench

    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    peers = [p for p in args.peers.split(",") if p.strip()]
    run_bench(args.modules, tokens, args.decode_tokens, peers, args.model, args.rounds, args.output,
              decode_depth=args.decode_depth)
    return 0
