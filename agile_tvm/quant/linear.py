"""`QuantLinear`: a linear layer that holds exactly the checkpoint tensors and computes the contract's math.

This module is the reference the TVM kernels must match (docs/checkpoint.md, "The linear" and "Version 2"):
    xq, s, zp = the activation codes with a layer-wise (v1) or per-row (v2, dynamic) scale and zero point
    acc       = sum_{k in group} (xq - zp) * (q - wzero)                         integer, exact
    y         = s * sum_groups (wscale * acc + wmin * xsum) + bias                float32
`forward` evaluates the same sum as `s * ((xq - zp) @ W.T)` with W dequantized (`wscale * (q - wzero) + wmin`),
one float32 matmul: equal in exact arithmetic, off by float32 summation order only (as the kernels' float epilogue
is), and fast enough to evaluate perplexity on thousands of windows. `int_acc` / `int_xsum` give the exact integer
parts (float64, rounded) for tests and kernel checks.

4-bit codes are packed two per byte: byte j of row n holds q[n, 2j] in bits 0-3 and q[n, 2j+1] in bits 4-7, each
4-bit two's complement.
"""

from __future__ import annotations

import torch
from torch import nn

from agile_tvm.quant.quantizers import ActParams, WeightCodes, dequantize_weight, quantize_act_rows


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes [N, K] (K even) -> uint8 [N, K/2], low nibble = even column."""
    q = q.to(torch.int16)
    if q.shape[1] % 2:
        raise ValueError("pack_int4 needs an even number of columns")
    if int(q.min()) < -8 or int(q.max()) > 7:
        raise ValueError("4-bit codes must lie in [-8, 7]")
    u = q & 0xF
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(b: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> signed codes int8 [N, K] (the inverse of pack_int4)."""
    b = b.to(torch.int16)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.stack([lo, hi], dim=2).reshape(b.shape[0], -1).to(torch.int8)


class QuantLinear(nn.Module):
    """Weight-quantized linear, optionally with quantized inputs (static TRIP or per-token); buffers = checkpoint."""

    def __init__(self, in_features: int, out_features: int, w_bits: int, a_bits: int, group_size: int,
                 bias: bool, act_granularity: str = "tensor", w_zero: str = "int"):
        super().__init__()
        if act_granularity not in ("tensor", "token") or w_zero not in ("int", "float"):
            raise ValueError(f"bad QuantLinear options act={act_granularity!r} w_zero={w_zero!r}")
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.group_size = w_bits, a_bits, group_size
        self.act_granularity, self.w_zero = act_granularity, w_zero
        groups = in_features // group_size
        if w_bits == 4:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("wscale", torch.ones(out_features, groups, dtype=torch.float32))
        self.register_buffer("wzero", torch.zeros(out_features, groups, dtype=torch.int8))
        if w_zero == "float":
            self.register_buffer("wmin", torch.zeros(out_features, groups, dtype=torch.float32))
        else:
            self.wmin = None
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        if a_bits:
            if act_granularity == "tensor":
                self.register_buffer("act_scale", torch.tensor(1.0, dtype=torch.float32))
                self.register_buffer("act_zero", torch.tensor(0, dtype=torch.int32))
            self.register_buffer("act_shift", torch.zeros(in_features, dtype=torch.uint8))
        self._cache = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(cls, w: WeightCodes, w_bits: int, bias: torch.Tensor | None, act: ActParams | None,
                   float_zero: bool = False) -> "QuantLinear":
        n, k = w.codes.shape
        g = k // w.scale.shape[1]
        m = cls(k, n, w_bits, act.bits if act else 0, g, bias is not None,
                act.granularity if act else "tensor", "float" if float_zero else "int")
        codes = w.codes.round().to(torch.int16)
        m.qweight.copy_(pack_int4(codes) if w_bits == 4 else codes.to(torch.int8))
        m.wscale.copy_(w.scale.float())
        m.wzero.copy_(w.zero.round().to(torch.int8))
        if float_zero:
            m.wmin.copy_(w.offset.float())
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        if act is not None:
            if act.granularity == "tensor":
                m.act_scale.copy_(act.scale)
                m.act_zero.copy_(act.zero)
            m.act_shift.copy_(act.shift)
        return m

    def codes(self) -> torch.Tensor:
        """Signed weight codes int8 [N, K]."""
        return unpack_int4(self.qweight) if self.w_bits == 4 else self.qweight

    def act_params(self) -> ActParams | None:
        if not self.a_bits:
            return None
        if self.act_granularity == "token":
            return ActParams(None, None, self.act_shift, self.a_bits, "token")
        return ActParams(self.act_scale, self.act_zero, self.act_shift, self.a_bits)

    def dequantized_weight(self) -> torch.Tensor:
        """W [N, K] float32 (with the TRIP factors folded in)."""
        return dequantize_weight(self.codes(), self.wscale, self.wzero, self.group_size, self.wmin)

    def _weight(self) -> torch.Tensor:
        tensors = [t for t in (self.qweight, self.wscale, self.wzero, self.wmin) if t is not None]
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.dequantized_weight())
        return self._cache[1]

    # ------------------------------------------------------------------ math
    def _codes(self, x2: torch.Tensor):
        xq, s, zp = quantize_act_rows(x2, self.act_params())
        return xq - zp, s

    def int_acc(self, x: torch.Tensor) -> torch.Tensor:
        """The exact integer accumulator acc [M, N, G] (as int64) for inputs x [..., K]."""
        xc, _ = self._codes(x.reshape(-1, self.in_features))
        wc = self.codes().to(torch.float64) - self.wzero.to(torch.float64).repeat_interleave(self.group_size, 1)
        g, groups = self.group_size, self.in_features // self.group_size
        acc = torch.einsum("mgk,ngk->mng", xc.to(torch.float64).reshape(-1, groups, g), wc.reshape(-1, groups, g))
        return acc.round().to(torch.int64)

    def int_xsum(self, x: torch.Tensor) -> torch.Tensor:
        """xsum [M, G] = sum over each group of (xq - zp), exact (int64): the v2 `wmin` term's activation part."""
        xc, _ = self._codes(x.reshape(-1, self.in_features))
        return xc.reshape(xc.shape[0], -1, self.group_size).sum(-1).round().to(torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if not self.a_bits:
            y = x2 @ self._weight().T
        else:
            xc, s = self._codes(x2)
            y = s * (xc @ self._weight().T)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, act={self.act_granularity}, "
                f"w_zero={self.w_zero}")
