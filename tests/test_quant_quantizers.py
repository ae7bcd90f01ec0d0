"""Quantizer ranges, round-trip error bounds, log2 softmax, TRIP vs per-tensor, exact folding, INT4 packing."""

import pytest
import torch

from agile_tvm.errors import UserError
from agile_tvm.quant.calibrate import fold_shift
from agile_tvm.quant.linear import pack_int4, unpack_int4
from agile_tvm.quant.quantizers import (ActParams, dequantize_weight, fake_quant_act, log2_codes, log2_dequant,
                                        quantize_act, quantize_act_rows, quantize_sym8, rtn_quantize,
                                        smooth_shifts, trip_search)




@pytest.mark.parametrize("bits,lo,hi", [(4, -8, 7), (8, -127, 127)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [-1, 16])
def test_rtn_codes_in_range_and_error_within_half_step(bits, lo, hi, symmetric, group):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * torch.rand(24, 1) * 3
    q, s, z, _ = rtn_quantize(w, bits, group, symmetric)
    assert q.min() >= lo and q.max() <= hi
    assert torch.equal(q, q.round())
    if symmetric:
        assert torch.all(z == 0)
    g = 64 if group == -1 else group
    assert s.shape == (24, 64 // g)
    w_hat = dequantize_weight(q, s, z, g)
    step = s.repeat_interleave(g, 1)
    assert torch.all((w_hat - w).abs() <= step / 2 + 1e-6)


def test_float_offset_grid_reproduces_q4_1_blocks_exactly():
    """A Q4_1-style weight (blocks of 32: d * u + m, u in 0..15) survives 4-bit RTN with float offsets unchanged;
    the integer zero point cannot express m and loses accuracy (the SmolLM2 measurement in configs.py)."""
    g = torch.Generator().manual_seed(0)
    n, k = 16, 128
    d = torch.rand(n, k // 32, 1, generator=g) * 0.02 + 0.001
    m = torch.randn(n, k // 32, 1, generator=g) * 0.05
    u = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    u[..., 0], u[..., 1] = 0, 15  # Q4_1 maps a block's min to 0 and its max to 15
    w = (d * u + m).reshape(n, k)
    q, s, z, off = rtn_quantize(w, 4, 32, False, float_zero=True)
    assert torch.all(z == 0) and q.min() >= -8 and q.max() <= 7
    w_hat = dequantize_weight(q, s, z, 32, off)
    assert (w_hat - w).abs().max() < 1e-6
    qi, si, zi, _ = rtn_quantize(w, 4, 32, False)
    assert (dequantize_weight(qi, si, zi, 32) - w).abs().max() > 1e-3


def test_per_token_params_follow_the_contract():
    x = torch.tensor([[1.0, -3.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0], [2.0, 4.0, 1.0, 3.0]])
    p = ActParams(None, None, torch.tensor([0, 0, 1, 0], dtype=torch.uint8), 8, "token")
    xq, s, zp = quantize_act_rows(x, p)
    # row 0: v = [1, -3, 0.25, 2], lo -3, hi 2, s = 5/255, zp = floor(3 * 51 + 0.5) = 153
    assert s[0, 0] == torch.tensor(5.0) / 255 and zp[0, 0] == 153
    assert s[1, 0] == 1 and zp[1, 0] == 0 and torch.all(xq[1] == 0)  # an all-zero row
    assert zp[2, 0] == 0 and xq[2].max() == 255  # one sign: lo = 0, the max maps to the top code
    err = (fake_quant_act(x, p) - x).abs() / torch.exp2(p.shift.float())
    assert torch.all(err <= s / 2 + 1e-6)


def test_activation_codes_in_range_and_round_trip_bound():
    torch.manual_seed(0)
    x = torch.randn(200, 32) * 3
    p = trip_search(x, 8, 0)
    xq = quantize_act(x, p)
    assert xq.min() >= 0 and xq.max() <= 255 and torch.equal(xq, xq.round())
    inside = (x >= -p.zero * p.scale) & (x <= (255 - p.zero) * p.scale)
    err = (fake_quant_act(x, p) - x).abs()
    assert torch.all(err[inside] <= p.scale / 2 + 1e-5)
    p4 = trip_search(x, 4, 0)
    assert quantize_act(x, p4).max() <= 15


def test_activation_rounding_rule_is_the_contracts():
    p = ActParams(torch.tensor(0.5), torch.tensor(3, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.uint8), 8)
    x = torch.tensor([[0.25, 0.5], [-10.0, 1000.0]])
    # floor(x * 2 * 2^-alpha + 0.5) + 3, clipped to [0, 255]
    assert quantize_act(x, p).tolist() == [[4.0, 4.0], [0.0, 255.0]]


def test_log2_softmax_codes():
    p = torch.softmax(torch.randn(4, 50) * 3, dim=-1)
    c, pmax = log2_codes(p, 4)
    assert c.min() >= 0 and c.max() <= 15
    assert torch.all(c[torch.arange(4), p.argmax(-1)] == 0)
    ph = log2_dequant(c, pmax, 4)
    kept = c < 15
    ratio = ph[kept] / p[kept]
    assert torch.all(ratio <= 2**0.5 + 1e-5) and torch.all(ratio >= 2**-0.5 - 1e-5)
    assert torch.all(ph[~kept] == 0)
    assert torch.all(p[~kept] / pmax.expand_as(p)[~kept] < 2**-14.5 + 1e-9)


def test_symmetric_int8_range():
    x = torch.randn(1000) * 10
    q = quantize_sym8(x, torch.tensor(0.01))
    assert q.min() >= -127 and q.max() <= 127


def test_trip_beats_per_tensor_int8_on_outlier_channels():
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, [3, 17, 40]] *= torch.tensor([60.0, 120.0, 300.0])  # outlier channels, as in LLM activations
    plain = trip_search(x, 8, 0)
    trip = trip_search(x, 8, 6)
    assert int(plain.shift.max()) == 0
    assert set(trip.shift.nonzero().flatten().tolist()) >= {17, 40}
    err_plain = ((fake_quant_act(x, plain) - x) ** 2).sum()
    err_trip = ((fake_quant_act(x, trip) - x) ** 2).sum()
    assert err_trip < 0.25 * err_plain


def test_pow2_smoothing_shrinks_only_outlier_channels_and_helps_per_token_int8():
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    x[:, [3, 17, 40]] *= torch.tensor([60.0, 120.0, 300.0])
    shift = smooth_shifts(x, 0.9, 7)
    assert shift.nonzero().flatten().tolist() == [3, 17, 40]
    assert shift.tolist()[40] == 7 and shift.tolist()[17] >= 6  # log2(300) ~ 8.2 is clipped to k_max
    plain = ActParams(None, None, torch.zeros(64, dtype=torch.uint8), 8, "token")
    smooth = ActParams(None, None, shift, 8, "token")
    ordinary = [c for c in range(64) if c not in (3, 17, 40)]
    err_plain = ((fake_quant_act(x, plain) - x)[:, ordinary] ** 2).sum()
    err_smooth = ((fake_quant_act(x, smooth) - x)[:, ordinary] ** 2).sum()
    assert err_smooth < 0.1 * err_plain


def test_folding_is_exact_in_fp64():
    torch.manual_seed(0)
    x = torch.randn(16, 48, dtype=torch.float64)
    w = torch.randn(8, 48, dtype=torch.float64)
    shift = torch.randint(0, 7, (48,), dtype=torch.uint8)
    folded = (x * torch.exp2(-shift.double())) @ fold_shift(w, shift).T
    assert torch.equal(folded, x @ w.T)


def test_int4_packing_nibble_order():
    q = torch.tensor([[1, -2, 7, -8]])
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0xE1, 0x87]]  # low nibble = even column
    assert torch.equal(unpack_int4(packed).long(), q)
    rnd = torch.randint(-8, 8, (5, 32))
    assert torch.equal(unpack_int4(pack_int4(rnd)).long(), rnd)


def test_bits_outside_4_and_8_are_rejected():
    from agile_tvm.quant.configs import get_config

    cfg = get_config("agileq8")
    cfg.weight.bits = 3
    with pytest.raises(UserError, match="4 or 8"):
        cfg.validate()
    with pytest.raises(UserError, match="unknown quantization config"):
        get_config("w2a2")
