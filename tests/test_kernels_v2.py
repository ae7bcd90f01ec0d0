"""Checkpoint-v2 kernels on the host CPU vs their numpy twins (docs/checkpoint.md, "Version 2").

The per-token quantizer must match bit for bit (codes, scales, zero points, group sums). The linears' integer part
is checked exactly with unit scales and integer offsets (then y is an integer below 2^24, so any error in acc or
xsum shows); the float epilogue against ``reference.linear_error_bound``: the float32 rounding bound of two sums
of 2G + 2 terms in different orders (the contract leaves the summation order free), not a loosened tolerance.
"""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from agile_tvm.errors import UserError  # noqa: E402
from agile_tvm.kernels import cases, reference  # noqa: E402

from test_kernels_linear import TARGET, run  # noqa: E402  (one compile-and-run helper with its build cache)


def within_bound(got, want, bound):
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    assert (err <= bound).all(), f"max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"


def _linear(kind, N, K, **kw):
    from agile_tvm.kernels import w4a8_linear_func, w8a8_linear_func

    return (w4a8_linear_func if kind == "w4a8" else w8a8_linear_func)(N, K, TARGET, **kw)


# ---------------------------------------------------------------- per-token activation quantization


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 32])
def test_quantize_token_exact(bits, group_size):
    from agile_tvm.kernels import quantize_act_token_func

    f = quantize_act_token_func(96, bits, TARGET, group_size=group_size)
    for M in (1, 4, 9):
        args, outs, want = cases.quantize_token_case(96, M, bits, group_size=group_size, seed=M)
        got = run(f, args, outs)
        for name, g, w in zip(("xq", "act_scale", "act_zero", "xsum"), got, want):
            np.testing.assert_array_equal(g, w, err_msg=f"{name} M={M}")
        xq, s, zp, xsum = got
        assert xq.dtype == np.uint8 and s.dtype == np.float32 and zp.dtype == np.int32 and xsum.dtype == np.int32
        if M >= 4:  # the corner rows of quantize_token_case
            assert s[1] == 1 and zp[1] == 0 and (xq[1] == 0).all() and (xsum[1] == 0).all()  # all zero
            assert zp[2] == 0 and xq[2].max() == 2**bits - 1  # all positive: lo = 0
            assert zp[3] == 2**bits - 1 and xq[3].min() == 0  # all negative: hi = 0


@pytest.mark.parametrize("K,group_size,m", [(72, 24, 1), (84, 12, None)])  # decode; K % 8 == 4 (4 lanes)
def test_quantize_token_decode_and_lane_widths(K, group_size, m):
    from agile_tvm.kernels import quantize_act_token_func

    f = quantize_act_token_func(K, 8, TARGET, group_size=group_size, m=m)
    for M in (1,) if m == 1 else (1, 6):
        args, outs, want = cases.quantize_token_case(K, M, 8, group_size=group_size, seed=5)
        for g, w in zip(run(f, args, outs), want):
            np.testing.assert_array_equal(g, w)


def test_quantize_token_rounds_the_product_before_adding_half():
    # v * r just below -0.5 (found by search for these row ranges): one rounding (a fused multiply-add, which
    # LLVM emits by default) floors to -1, the contract's float32 multiply then add gives 0, one code higher
    from agile_tvm.kernels import quantize_act_token_func

    f = quantize_act_token_func(16, 8, TARGET)
    x = np.zeros((2, 16), np.float32)
    x[0, :3] = [-2.5, 100.0, -0.2009804]
    x[1, :3] = [-0.3, 4.0, -0.008431373]
    x[:, 3:] = x[:, 2:3]
    shift = np.zeros(16, np.uint8)
    args = [x, shift, np.zeros((2, 16), np.uint8), np.zeros(2, np.float32), np.zeros(2, np.int32),
            np.zeros((2, 1), np.int32)]
    xq, s, zp, xsum = run(f, args, (2, 3, 4, 5))
    want = reference.quantize_act_token(x, shift, 8)
    r = np.float32(1) / s
    t = (x[:, 2] * r).astype(np.float32)
    assert (np.float64(x[:, 2]) * np.float64(r) + 0.5 < 0).all() and (t + np.float32(0.5) == 0).all()
    np.testing.assert_array_equal(xq, want[0])
    np.testing.assert_array_equal(xsum, want[3])
    assert (xq[:, 2].astype(int) == zp).all()


# ---------------------------------------------------------------- v2 linears


@pytest.mark.parametrize("kind", ["w4a8", "w8a8"])
@pytest.mark.parametrize("group_size", [None, 16, 32])
@pytest.mark.parametrize("has_wmin", [False, True])
def test_linear_v2_integer_part_exact(kind, group_size, has_wmin):
    N, K = 44, 96  # N ragged against every tile width
    f = _linear(kind, N, K, group_size=group_size, act="token", has_wmin=has_wmin)
    for M in (1, 5, 33):
        for extreme in (False, True):
            args, out, want = cases.linear_v2_case(kind, N, K, M, TARGET, group_size=group_size, has_wmin=has_wmin,
                                                   unit_scales=True, extreme=extreme, seed=M)
            np.testing.assert_array_equal(run(f, args, out), want, err_msg=f"M={M} extreme={extreme}")


@pytest.mark.parametrize("kind", ["w4a8", "w8a8"])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("has_wmin", [False, True])
def test_linear_v2_float_epilogue(kind, group_size, has_wmin):
    N, K = 40, 128
    f = _linear(kind, N, K, group_size=group_size, act="token", has_wmin=has_wmin, has_bias=True)
    for M in (1, 6, 17):
        args, out, want, bound = cases.linear_v2_case(kind, N, K, M, TARGET, group_size=group_size,
                                                      has_wmin=has_wmin, has_bias=True, seed=10 + M, bound=True)
        within_bound(run(f, args, out), want, bound)


@pytest.mark.parametrize("kind", ["w4a8", "w8a8"])
def test_linear_v2_decode_variant(kind):
    f = _linear(kind, 40, 128, group_size=32, act="token", has_wmin=True, m=1)
    args, out, want, bound = cases.linear_v2_case(kind, 40, 128, 1, TARGET, group_size=32, has_wmin=True, seed=3,
                                                  bound=True)
    within_bound(run(f, args, out), want, bound)
    args, out, want = cases.linear_v2_case(kind, 40, 128, 1, TARGET, group_size=32, has_wmin=True, seed=4,
                                           unit_scales=True, extreme=True)
    np.testing.assert_array_equal(run(f, args, out), want)


@pytest.mark.parametrize("N", [96, 44])
def test_grouped_gemm_in_k_chunks(N):
    # K = 1024 in groups of 32: the panel's weights and tables overflow L1, so the schedule splits the groups into
    # chunks and keeps the float tile of each row in memory between them; v1 and v2 alike
    from agile_tvm.kernels import w4a8_linear_func
    from agile_tvm.kernels.linear import linear_tensors
    from agile_tvm.kernels.schedule import _grouped_tiling

    _, info = linear_tensors(96, 1024, "avx2", 4, group_size=32, act="token", has_wmin=True)
    assert _grouped_tiling(info) == (4, 2)
    v1 = w4a8_linear_func(N, 1024, TARGET, group_size=32, has_bias=True)
    v2 = w4a8_linear_func(N, 1024, TARGET, group_size=32, has_bias=True, act="token", has_wmin=True)
    for M in (1, 7):
        args, out, want = cases.linear_case("w4a8", N, 1024, M, TARGET, group_size=32, unit_scales=True, seed=M,
                                            has_bias=True)
        args[6][:] = 0
        want = cases.linear_case("w4a8", N, 1024, M, TARGET, group_size=32, unit_scales=True, seed=M)[2]
        np.testing.assert_array_equal(run(v1, args, out), want)
        args, out, want, bound = cases.linear_v2_case("w4a8", N, 1024, M, TARGET, group_size=32, has_wmin=True,
                                                      has_bias=True, seed=M, bound=True)
        within_bound(run(v2, args, out), want, bound)


def test_v1_tensor_scales_through_the_grouped_path():
    # v1 (act="tensor") grouped linears keep their results; the per-tensor zero point is folded into the table
    from agile_tvm.kernels import w4a8_linear_func, w8a8_linear_func

    for make, kind in ((w4a8_linear_func, "w4a8"), (w8a8_linear_func, "w8a8")):
        f = make(40, 128, TARGET, group_size=32)
        for M in (1, 9):
            args, out, want = cases.linear_case(kind, 40, 128, M, TARGET, group_size=32, unit_scales=True,
                                                extreme=True, seed=M)
            np.testing.assert_array_equal(run(f, args, out), want)


@pytest.mark.parametrize("M", [1, 6])
def test_nibble_weights_v2(M):
    from agile_tvm.kernels import w4a8_linear_func

    if cases.layout._isa(TARGET) not in ("avx2", "avx512"):
        pytest.skip("nibble format is x86 only")
    f = w4a8_linear_func(44, 96, TARGET, group_size=32, act="token", has_wmin=True, wfmt="nibble",
                         m=1 if M == 1 else None)
    args, out, want = cases.linear_v2_case("w4a8", 44, 96, M, TARGET, group_size=32, has_wmin=True,
                                           unit_scales=True, extreme=True, seed=M, wfmt="nibble")
    np.testing.assert_array_equal(run(f, args, out), want)


def test_quantize_then_linear_chain():
    # what the frontend runs: x -> per-token codes, scales, zero points and group sums -> W4A8 g32 with offsets
    from agile_tvm.kernels import quantize_act_token_func, w4a8_linear_func

    rng = np.random.default_rng(7)
    N, K, M, gs = 48, 192, 11, 32
    x = (rng.standard_normal((M, K)) * 3).astype(np.float32)
    shift = rng.integers(0, 3, K).astype(np.uint8)
    qargs = [x, shift, np.zeros((M, K), np.uint8), np.zeros(M, np.float32), np.zeros(M, np.int32),
             np.zeros((M, K // gs), np.int32)]
    xq, s, zp, xsum = run(quantize_act_token_func(K, 8, TARGET, group_size=gs), qargs, (2, 3, 4, 5))
    q = rng.integers(-8, 8, (N, K))
    wz = np.zeros((N, K // gs), np.int8)
    wscale = (rng.random((N, K // gs)) * 0.02 + 0.001).astype(np.float32)
    wmin = (-8 * wscale * rng.uniform(0.5, 1.5, wscale.shape)).astype(np.float32)
    packed = cases.layout.pack_w4a8_weights(reference.pack_int4(q), wz, TARGET)
    y = run(w4a8_linear_func(N, K, TARGET, group_size=gs, act="token", has_wmin=True),
            [xq, packed["wpack"], packed["wsum"], wscale, wmin, s, zp, xsum, np.zeros((M, N), np.float32)], 8)
    wq, ws, wzr, wx = reference.quantize_act_token(x, shift, 8, gs)
    want = reference.linear_v2(wq, ws, wzr, q, wz, wscale, wmin, wx, None, gs)
    acc = reference.linear_acc(wq, wzr, q, wz, gs)
    within_bound(y, want, reference.linear_error_bound(acc, wscale, ws, wmin, wx))
    # and it is the linear of the dequantized operands: W = wscale * q + wmin, v^ = s * (xq - zp)
    W = np.repeat(wscale, gs, axis=1).astype(np.float64) * q + np.repeat(wmin, gs, axis=1)
    xhat = (wq.astype(np.float64) - wzr[:, None]) * ws[:, None].astype(np.float64)
    np.testing.assert_allclose(y, xhat @ W.T, rtol=1e-4, atol=1e-5 * np.abs(y).max())


def test_v2_option_errors():
    from agile_tvm.kernels import quantize_act_token_func, w4a8_linear_func

    with pytest.raises(UserError, match='act="token"'):
        w4a8_linear_func(16, 64, TARGET, has_wmin=True)
    with pytest.raises(UserError, match="requant"):
        w4a8_linear_func(16, 64, TARGET, act="token", requant=True)
    with pytest.raises(UserError, match="act must be"):
        w4a8_linear_func(16, 64, TARGET, act="row")
    with pytest.raises(UserError, match="group size"):
        quantize_act_token_func(64, 8, TARGET, group_size=24)
    with pytest.raises(UserError, match="bits"):
        quantize_act_token_func(64, 6, TARGET)
