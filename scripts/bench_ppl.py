#!/usr/bin/env python
"""Perplexity of every quantization config on the offline corpora -> results/ppl.json (+ the two PNG plots).

One record per (model, corpus, config, prune_beta, seq_len, windows, protocol):
{"model", "corpus", "config", "seq_len", "windows", "tokens", "protocol", "ppl", "prune_beta", "token_sparsity"}
plus "calibration" and "seconds". Protocols: `all-tokens` (every token scored; a pruned token keeps its last hidden
state) and, for pruned runs, `pruned-labels-dropped` (the paper's code: labels of pruned positions dropped) and
`unpruned-on-kept-labels` (the same config unpruned, scored on exactly the labels the pruned run kept: the pruning
keeps easy tokens, so `pruned-labels-dropped` is only meaningful next to this).

Resumable at window granularity: each finished window's NLL goes to a sidecar (`<out>.partial.json`), and finished
records are skipped, so an interrupted multi-hour run continues where it stopped. Quantized models are saved as
checkpoints under --ckpt-dir and reused across corpora and runs. Pruned variants (`agileq8@0.3` = beta 0.3) reuse
the unpruned checkpoint with the pruning schedule switched on at run time (pruning is a runtime schedule in the
checkpoint contract); `--calibrate-pruned` re-calibrates with pruning active instead (TRIP on X^P, as the paper).

Example (the full issue set is hours of CPU; --max-windows trades coverage for time):
  scripts/bench_ppl.py --corpus handbook --configs fp,w4a16-rtn,w4a16-gptq,w8a8,agileq8,agileq4 --max-windows 40
  scripts/bench_ppl.py --corpus handbook --configs agileq8@0.2,agileq8@0.4,agileq8@0.6 --max-windows 40
  scripts/bench_ppl.py --plots-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="handbook", help="comma-separated: handbook, austen, or text file paths")
    p.add_argument("--configs", default="fp,w4a16-rtn,w4a16-gptq,w8a8,agileq8,agileq4",
                   help="comma-separated config names; NAME@BETA adds token pruning with ratio BETA")
    p.add_argument("--prune-start", type=int, default=0, help="first pruning layer (0: half the depth)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=40, help="0: the whole corpus")
    p.add_argument("--calib-corpus", default="austen")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--calibrate-pruned", action="store_true", help="calibrate pruned variants with pruning on")
    p.add_argument("--ckpt-dir", default=str(ROOT / "out" / "ckpt"))
    p.add_argument("--out", default=str(ROOT / "results" / "ppl.json"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", choices=("torch", "tvm"), default="torch",
                   help="tvm: evaluate quantized configs (pruned ones too) through their compiled module (the "
                        "kernels; about 6x faster than the PyTorch reference, equal to it teacher-forced, tested; "
                        "free-running within ~1%%); fp always uses torch")
    p.add_argument("--plots-only", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def split_config(spec: str) -> tuple[str, float]:
    name, _, beta = spec.partition("@")
    return name, float(beta) if beta else 0.0


def read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def scheme_summary(name: str) -> str:
    """One line that says what a named config was when the record was made (configs change between versions)."""
    from agile_tvm.quant.configs import get_config

    c = get_config(name)
    w = "fp" if c.weight is None else f"w{c.weight.bits}-{c.weight.method}-g{c.weight.group_size}-{c.weight.zero}0"
    a = "fp" if c.act is None else f"a{c.act.bits}-{c.act.granularity}{'-trip' if c.act.trip else ''}"
    if c.act is not None and c.act.smooth:
        a += f"-smooth{c.act.smooth}"
    return f"{w} {a} attn-{'fp' if c.attention is None else 'int8-log2'}"


def scheme_hash(cfg) -> str:
    """8 hex digits of the scheme's knobs: a config whose definition changed never reuses an old checkpoint or old
    per-window results. Knobs added later are left out while they are off, so existing checkpoints keep their key."""
    knobs = {**cfg.to_dict(), "pruning": None}
    if knobs.get("act") and not knobs["act"].get("smooth"):
        knobs["act"] = {k: v for k, v in knobs["act"].items() if k != "smooth"}
    return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]


def record_key(r: dict) -> tuple:
    """A record is redone when its config's scheme or its calibration changed (both are part of the key)."""
    return (r["model"], r["corpus"], r["config"], float(r["prune_beta"]), r["seq_len"], r["windows"], r["protocol"],
            r.get("scheme"), json.dumps(r.get("calibration"), sort_keys=True))


def get_model(args, name: str, beta: float, loaded_cache: dict):
    """The quantized model for config `name` with pruning beta, from the checkpoint cache or freshly quantized."""
    from agile_tvm import corpus
    from agile_tvm.models import load_model
    from agile_tvm.quant.apply import quantize_model
    from agile_tvm.quant.checkpoint import load_quantized, save_quantized
    from agile_tvm.quant.configs import get_config
    from agile_tvm.quant.qmodel import QuantizedCausalLM

    calib_beta = beta if args.calibrate_pruned else 0.0
    cfg = get_config(name)
    cfg.pruning.beta, cfg.pruning.start_layer = calib_beta, args.prune_start
    knobs = scheme_hash(cfg)
    tag = f"{Path(args.model).name}-{name}-{knobs}-c{args.calib_corpus}{args.calib_samples}x{args.calib_seq_len}"
    if calib_beta:
        tag += f"-p{calib_beta}s{args.prune_start}"
    ckpt = Path(args.ckpt_dir) / tag
    if name == "fp":
        if "float" not in loaded_cache:
            loaded_cache["float"] = load_model(args.model)
        qm = quantize_model(loaded_cache["float"], cfg)
    elif (ckpt / "agile_quant.json").is_file():
        qm = load_quantized(ckpt)
    else:
        if "float" not in loaded_cache:
            loaded_cache["float"] = load_model(args.model)
        lm = loaded_cache["float"]
        calib = corpus.calibration_samples(lm.tokenizer, args.calib_samples, args.calib_seq_len,
                                           corpus=args.calib_corpus)
        info = {"corpus": args.calib_corpus, "samples": args.calib_samples, "seq_len": args.calib_seq_len, "seed": 0}
        qm = quantize_model(lm, cfg, calib, progress=True, calibration=info)
        save_quantized(qm, ckpt)
        qm.source = str(ckpt)
        print(f"saved {ckpt} ({json.dumps(qm.manifest.get('calibration'))})", flush=True)
    if beta != calib_beta or beta:
        qcfg = qm.model.qconfig
        qcfg.pruning.beta, qcfg.pruning.start_layer = beta, args.prune_start
        qm.model = QuantizedCausalLM(qm.model.hf, qm.arch, qcfg)
    return qm


def compiled_forward(args, name: str, qm, beta: float):
    """(forward_fn, module) of the config's checkpoint compiled for this CPU, token pruning with `beta` compiled in
    (exported once, cached next to the checkpoint). A pruned forward returns (logits, kept mask) like the torch one."""
    import torch

    from agile_tvm.runtime import load_module
    from agile_tvm.runtime.export import export, module_is_current

    ckpt = Path(qm.source)
    suffix = f"-p{beta}s{args.prune_start}" if beta else ""
    module_dir = ckpt.with_name(ckpt.name + f"-host-n{args.seq_len}{suffix}")
    manifest = module_dir / "manifest.json"
    if not module_is_current(module_dir):  # none yet, or compiled from other kernels/frontend sources than these
        if manifest.is_file():
            print(f"{module_dir} was compiled from other kernel sources: exporting it again", flush=True)
        export(ckpt, "host", module_dir, max_seq_len=args.seq_len, prune_beta=beta, prune_start=args.prune_start)
        print(f"exported {module_dir}", flush=True)
    lm = load_module(module_dir)
    if lm.prunes:
        return (lambda ids: tuple(torch.from_numpy(a) for a in lm.forward_pruned(ids.numpy()))), lm
    return (lambda ids: torch.from_numpy(lm.forward_logits(ids.numpy()))), lm


def evaluate(args, spec: str, corpus_name: str, records: list, partial: dict, loaded_cache: dict) -> None:
    import torch

    from agile_tvm import corpus
    from agile_tvm.eval import perplexity
    from agile_tvm.quant.pruning import forward_fn_for

    name, beta = split_config(spec)
    qm = None
    tokenizer = loaded_cache.get("tokenizer")
    if tokenizer is None:
        qm = get_model(args, name, beta, loaded_cache)
        tokenizer = loaded_cache["tokenizer"] = qm.tokenizer
    tokens = corpus.token_stream(tokenizer, corpus_name)
    exclude = corpus_name == args.calib_corpus
    windows = corpus.eval_windows(tokens, args.seq_len, args.max_windows or None, exclude_calibration=exclude)
    model_name = Path(args.model).name
    base = {"model": model_name, "corpus": corpus_name, "config": name, "seq_len": args.seq_len,
            "windows": len(windows), "prune_beta": beta, "scheme": scheme_summary(name),
            "calibration": None if name == "fp" else {"corpus": args.calib_corpus, "samples": args.calib_samples,
                                                      "seq_len": args.calib_seq_len}}
    protocols = ["all-tokens"] + (["pruned-labels-dropped", "unpruned-on-kept-labels"] if beta > 0 else [])
    done = {record_key(r) for r in records}
    if all(record_key({**base, "protocol": p}) in done for p in protocols):
        print(f"skip {spec} on {corpus_name}: already in {args.out}", flush=True)
        return
    qm = qm or get_model(args, name, beta, loaded_cache)
    use_tvm = args.backend == "tvm" and name != "fp"
    from agile_tvm.quant.configs import get_config

    pkey = [model_name, corpus_name, spec, args.seq_len, args.calib_samples, args.calib_seq_len,
            args.calib_corpus, args.prune_start, scheme_hash(get_config(name))]
    pkey = json.dumps(pkey + ["tvm"] if use_tvm else pkey)  # the backends differ in float noise: never mixed
    per_window = partial.setdefault(pkey, [])
    forward = forward_fn_for(qm.model)
    backend = "torch"
    sparsity_of = qm.model
    if use_tvm:
        (forward, sparsity_of), backend = compiled_forward(args, name, qm, beta), "tvm"
    base["backend"] = backend
    if name == "fp" and beta == 0:  # Hugging Face's own forward (sdpa) is faster and equal (tested)
        from agile_tvm.eval import hf_forward_fn

        forward = hf_forward_fn(qm.model.hf)
    reference = None
    if beta > 0:  # the unpruned config, scored on the labels the pruned run kept (same backend)
        reference = (compiled_forward(args, name, qm, 0.0)[0] if use_tvm
                     else forward_fn_for(get_model(args, name, 0.0, loaded_cache).model))
    todo = [w for w in range(len(windows)) if w >= len(per_window) or (reference and "nll_ref" not in per_window[w])]
    for w in todo:  # new windows, and windows measured before the unpruned-on-kept protocol existed (redone)
        r = perplexity(forward, windows[w:w + 1], progress=False, reference_fn=reference)
        entry = {"nll": math.log(r["ppl"]) * r["tokens"], "n": r["tokens"],
                 "sparsity": getattr(sparsity_of, "last_token_sparsity", 0.0), "seconds": r["seconds"]}
        if "ppl_pruned_labels_dropped" in r:
            n_kept = r["tokens_scored_pruned_protocol"]
            entry["nll_kept"], entry["n_kept"] = math.log(r["ppl_pruned_labels_dropped"]) * n_kept, n_kept
            entry["nll_ref"] = math.log(r["ppl_reference_on_kept"]) * n_kept
        if w < len(per_window):
            per_window[w] = entry
        else:
            per_window.append(entry)
        write_json(Path(args.out).with_suffix(".partial.json"), partial)
        print(f"{spec} {corpus_name} window {w + 1}/{len(windows)}: ppl {r['ppl']:.3f} "
              f"({r['seconds']:.0f} s) running ppl {math.exp(sum(e['nll'] for e in per_window) / sum(e['n'] for e in per_window)):.3f}",
              flush=True)
    per_window = per_window[:len(windows)]  # the sidecar may hold more windows from a longer run
    sparsity = sum(e["sparsity"] for e in per_window) / len(per_window)
    common = {**base, "token_sparsity": round(sparsity, 5),
              "seconds": round(sum(e["seconds"] for e in per_window), 1)}
    n_all = sum(e["n"] for e in per_window)
    new = [{**common, "protocol": "all-tokens", "tokens": n_all,
            "ppl": math.exp(sum(e["nll"] for e in per_window) / n_all)}]
    if beta > 0:
        n_kept = sum(e["n_kept"] for e in per_window)
        new.append({**common, "protocol": "pruned-labels-dropped", "tokens": n_kept,
                    "ppl": math.exp(sum(e["nll_kept"] for e in per_window) / n_kept)})
        new.append({**common, "protocol": "unpruned-on-kept-labels", "tokens": n_kept,
                    "ppl": math.exp(sum(e["nll_ref"] for e in per_window) / n_kept)})
    records[:] = [r for r in records if record_key(r) not in {record_key(n) for n in new}] + new
    write_json(Path(args.out), records)  # the sidecar keeps its windows: a longer run later starts after them
    for r in new:
        print(json.dumps(r), flush=True)
    del torch


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    records = read_json(out, [])
    if not args.plots_only:
        partial = read_json(out.with_suffix(".partial.json"), {})
        loaded_cache: dict = {}
        for corpus_name in args.corpus.split(","):
            for spec in args.configs.split(","):
                evaluate(args, spec.strip(), corpus_name.strip(), records, partial, loaded_cache)
    if not args.no_plots:
        from plot_ppl import plot_outliers, plot_sparsity

        plot_sparsity(records, out.parent / "ppl_vs_token_sparsity.png")
        if not (out.parent / "activation_outliers.png").is_file():
            plot_outliers(args.model, out.parent / "activation_outliers.png")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
