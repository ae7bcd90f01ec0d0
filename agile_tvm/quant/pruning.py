"""Token pruning by attention to the first token (paper eq. 9-10), for a batch of equal-length sequences.

Schedule: the pruning layers are `start_layer .. end_layer` (m layers); before each, every sequence keeps
`ceil((1 - gamma) * n)` of its n remaining tokens, gamma = 1 - (1 - beta)^(1/m), so about beta of the tokens are
gone after the last one. Importance of a token = `sum_h p[h, i, 0]` from the previous layer (its attention to the
first token); the first token itself is always kept and the order of the kept tokens is preserved.
A pruned token keeps its last hidden state, which goes through the final norm and LM head like any other, so the
perplexity can score every token; `kept_mask` says which tokens reached the last layer (paper protocol: drop the
others' labels).
Token sparsity (eq. 10, normalised): 1 - (sum over layers of tokens processed) / (layers * tokens).
"""

from __future__ import annotations

import torch

from agile_tvm.prune_schedule import keep_count, schedule_counts, token_sparsity  # noqa: F401 (re-exported)


def select_tokens(kept: torch.Tensor, scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Positions [B, n_keep] to keep from `kept` [B, n] (sorted positions) by `scores` [B, n]; first always kept.

    Equal scores are common (sums of log2-quantized probabilities), so the order is defined, not left to topk:
    higher score first, and among equal scores the earlier token. The compiled prefill selects the same way.
    """
    if n_keep >= kept.shape[1]:
        return kept
    scores = scores.clone()
    scores[:, 0] = float("inf")  # kept[:, 0] is the first token of the sequence
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n_keep]
    top, _ = torch.sort(top, dim=1)
    return torch.gather(kept, 1, top)


def forward_fn_for(model):
    """An `eval.perplexity` forward_fn for a QuantizedCausalLM: logits, or (logits, kept) when it prunes tokens."""

    def forward(ids):
        logits, kept = model(ids)
        return (logits, kept) if model.prune_layers else logits

    return forward
