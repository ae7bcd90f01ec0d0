"""`agile-tvm eval`: perplexity of a float model or a quantized checkpoint, through torch or the TVM runtime."""

from __future__ import annotations

import json
from pathlib import Path

from agile_tvm.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity on a corpus (float model, quantized checkpoint, or exported module)")
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m, a Hugging Face folder, a .gguf file, a quantized checkpoint folder, "
                        "or (with --backend tvm) an exported module folder")
    p.add_argument("--corpus", default="handbook", help="handbook, austen, or a UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--backend", choices=["torch", "tvm"], default="torch",
                   help="torch: the PyTorch reference; tvm: the compiled module through the TVM runtime")
    p.add_argument("--target", default="host", help="with --backend tvm and a checkpoint: target to compile for")
    p.add_argument("--out", default=None, help="append the result record to this JSON file (a list)")
    p.set_defaults(func=run)


def run(args) -> int:
    from agile_tvm import corpus as corpora
    from agile_tvm.eval import perplexity

    evaluator = _load_evaluator(args)
    tokens = corpora.token_stream(evaluator["tokenizer"], args.corpus)
    exclude = args.corpus == "austen" or args.corpus == evaluator.get("calib_corpus")
    windows = corpora.eval_windows(tokens, args.seq_len, args.max_windows, exclude_calibration=exclude)
    result = perplexity(evaluator["forward"], windows, desc=f"eval {args.corpus}")
    record = {
        "model": evaluator["name"], "corpus": args.corpus, "config": evaluator["config"],
        "backend": args.backend, "protocol": "all-tokens", **result,
    }
    print(json.dumps(record, indent=2))
    if args.out:
        _append_record(Path(args.out), record)
    return 0


def _load_evaluator(args) -> dict:
    path = Path(args.model).expanduser()
    is_quantized = (path / "agile_quant.json").is_file()
    if args.backend == "tvm":
        return _tvm_evaluator(path, args.seq_len)
    if is_quantized:
        from agile_tvm.quant.checkpoint import load_quantized

        loaded = load_quantized(path)
        manifest = loaded.manifest
        from agile_tvm.quant.pruning import forward_fn_for

        return {"forward": forward_fn_for(loaded.model), "tokenizer": loaded.tokenizer, "name": loaded.name,
                "config": manifest["scheme"]["name"],
                "calib_corpus": manifest.get("calibration", {}).get("corpus")}
    from agile_tvm.eval import hf_forward_fn
    from agile_tvm.models import load_model

    loaded = load_model(args.model)
    _check_seq_len(loaded.model.config, args.seq_len)
    return {"forward": hf_forward_fn(loaded.model), "tokenizer": loaded.tokenizer, "name": loaded.name,
            "config": "fp"}


def _tvm_evaluator(path: Path, seq_len: int) -> dict:
    """The exported module through the TVM runtime; its tokenizer.json gives the same ids as the source model's."""
    import torch

    from agile_tvm.runtime import load_module

    if not path.is_dir():
        raise UserError(f"--backend tvm needs an exported module folder (from `agile-tvm export`), not '{path}'")
    lm = load_module(path)
    if seq_len > lm.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the module's compiled maximum of {lm.max_seq_len}: "
                        f"use --seq-len <= {lm.max_seq_len} or export again with --max-seq-len {seq_len}")
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))

    def forward(ids):
        return torch.from_numpy(lm.forward_logits(ids.numpy()))

    manifest = lm.manifest
    return {"forward": forward, "tokenizer": tokenizer, "name": manifest.get("model", path.name),
            "config": manifest.get("config", "?"), "calib_corpus": manifest.get("calib_corpus")}


def _check_seq_len(config, seq_len: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} exceeds the model's maximum of {limit} positions: use --seq-len <= {limit}")


def _append_record(path: Path, record: dict) -> None:
    import os

    records = json.loads(path.read_text()) if path.is_file() else []
    records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    os.replace(tmp, path)
