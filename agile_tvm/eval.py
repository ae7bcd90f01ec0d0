"""Perplexity over fixed windows, the same for every backend (eager torch, quantized reference, TVM runtime).

`forward_fn(ids[1, L])` returns logits [1, L, V], or `(logits, kept[1, L])` when token pruning dropped tokens from
the last layers. Every token is scored either way (a pruned token's logits come from its last hidden state: the
`all-tokens` protocol, agile-tvm's headline); with a kept mask the paper's protocol, where labels of pruned positions
are dropped, is reported beside it as `pruned-labels-dropped`.
"""

from __future__ import annotations

import math
import time


def perplexity(forward_fn, windows, progress: bool = True, desc: str = "perplexity", reference_fn=None) -> dict:
    """Perplexity of `forward_fn` over `windows` [W, L] (next-token NLL over the L-1 targets of each window).

    A pruned `forward_fn` returns (logits, kept): then the paper's protocol (labels of pruned positions dropped) is
    reported too. It scores a subset the pruning chose, which favours easy tokens; `reference_fn` (the unpruned
    model) scored on exactly that subset is the fair comparison (`ppl_reference_on_kept`)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    nll_all, n_all = 0.0, 0
    nll_kept, n_kept, any_mask = 0.0, 0, False
    nll_ref = 0.0
    kept_total, slots_total = 0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in tqdm(windows, desc=desc, unit="win", disable=not progress):
            out = forward_fn(ids.unsqueeze(0))
            logits, kept = out if isinstance(out, tuple) else (out, None)
            losses = F.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="none").double()
            nll_all += losses.sum().item()
            n_all += losses.numel()
            if kept is not None:
                any_mask = True
                mask = kept[0, :-1].bool()
                nll_kept += losses[mask].sum().item()
                n_kept += int(mask.sum())
                if reference_fn is not None:
                    ref = reference_fn(ids.unsqueeze(0))
                    ref = ref[0] if isinstance(ref, tuple) else ref
                    ref_losses = F.cross_entropy(ref[0, :-1].float(), ids[1:], reduction="none").double()
                    nll_ref += ref_losses[mask].sum().item()
                kept_total += int(kept.sum())
                slots_total += kept.numel()
    result = {
        "ppl": math.exp(nll_all / n_all),
        "tokens": n_all,
        "windows": len(windows),
        "seq_len": int(windows.shape[1]),
        "seconds": time.perf_counter() - start,
    }
    if any_mask:
        result["ppl_pruned_labels_dropped"] = math.exp(nll_kept / max(n_kept, 1))
        result["tokens_scored_pruned_protocol"] = n_kept
        result["kept_fraction_last_layer"] = kept_total / max(slots_total, 1)
        if reference_fn is not None:
            result["ppl_reference_on_kept"] = math.exp(nll_ref / max(n_kept, 1))
    return result


def hf_forward_fn(model):
    """forward_fn for a plain Hugging Face causal LM."""

    def forward(ids):
        return model(input_ids=ids, use_cache=False).logits

    return forward
