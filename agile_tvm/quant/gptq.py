"""GPTQ (Frantar et al. 2022), written from the algorithm: quantize weight columns one at a time and push each
column's error onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs.

H = 2/n * sum_x x x^T over the calibration inputs x (as the linear sees them: after activation quantization and
with the TRIP factors folded in). Steps: dampen (H += percdamp * mean(diag H) * I), optionally reorder columns by
descending diag H ("act order"), take the upper Cholesky factor of H^-1, then for blocks of `blocksize` columns
(lazy batch updates) quantize column by column, spread the error inside the block, and apply the block's
accumulated update to the remaining columns with one matmul.

Groups: the checkpoint contract indexes group params by original column (`k // g`), so with act order the group
scales/zeros are fixed before the pass from the original weights ("static groups"); without act order they are
computed when the pass reaches each group, from the already-updated weights, as the reference implementation does.
Dead inputs (diag H == 0) get their weights zeroed, since no calibration input ever reaches them.
"""

from __future__ import annotations

import torch

from agile_tvm.errors import UserError
from agile_tvm.quant.quantizers import (WeightCodes, pow2_grid_exponent, quantize_weight, resolve_group_size,
                                          snap_to_pow2_grid, weight_params)


class HessianAccumulator:
    """Running H = 2/n sum x x^T over batches of inputs [..., K], in float64 for a well-conditioned Cholesky."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h += (x.T @ x).to(torch.float64)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int = -1, symmetric: bool = False,
                  act_order: bool = True, percdamp: float = 0.01, blocksize: int = 128,
                  float_zero: bool = False, scale_grid: str = "float") -> WeightCodes:
    """Quantize `w` [N, K] with Hessian `h` [K, K]: codes [N, K], scale/zero/offset [N, G].

    ``scale_grid="pow2"`` (float offsets): each row's group scales and offsets are rounded onto its power-of-two
    grid (``quantizers.snap_to_pow2_grid``) before the pass, so GPTQ compensates for that rounding too; dynamic
    groups take the row's grid exponent from the original weights' group params."""
    w = w.detach().to(torch.float64).clone()
    n, k = w.shape
    g = resolve_group_size(group_size, k)
    h = h.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    def group_params(cols: torch.Tensor):
        s, z, o = weight_params(cols.float(), bits, symmetric, float_zero)
        return s.double(), z.double(), o.double()

    scales = torch.zeros(n, k // g, dtype=torch.float64)
    zeros = torch.zeros(n, k // g, dtype=torch.float64)
    offsets = torch.zeros(n, k // g, dtype=torch.float64)
    static = act_order and g < k
    grid_e = None
    if scale_grid == "pow2" and not float_zero:
        raise UserError('scale_grid "pow2" needs float weight offsets (zero "float")')
    if static or g == k or scale_grid == "pow2":
        for gi in range(k // g):
            scales[:, gi], zeros[:, gi], offsets[:, gi] = group_params(w[:, gi * g:(gi + 1) * g])
        if scale_grid == "pow2":
            grid_e = pow2_grid_exponent(scales, offsets)
            scales, offsets = snap_to_pow2_grid(scales, offsets, grid_e)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w = w[:, perm]
    h = h[perm][:, perm]

    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(k, dtype=torch.float64)
    hinv = _upper_cholesky_of_inverse(h)

    q = torch.zeros_like(w)
    for b0 in range(0, k, blocksize):
        b1 = min(b0 + blocksize, k)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = perm[b0 + i].item()
            gi = col // g
            if not static and g < k and col % g == 0:
                # dynamic groups (no act order): params from the current, already error-compensated weights
                # (as the reference: the block's in-flight updates are not yet in w)
                scales[:, gi], zeros[:, gi], offsets[:, gi] = group_params(w[:, col:col + g])
                if grid_e is not None:
                    sg, og = snap_to_pow2_grid(scales[:, gi:gi + 1], offsets[:, gi:gi + 1], grid_e)
                    scales[:, gi], offsets[:, gi] = sg[:, 0], og[:, 0]
            s, z, o = scales[:, gi], zeros[:, gi], offsets[:, gi]
            wc = w1[:, i]
            qc = quantize_weight(wc[:, None], s, z, bits, o)[:, 0]
            q[:, b0 + i] = qc
            deq = s * (qc - z) + o
            e = (wc - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]

    inv = torch.argsort(perm)
    q = q[:, inv]
    return WeightCodes(q.to(torch.float32), scales.to(torch.float32), zeros.to(torch.float32),
                       offsets.to(torch.float32))


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1; retries with more dampening if H is not positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    extra = 0.0
    for _ in range(6):
        try:
            l = torch.linalg.cholesky(h + extra * eye)
            hinv = torch.cholesky_inverse(l)
            return torch.linalg.cholesky(hinv, upper=True)
        except RuntimeError:
            extra = max(extra * 10, 1e-6 * torch.mean(torch.diag(h)).item())
    raise RuntimeError("GPTQ: Hessian is not positive definite even after extra dampening")
