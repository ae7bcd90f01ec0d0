"""QuantLinear against a straightforward numpy reading of docs/checkpoint.md: the accumulator bit for bit."""

import numpy as np
import pytest
import torch

from agile_tvm.quant.linear import QuantLinear
from agile_tvm.quant.quantizers import ActParams, rtn_quantize




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
    q, s, z = rtn_quantize(w, w_bits, group, symmetric=(w_bits == 8))
    x = torch.randn(m, k) * 2
    x[:, 5] *= 40  # an outlier channel with a TRIP exponent
    shift = torch.zeros(k, dtype=torch.uint8)
    shift[5] = 5
    act = ActParams(torch.tensor(0.037), torch.tensor(2**a_bits // 2 - 3, dtype=torch.int32), shift, a_bits)
    bias = torch.randn(n)
    lin = QuantLinear.from_codes(q, s, z, w_bits, bias, act)
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
    q, s, z = rtn_quantize(w, 4, 16, symmetric=False)
    lin = QuantLinear.from_codes(q, s, z, 4, None, None)
    x = torch.randn(5, 64)
    w_hat = s.repeat_interleave(16, 1) * (q - z.repeat_interleave(16, 1))
    torch.testing.assert_close(lin(x), x @ w_hat.T)
    assert lin.qweight.shape == (16, 32) and lin.qweight.dtype == torch.uint8
    assert lin.wzero.dtype == torch.int8 and lin.wscale.shape == (16, 4)


def test_accumulation_dtype_exact_bound():
    lin4 = QuantLinear(1536, 8, 4, 8, 1536, False)
    assert lin4.acc_dtype() == torch.float32  # 255 * 15 * 1536 < 2^24
    lin8 = QuantLinear(1536, 8, 8, 8, 1536, False)
    assert lin8.acc_dtype() == torch.float64
