"""How many tokens each layer processes under token pruning (paper eq. 9-10), in plain Python.

It lives apart from `agile_tvm.quant.pruning` because the TVM runtime side (a process with only the runtime and
numpy) computes the same per-layer counts for a compiled module, and must not import torch for it.
"""

from __future__ import annotations

import math


def prune_layers(beta: float, start_layer: int, end_layer: int, num_layers: int) -> list[int]:
    """The layers that prune: start_layer .. end_layer (-1: the last), start 0 meaning half the depth.

    Default start: half the depth. Attention to the first token is high from about there on (SmolLM2: 0.3-0.67 in
    layers 12-29), and a pruned token's hidden state stops at the layer it was pruned before, so pruning early makes
    its (all-tokens protocol) prediction much worse. Never layer 0: pruning needs a previous layer's attention.
    """
    if beta <= 0:
        return []
    start = start_layer if start_layer > 0 else max(1, num_layers // 2)
    end = num_layers if end_layer < 0 else min(end_layer + 1, num_layers)
    return list(range(start, end))


def prune_gamma(beta: float, m: int) -> float:
    """Eq. 9: the fraction each of the m pruning layers removes, so that beta of the tokens are gone after the last."""
    return 0.0 if m == 0 else 1.0 - (1.0 - beta) ** (1.0 / m)


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
    """Eq. 10, normalised: 1 - (tokens processed, summed over layers) / (layers * tokens)."""
    return 1.0 - sum(counts) / (len(counts) * seq_len)
