"""How many tokens each layer processes under token pruning (paper eq. 9-10), in plain Python.

It lives apart from `agile_tvm.quant.pruning` because the TVM runtime side (a process with only the runtime and
numpy) computes the same per-layer counts for a compiled module, and must not import torch for it.
"""

from __future__ import annotations

import math


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
