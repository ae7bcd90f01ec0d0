"""QuantLinear against a straightforward numpy reading of docs/checkpoint.md: the accumulator bit for bit."""

import numpy as np
import pytest
import torch

from agile_tvm.quant.linear import QuantLinear
from agile_tvm.quant.quantizers import ActParams, WeightCodes, rtn_quantize




def numpy_reference(x, qweight, wscale, wzero, act_scale, act_zero, act_shift, w_bits, a_bits, g, bias):
    """docs/checkpoint.md, literally: unpack nibbles, quantize x in float32, integer accumulate in int64."""
    qweight = np.asarray(qweight)
    if w_bits == 4:
        lo = (qweight & 0xF).astype(np.int64)
        hi = (qweight >> 4).astype(np.int64)
        lo = np.where(lo >= 8, lo - 16, lo)
        hi = np.where(hi >= 8, hi - 16, hi)
        q = np.empty((qweight.shape[0], qweight.shape[1] * 2), dtype=np.int64)
        q[:, 0::2], q[:, 1::2] = lo, hi
    else:
        q = qweight.astype(np.int64)
    r = np.float32(1) / np.float32(act_scale)
    pow_ = np.exp2(-act_shift.astype(np.float32)).astype(np.float32)
    xq = np.clip(np.floor(x.astype(np.float32) * r * pow_ + np.float32(0.5)) + act_zero, 0, 2**a_bits - 1)
    xq = xq.astype(np.int64)
    n, k = q.shape
    acc = np.zeros((x.shape[0], n, k // g), dtype=np.int64)
    for gi in range(k // g):
        sl = slice(gi * g, (gi + 1) * g)
        acc[:, :, gi] = (xq[:, sl] - act_zero) @ (q[:, sl] - wzero[:, gi:gi + 1].astype(np.int64)).T
    y = np.float32(act_scale) * (acc.astype(np.float32) * wscale[None].astype(np.float32)).sum(-1)
    return acc, y + (bias if bias is not None else 0)


@pytest.mark.parametrize("w_bits,a_bits,group", [(4, 8, -1), (4, 8, 32), (4, 4, -1), (8, 8, -1), (8, 8, 64)])
def test_quant_linear_matches_numpy_contract(w_bits, a_bits, group):
    torch.manual_seed(w_bits * 100 + a_bits + group)
    n, k, m = 48, 128, 37
    w = torch.randn(n, k)
    codes = rtn_quantize(w, w_bits, group, symmetric=(w_bits == 8))
    x = torch.randn(m, k) * 2
    x[:, 5] *= 40  # an outlier channel with a TRIP exponent
    shift = torch.zeros(k, dtype=torch.uint8)
    shift[5] = 5
    act = ActParams(torch.tensor(0.037), torch.tensor(2**a_bits // 2 - 3, dtype=torch.int32), shift, a_bits)
    bias = torch.randn(n)
    lin = QuantLinear.from_codes(codes, w_bits, bias, act)
    acc_ref, y_ref = numpy_reference(x.numpy(), lin.qweight.numpy(), lin.wscale.numpy(), lin.wzero.numpy(),
                                     0.037, int(act.zero), shift.numpy(), w_bits, a_bits, lin.group_size,
                                     bias.numpy())
    acc = lin.int_acc(x).numpy()
    assert np.array_equal(acc, acc_ref)
    y = lin(x).numpy()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4 * np.abs(y_ref).max())


def test_weight_only_linear_is_dequantized_matmul():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q, s, z, off = rtn_quantize(w, 4, 16, symmetric=False)
    lin = QuantLinear.from_codes(WeightCodes(q, s, z, off), 4, None, None)
    x = torch.randn(5, 64)
    w_hat = s.repeat_interleave(16, 1) * (q - z.repeat_interleave(16, 1))
    torch.testing.assert_close(lin(x), x @ w_hat.T)
    assert lin.qweight.shape == (16, 32) and lin.qweight.dtype == torch.uint8
    assert lin.wzero.dtype == torch.int8 and lin.wscale.shape == (16, 4)


def numpy_reference_v2(x, q, wscale, wzero, wmin, act_shift, a_bits, g, bias):
    """docs/checkpoint.md "Version 2", literally: per-row scale/zero point, float offsets, exact int64 sums."""
    v = x.astype(np.float32) * np.exp2(-act_shift.astype(np.float32)).astype(np.float32)
    levels = np.float32(2**a_bits - 1)
    lo = np.minimum(v.min(1, keepdims=True), np.float32(0))
    hi = np.maximum(v.max(1, keepdims=True), np.float32(0))
    s = (hi - lo) / levels
    s = np.where(s == 0, np.float32(1), s).astype(np.float32)
    r = (np.float32(1) / s).astype(np.float32)
    zp = np.clip(np.floor(-lo * r + np.float32(0.5)), 0, levels)
    xq = np.clip(np.floor(v * r + np.float32(0.5)) + zp, 0, levels).astype(np.int64)
    xc = xq - zp.astype(np.int64)
    n, k = q.shape
    acc = np.zeros((x.shape[0], n, k // g), dtype=np.int64)
    xsum = np.zeros((x.shape[0], k // g), dtype=np.int64)
    for gi in range(k // g):
        sl = slice(gi * g, (gi + 1) * g)
        acc[:, :, gi] = xc[:, sl] @ (q[:, sl].astype(np.int64) - wzero[:, gi:gi + 1].astype(np.int64)).T
        xsum[:, gi] = xc[:, sl].sum(1)
    y = s * ((acc * wscale[None]).sum(-1) + xsum @ wmin.T)
    return acc, xsum, y + (bias if bias is not None else 0)


@pytest.mark.parametrize("w_bits,a_bits,group", [(4, 8, 32), (4, 8, -1), (4, 4, 32), (8, 8, 64)])
def test_quant_linear_v2_per_token_float_offsets_match_numpy_contract(w_bits, a_bits, group):
    torch.manual_seed(7 + w_bits + a_bits + group)
    n, k, m = 40, 128, 19
    w = torch.randn(n, k) + 0.3
    codes = rtn_quantize(w, w_bits, group, symmetric=False, float_zero=True)
    x = torch.randn(m, k) * 2
    x[3] *= 300  # a massive token: per-token scales keep the other rows fine
    x[5] = 0  # an all-zero row
    shift = torch.zeros(k, dtype=torch.uint8)
    shift[7] = 2
    act = ActParams(None, None, shift, a_bits, "token")
    bias = torch.randn(n)
    lin = QuantLinear.from_codes(codes, w_bits, bias, act, float_zero=True)
    assert lin.wmin is not None and not hasattr(lin, "act_scale")
    g = lin.group_size
    acc_ref, xsum_ref, y_ref = numpy_reference_v2(x.numpy(), lin.codes().numpy(), lin.wscale.numpy().astype(np.float64),
                                                  lin.wzero.numpy(), lin.wmin.numpy().astype(np.float64),
                                                  shift.numpy(), a_bits, g, bias.numpy())
    assert np.array_equal(lin.int_acc(x).numpy(), acc_ref)
    assert np.array_equal(lin.int_xsum(x).numpy(), xsum_ref)
    y = lin(x).numpy()
    # float32 matmul of K <= 128 terms vs the float64 sum of exact integer parts: relative 1e-5 of the row scale
    bound = 1e-5 * (np.abs(y_ref) + np.abs(y_ref).max(1, keepdims=True))
    assert np.all(np.abs(y - y_ref) <= bound), np.abs(y - y_ref).max()
