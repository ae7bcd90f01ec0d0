#!/usr/bin/env python
"""The two figures of the perplexity study, from results/ppl.json and the float model.

- `ppl_vs_token_sparsity.png`: token sparsity (eq. 10) vs perplexity for the pruned agileq8 runs, both protocols,
  with the float and unpruned agileq8 perplexities as references (like the paper's Fig. 7);
- `activation_outliers.png`: per-channel max |x| of linear inputs of SmolLM2 (q_proj and down_proj of a middle and
  a late layer) on one handbook window, the outlier channels TRIP's power-of-two factors are for.
Usage: scripts/plot_ppl.py [--records results/ppl.json] [--outliers]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plot_sparsity(records: list, path: Path, corpus: str = "handbook", config: str = "agileq8") -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["corpus"] == corpus and r["config"] == config and r["seq_len"] == 2048]
    if not runs:
        return False
    # compare like with like: the window count with the most pruned runs (ties: the larger count)
    pruned = [r["windows"] for r in runs if r["prune_beta"] > 0] or [r["windows"] for r in runs]
    windows = max(set(pruned), key=lambda w: (pruned.count(w), w))
    runs = [r for r in runs if r["windows"] == windows]
    calib = next((r.get("calibration") for r in runs if r["prune_beta"] > 0), None)
    runs = [r for r in runs if calib is None or r.get("calibration") == calib]  # one calibration per curve
    fig, ax = plt.subplots(figsize=(6, 4))
    for protocol, style in (("all-tokens", "o-"), ("pruned-labels-dropped", "s--"), ("unpruned-on-kept-labels", "^:")):
        pts = sorted((r["token_sparsity"], r["ppl"]) for r in runs
                     if r["protocol"] == protocol or (r["prune_beta"] == 0 and r["protocol"] == "all-tokens"))
        if len(pts) > 1 or protocol == "all-tokens":
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{config}, {protocol}")
    fp = [r for r in records if r["corpus"] == corpus and r["config"] == "fp" and r["windows"] == windows
          and r["seq_len"] == 2048]
    if fp:
        ax.axhline(fp[0]["ppl"], color="gray", linestyle=":", label=f"fp32 ({fp[0]['ppl']:.2f})")
    ax.set_yscale("log")  # all-tokens perplexity grows by orders of magnitude with pruning
    ax.set_xlabel("token sparsity (eq. 10)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"SmolLM2-135M, {corpus}, seq 2048, {windows} windows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_outliers(model_spec: str, path: Path, seq_len: int = 512) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    sys.path.insert(0, str(ROOT))
    from agile_tvm import corpus
    from agile_tvm.models import load_model

    lm = load_model(model_spec)
    n = lm.model.config.num_hidden_layers
    picks = [(n // 2, "self_attn.q_proj"), (n - 2, "self_attn.q_proj"), (n // 2, "mlp.down_proj"),
             (n - 2, "mlp.down_proj")]
    stats, hooks = {}, []
    for layer, sub in picks:
        mod = lm.model.model.layers[layer].get_submodule(sub)
        key = f"layer {layer} {sub.split('.')[-1]} input"
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, key=key: stats.__setitem__(key, a[0].detach().abs().amax(dim=(0, 1)))))
    ids = corpus.eval_windows(corpus.token_stream(lm.tokenizer, "handbook"), seq_len, 1)
    with torch.no_grad():
        lm.model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    fig, axes = plt.subplots(len(stats), 1, figsize=(8, 2.2 * len(stats)))
    for ax, (key, v) in zip(axes, stats.items()):
        med = v.median().item()
        ax.plot(range(len(v)), v.numpy(), linewidth=0.7)  # a line keeps single-channel spikes visible
        top = int(v.argmax())
        ax.annotate(f"ch {top}", (top, v[top].item()), fontsize=7, color="red")
        ax.set_yscale("log")
        ax.set_title(f"{key}: max {v.max().item():.0f} = {v.max().item() / med:.0f}x the median channel "
                     f"({med:.2f})", fontsize=9)
        ax.set_ylabel("max |x|")
    axes[-1].set_xlabel("channel")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--records", default=str(ROOT / "results" / "ppl.json"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--outliers", action="store_true", help="also (re)draw the activation outlier figure")
    args = p.parse_args()
    records = json.loads(Path(args.records).read_text()) if Path(args.records).is_file() else []
    out = Path(args.records).parent
    if plot_sparsity(records, out / "ppl_vs_token_sparsity.png"):
        print(out / "ppl_vs_token_sparsity.png")
    if args.outliers:
        plot_outliers(args.model, out / "activation_outliers.png")
        print(out / "activation_outliers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
