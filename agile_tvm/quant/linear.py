"""`QuantLinear`: a linear layer that holds exactly the checkpoint tensors and computes the contract's integer math.

This module is the reference the TVM kernels must match (docs/checkpoint.md, "The linear"):
    xq  = clip(floor(x * (1/act_scale) * 2^-alpha_c + 0.5) + zp, 0, 2^b - 1)
    acc = sum_{k in group} (xq - zp) * (q - wzero)          integer, exact
    y   = act_scale * sum_groups wscale * acc + bias          float32
The integer sum is emulated exactly with a float matmul: every partial sum is an integer, so float32 is exact while
|acc| <= (2^a_bits - 1) * max|q - wzero| * g < 2^24 (W4A8 per channel up to K = 4386), float64 otherwise (exact to
2^53). `int_acc(x)` returns that accumulator for tests and kernel checks.

4-bit codes are packed two per byte: byte j of row n holds q[n, 2j] in bits 0-3 and q[n, 2j+1] in bits 4-7, each
4-bit two's complement.
"""

from __future__ import annotations

import torch
from torch import nn

from agile_tvm.quant.quantizers import ActParams, dequantize_weight, quantize_act


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
    """Weight-quantized linear, optionally with statically quantized (TRIP) inputs; buffers = checkpoint tensors."""

    def __init__(self, in_features: int, out_features: int, w_bits: int, a_bits: int, group_size: int,
                 bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, self.group_size = w_bits, a_bits, group_size
        groups = in_features // group_size
        if w_bits == 4:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("wscale", torch.ones(out_features, groups, dtype=torch.float32))
        self.register_buffer("wzero", torch.zeros(out_features, groups, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        if a_bits:
            self.register_buffer("act_scale", torch.tensor(1.0, dtype=torch.float32))
            self.register_buffer("act_zero", torch.tensor(0, dtype=torch.int32))
            self.register_buffer("act_shift", torch.zeros(in_features, dtype=torch.uint8))
        self._cache = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, w_bits: int,
                   bias: torch.Tensor | None, act: ActParams | None) -> "QuantLinear":
        n, k = codes.shape
        g = k // scale.shape[1]
        m = cls(k, n, w_bits, act.bits if act else 0, g, bias is not None)
        codes = codes.round().to(torch.int16)
        m.qweight.copy_(pack_int4(codes) if w_bits == 4 else codes.to(torch.int8))
        m.wscale.copy_(scale.float())
        m.wzero.copy_(zero.round().to(torch.int8))
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        if act is not None:
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
        return ActParams(self.act_scale, self.act_zero, self.act_shift, self.a_bits)

    def dequantized_weight(self) -> torch.Tensor:
        """W [N, K] float32 (with the TRIP factors folded in)."""
        return dequantize_weight(self.codes(), self.wscale, self.wzero, self.group_size)

    def _centered_weight(self) -> torch.Tensor:
        key = (self.qweight.data_ptr(), self.qweight._version, self.wzero.data_ptr(), self.wzero._version)
        if self._cache is None or self._cache[0] != key:
            wc = self.codes().to(torch.int32) - self.wzero.to(torch.int32).repeat_interleave(self.group_size, 1)
            self._cache = (key, wc)
        return self._cache[1]

    # ------------------------------------------------------------------ math
    def acc_dtype(self) -> torch.dtype:
        wmax = 15 if self.w_bits == 4 else 254
        bound = (2**self.a_bits - 1) * wmax * self.group_size
        return torch.float32 if bound < 2**24 else torch.float64

    def int_acc(self, x: torch.Tensor) -> torch.Tensor:
        """The exact integer accumulator acc [M, N, G] (as int64) for inputs x [M, K]."""
        return self._acc(x.reshape(-1, self.in_features), torch.float64).round().to(torch.int64)

    def _acc(self, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        xq = quantize_act(x2, self.act_params())
        xc = (xq - self.act_zero.to(torch.float32)).to(dtype)
        wc = self._centered_weight().to(dtype)
        g = self.group_size
        groups = self.in_features // g
        if groups == 1:
            return (xc @ wc.T)[:, :, None]
        return torch.einsum("mgk,ngk->mng", xc.reshape(-1, groups, g), wc.reshape(-1, groups, g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not self.a_bits:
            y = x2.float() @ self.dequantized_weight().T
        else:
            acc = self._acc(x2, self.acc_dtype()).to(torch.float32)
            if acc.shape[2] == 1:
                y = self.act_scale * (acc[:, :, 0] * self.wscale[:, 0])
            else:
                y = self.act_scale * (acc * self.wscale[None]).sum(-1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
