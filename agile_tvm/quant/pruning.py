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

import math

import torch


def keep_count(n: int, gamma: float) -> int:
    """Tokens kept out of n by one pruning layer (at least 1: the first token)."""
    return max(1, math.ceil((1.0 - gamma) * n - 1e-9))


def schedule_counts(seq_len: int, num_layers: int, prune_layers: list[int], gamma: float) -> list[int]:
    """Tokens processed by each layer for a sequence of seq_len tokens."""
    n, counts = seq_len, []
    for layer in range(num_layers):
        if layer in prune_layers:
            n = keep_count(n, gamma)
        counts.append(n)
    return counts


def token_sparsity(counts: list[int], seq_len: int) -> float:
    return 1.0 - sum(counts) / (len(counts) * seq_len)


def select_tokens(kept: torch.Tensor, scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Positions [B, n_keep] to keep from `kept` [B, n] (sorted positions) by `scores` [B, n]; first always kept."""
    if n_keep >= kept.shape[1]:
        return kept
    scores = scores.clone()
    scores[:, 0] = float("inf")  # kept[:, 0] is the first token of the sequence
    top = torch.topk(scores, n_keep, dim=1).indices
    top, _ = torch.sort(top, dim=1)
    return torch.gather(kept, 1, top)


def forward_fn_for(model):
    """An `eval.perplexity` forward_fn for a QuantizedCausalLM: logits, or (logits, kept) when it prunes tokens."""

    def forward(ids):
        logits, kept = model(ids)
        return (logits, kept) if model.prune_layers else logits

    return forward
