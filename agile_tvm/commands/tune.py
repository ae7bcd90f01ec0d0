"""`agile-tvm tune` and `agile-tvm schedules export` (see agile_tvm/tune/)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="tune kernels with MetaSchedule on RPC boards (resumable)")
    p.add_argument("--target", required=True, help="x86-avx512 | x86-avx2 | sd870 | pi4")
    p.add_argument("--tracker", default="127.0.0.1:9190", help="HOST:PORT of the tracker")
    p.add_argument("--key", required=True, help="tracker key of the boards to measure on")
    p.add_argument("--trials", type=int, required=True, help="trials per kernel (a resumed run adds the rest)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--kernels", nargs="+", default=None,
                      help="kernel names, e.g. w4a8_n576_k576_m128 matmul_m64_n64_k64")
    what.add_argument("--model", default=None,
                      help="an agile-tvm checkpoint (or smollm2-135m: the newest agileq8 one in out/ckpt/): the "
                           "decode kernels the frontend emits for it and a static M=512 proxy of each prefill one; "
                           "a Hugging Face folder (config.json): the v1 W4A8 linear shapes at M=1 and 128")
    p.add_argument("--work-dir", default=None, help="database folder (default tune_logs/<target>)")
    p.add_argument("--trials-per-iter", type=int, default=16)
    p.add_argument("--population", type=int, default=128, help="evolutionary search population")
    p.add_argument("--board-wait", type=float, default=120.0,
                   help="seconds to wait for a board to (re)appear under the key before giving up")
    p.add_argument("--num-cores", type=int, default=None, help="cores of the board (default per target)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--space", choices=("hand", "generic"), default="hand",
                   help="hand: the kernels' hand schedule with each value of its tile and K-chunk parameters (the "
                        "default; tuned >= hand by construction); generic: MetaSchedule's own LLVM rules")
    p.set_defaults(func=run_tune)

    s = subparsers.add_parser("schedules", help="manage the curated tuned schedules in schedules/<target>/")
    ssub = s.add_subparsers(dest="schedules_command", metavar="ACTION")
    e = ssub.add_parser("export", help="curate the best verified record per kernel from tune_logs/ into schedules/")
    e.add_argument("--target", required=True)
    e.add_argument("--work-dir", default=None, help="tuning database (default tune_logs/<target>)")
    e.add_argument("--out", default=None, help="output folder (default schedules/<target>)")
    e.add_argument("--no-verify", action="store_true",
                   help="skip checking each best schedule against the untuned kernel (x86 targets run it here)")
    e.add_argument("--keep-slower", action="store_true",
                   help="also export records that measure slower here than the kernels' hand schedule")
    e.add_argument("--model", default=None,
                   help="quantized checkpoint that was tuned (`agile-tvm tune --model`): build its model with the "
                        "hand schedules and with the records, time both here, and export a phase's records "
                        "(prefill, decode) only if that phase runs faster with them; kernel-level gains do not "
                        "always survive in the model (x86 targets this CPU runs)")
    e.add_argument("--model-rounds", type=int, default=11,
                   help="timing rounds of the model check (each: hand, tuned, tuned, hand)")
    e.set_defaults(func=run_export)
    s.set_defaults(func=lambda args: (s.print_help(), 2)[1])


def run_tune(args) -> int:
    from pathlib import Path

    from agile_tvm.tune.tuner import TuneOptions, tune

    kernels, specs = model_kernels(args.model or "smollm2-135m", args.target) if not args.kernels else (args.kernels,
                                                                                                      {})
    opts = TuneOptions(target=args.target, tracker=args.tracker, key=args.key, trials=args.trials, kernels=kernels,
                       kernel_specs=specs, work_dir=Path(args.work_dir) if args.work_dir else None,
                       trials_per_iter=args.trials_per_iter, population=args.population, board_wait=args.board_wait,
                       num_cores=args.num_cores, seed=args.seed, space=args.space)
    tune(opts)
    return 0


def model_kernels(model: str, target_name: str) -> tuple[list[str], dict]:
    """(kernel names, frontend specs) of `--model`: the frontend's static kernels for a checkpoint, else the v1
    shapes of the config."""
    import sys

    from agile_tvm.tune.workloads import find_checkpoint, frontend_kernels, model_config, model_kernel_names

    ckpt = find_checkpoint(model)
    if ckpt is None:
        if model in ("smollm2-135m", "smollm2"):
            print("no SmolLM2 agileq8 checkpoint in out/ckpt/: tuning the v1 W4A8 shapes of its config",
                  file=sys.stderr)
        return model_kernel_names(model_config(model)), {}
    specs = frontend_kernels(ckpt, target_name)
    print(f"{len(specs)} static kernel(s) of {ckpt} on {target_name}", file=sys.stderr)
    return list(specs), specs


def run_export(args) -> int:
    from pathlib import Path

    from agile_tvm.tune.export import export_schedules

    from agile_tvm.quant.checkpoint import read_manifest

    model = Path(args.model) if args.model else None
    if model is not None:
        read_manifest(model)  # a clear error now, not after minutes of re-measuring kernels
    export_schedules(args.target, work_dir=Path(args.work_dir) if args.work_dir else None,
                     out_dir=Path(args.out) if args.out else None, verify=not args.no_verify,
                     beat_hand=not args.keep_slower, model=model, model_rounds=args.model_rounds)
    return 0
