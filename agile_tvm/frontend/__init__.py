"""Relax frontend: a quantized checkpoint (docs/checkpoint.md) becomes a Relax IRModule with prefill/decode functions.

    from agile_tvm.frontend import build_module
    mod, weights, meta = build_module("ckpt_dir", max_seq_len=2048, target="host")

`mod` has `forward_all` (all logits, no cache), `prefill` and `decode` (KV cache, last-token logits) and
`create_kv_cache`
(see `graph.py`); `weights` is the ordered dict of numpy arrays the functions take after their inputs, already in
the kernels' layout; `meta` is the JSON-able model description the runtime needs (with "pruning", the token pruning
schedule the module runs, or None; see graph.py).
"""

from __future__ import annotations

ARCHS = ("llama", "opt", "bloom")


def model_class(arch: str):
    from agile_tvm.errors import UserError

    if arch == "llama":
        from agile_tvm.frontend.llama import Llama

        return Llama
    if arch == "opt":
        from agile_tvm.frontend.opt import Opt

        return Opt
    if arch == "bloom":
        from agile_tvm.frontend.bloom import Bloom

        return Bloom
    raise UserError(f"architecture {arch!r} is not supported by the TVM frontend: use one of {', '.join(ARCHS)}")


def build_module(ckpt, max_seq_len: int | None = None, target="host", taps: bool = False,
                 prune_beta: float | None = None, prune_start: int | None = None, tuned: bool = True):
    """(IRModule, weights: dict[str, np.ndarray], meta: dict) for a checkpoint folder or a loaded Checkpoint.

    `target` (a name of `agile_tvm.targets`, a dict or a Target; None = "host") picks the kernels' layouts and
    schedules, so the weights come out packed for it: compile the module for the same target.
    `taps=True` (tests, debugging): forward_all returns (logits, *tapped values), named in meta["taps"] (e.g.
    "P:in", the input of integer linear P).
    Token pruning follows the checkpoint's schedule, or `prune_beta` (and `prune_start`, 0: half the depth) instead
    (`checkpoint.prune_schedule`); meta["pruning"] holds the schedule the module runs (None: no pruning).
    `tuned=False`: the static kernels keep their hand schedules even where `schedules/<target>/` has records."""
    from agile_tvm.frontend.checkpoint import Checkpoint, load_checkpoint, prune_schedule
    from agile_tvm.frontend.graph import GraphBuilder, decode_weight_bytes

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    model = model_class(ckpt.arch)(ckpt.config)
    pruning = prune_schedule(ckpt, model.num_layers, beta=prune_beta, start_layer=prune_start)
    limit = int(ckpt.config.get("max_position_embeddings") or ckpt.config.get("seq_length") or 2048)
    max_seq_len = int(max_seq_len or min(limit, 2048))
    g = GraphBuilder(ckpt, max_seq_len, target=target, pruning=pruning)
    if not tuned:
        g._schedule_records = None  # no lookups in schedules/ (LinearEmitter._tuned_kernel)
    if taps:
        g.taps = []
    mod = g.build(model)
    meta = {
        "arch": ckpt.arch,
        "scheme": ckpt.scheme,
        "source_model": ckpt.manifest.get("source_model"),
        "max_seq_len": max_seq_len,
        "num_layers": model.num_layers,
        "vocab_size": model.vocab,
        "kv_dtype": model.kv_dtype(ckpt),
        "weights": list(g.weights.arrays),
        # the compiled functions skip checking their weights at every call (graph.with_num_inputs): the runtime
        # checks these once at load
        "weight_specs": [[list(a.shape), str(a.dtype)] for a in g.weights.arrays.values()],
        "pruning": pruning.to_dict() if pruning is not None else None,
        "decode_weight_bytes": decode_weight_bytes(mod, g.weights),
    }
    if taps:
        meta["taps"] = list(g.tap_names)
    return mod, g.weights.arrays, meta
