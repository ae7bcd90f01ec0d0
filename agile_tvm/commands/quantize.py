"""`agile-tvm quantize`: float model -> quantized checkpoint (docs/checkpoint.md), with tqdm progress per layer."""

from __future__ import annotations

import json

from agile_tvm.errors import UserError

CALIB_SAMPLES, CALIB_SEQ_LEN = 16, 512  # 8k tokens: SmolLM2-135M quantizes in ~5 min of one core (BENCHMARKS.md)


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model (GPTQ weights, TRIP activations, log2 softmax, pruning)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a Hugging Face folder, or a .gguf file")
    p.add_argument("--config", default="agileq8",
                   help="fp, w4a16-rtn, w4a16-gptq, w8a8, agileq8 (W4A8), agileq4 (W4A8 + INT4 attention output)")
    p.add_argument("--w-bits", type=int, default=None, help="override the weight bits (4 or 8)")
    p.add_argument("--a-bits", type=int, default=None, help="override the activation bits (4 or 8)")
    p.add_argument("--group-size", type=int, default=None, help="weight group size (-1: per output channel)")
    p.add_argument("--trip-k", type=int, default=None,
                   help="TRIP: largest power-of-two exponent per channel (0 turns TRIP off; with --smooth: its cap)")
    p.add_argument("--smooth", type=float, default=None,
                   help="power-of-two smoothing of outlier channels for per-token activations: the quantile of the "
                        "channel maxima above which channels are scaled down (w8a8 default 0.99; 0 turns it off)")
    p.add_argument("--act-granularity", choices=("token", "tensor"), default=None,
                   help="activation scales: per token at run time (default configs) or static layer-wise (paper)")
    p.add_argument("--w-zero", choices=("float", "int"), default=None,
                   help="weight zero point: a float offset per group (default 4-bit configs) or an integer code")
    p.add_argument("--scale-grid", choices=("float", "pow2"), default=None,
                   help="weight group scales/offsets: any float, or on a per-row power-of-two grid (2^e * integer), "
                        "which the x86 prefill GEMM sums in integers (faster; needs --w-zero float)")
    p.add_argument("--prune-beta", type=float, default=0.0, help="fraction of tokens pruned by the last layer")
    p.add_argument("--prune-start", type=int, default=0, help="first pruning layer (0: half the depth)")
    p.add_argument("--calib-corpus", default="austen", help="handbook, austen, or a UTF-8 text file")
    p.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES)
    p.add_argument("--calib-seq-len", type=int, default=CALIB_SEQ_LEN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.set_defaults(func=run)


def resolve_config(args):
    """The named config with the command-line overrides applied and validated."""
    from agile_tvm.quant.configs import get_config

    cfg = get_config(args.config)

    def section(part: str, flag: str):
        """The config's weight or act part, or a one-line error when the config leaves that part float."""
        value = getattr(cfg, part)
        if value is None:
            what, fix = (("weights", "a quantized config") if part == "weight"
                         else ("activations", "w8a8/agileq8/agileq4"))
            raise UserError(f"config '{args.config}' has float {what}: {flag} needs {fix}")
        return value

    if args.w_bits is not None:
        w = section("weight", "--w-bits")
        w.bits, w.symmetric = args.w_bits, w.symmetric or args.w_bits == 8
    if args.a_bits is not None:
        section("act", "--a-bits").bits = args.a_bits
    if args.group_size is not None:
        section("weight", "--group-size").group_size = args.group_size
    if args.smooth is not None:
        section("act", "--smooth").smooth = args.smooth
    if args.trip_k is not None:
        a = section("act", "--trip-k")
        # with smoothing on, K only caps its exponents; otherwise it switches TRIP on (K > 0) or off
        a.trip_k, a.trip = args.trip_k, args.trip_k > 0 and not a.smooth
    if args.act_granularity is not None:
        section("act", "--act-granularity").granularity = args.act_granularity
    if args.w_zero is not None:
        section("weight", "--w-zero").zero = args.w_zero
    if getattr(args, "scale_grid", None) is not None:
        section("weight", "--scale-grid").scale_grid = args.scale_grid
    cfg.pruning.beta = args.prune_beta
    cfg.pruning.start_layer = args.prune_start
    return cfg.validate()


def run(args) -> int:
    from agile_tvm import corpus
    from agile_tvm.models import load_model
    from agile_tvm.quant.apply import quantize_model
    from agile_tvm.quant.checkpoint import save_quantized

    cfg = resolve_config(args)
    loaded = load_model(args.model)
    if cfg.pruning.beta > 0 and args.prune_start >= _num_layers(loaded.model):
        raise UserError(f"--prune-start {args.prune_start} is past the last layer ({_num_layers(loaded.model) - 1})")
    calib = None
    needs_calib = cfg.weight is not None or cfg.attention is not None
    if needs_calib:
        if args.calib_samples < 1 or args.calib_seq_len < 2:
            raise UserError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
        if loaded.tokenizer is None:
            raise UserError(f"model {args.model} has no tokenizer to read the calibration corpus: add tokenizer files")
        calib = corpus.calibration_samples(loaded.tokenizer, args.calib_samples, args.calib_seq_len, args.seed,
                                           corpus=args.calib_corpus)
    info = {"corpus": args.calib_corpus, "samples": args.calib_samples if needs_calib else 0,
            "seq_len": args.calib_seq_len if needs_calib else 0, "seed": args.seed}
    qm = quantize_model(loaded, cfg, calib, progress=True, calibration=info)
    out = save_quantized(qm, args.out)
    print(json.dumps({"out": str(out), "config": cfg.name, "model": loaded.name,
                      "calibration": qm.manifest.get("calibration", {}),
                      "pruning_layers": qm.model.prune_layers, "gamma": round(qm.model.gamma, 5)}, indent=2))
    return 0


def _num_layers(model) -> int:
    cfg = model.config
    return getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
