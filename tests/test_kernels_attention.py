"""Attention kernels (INT8 QK, log2 softmax quantization, shift-based AttnV) on the host vs numpy, with GQA."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from agile_tvm.kernels import cases  # noqa: E402

from test_kernels_linear import TARGET, run  # noqa: E402


@pytest.fixture(scope="module")
def funcs():
    from agile_tvm.kernels import attn_v_log2_func, log2_softmax_quant_func, qk_int8_func

    return {
        "qk": qk_int8_func(6, 2, 64, TARGET),
        "qk_causal": qk_int8_func(6, 2, 64, TARGET, causal=True),
        "log2": log2_softmax_quant_func(6, 4, TARGET),
        "av": attn_v_log2_func(6, 2, 64, 4, TARGET),
    }


@pytest.mark.parametrize("M,N", [(1, 1), (1, 37), (4, 9), (5, 9), (16, 16), (9, 130)])
def test_qk_int8(funcs, M, N):
    args, out, want = cases.qk_case(6, 2, 64, M, N, seed=M + N, unit_scales=True)
    np.testing.assert_array_equal(run(funcs["qk"], args, out), want)  # dot / 8: exact
    args, out, want = cases.qk_case(6, 2, 64, M, N, seed=M * N)
    np.testing.assert_allclose(run(funcs["qk"], args, out), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("M,N", [(1, 1), (1, 37), (3, 9), (9, 9), (70, 70), (9, 130)])
def test_qk_causal(funcs, M, N):
    # query i at position N - M + i: keys after it are -inf, whole key blocks past the diagonal are skipped
    args, out, want = cases.qk_case(6, 2, 64, M, N, seed=M + 2 * N, unit_scales=True, causal=True)
    got = run(funcs["qk_causal"], args, out)
    np.testing.assert_array_equal(got, want)
    assert np.isneginf(got).sum() == 6 * (M * (M - 1) // 2)


@pytest.mark.parametrize("M,N", [(1, 1), (1, 37), (7, 50)])
def test_log2_softmax_codes(funcs, M, N):
    args, out, (codes, pmax) = cases.log2_case(6, M, N, 4, seed=M + N)
    got_codes, got_pmax = run(funcs["log2"], args, out)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_pmax, pmax)
    if N > 1:
        assert got_codes[0, 0, -1] == 15  # a zero probability is dropped (top code)
    assert (got_codes.min(axis=-1) == 0).all()  # each row's max maps to code 0


@pytest.mark.parametrize("M,N", [(1, 1), (3, 40), (8, 17), (5, 1), (6, 33), (2, 2500), (6, 2501)])
def test_attn_v_log2(funcs, M, N):
    args, out, want = cases.attn_v_case(6, 2, 64, M, N, 4, seed=M + N)
    np.testing.assert_allclose(run(funcs["av"], args, out), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("M", [1, 6])
def test_attn_v_int64_beyond_1024_keys(funcs, M):
    # 2049 keys at full weight, v = 127: the integer sum 127 * 2^14 * 2049 overflows int32 (both paths)
    args, out, want = cases.attn_v_case(6, 2, 64, M, 2049, 4, extreme=True)
    got = run(funcs["av"], args, out)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.all(got > 0)


def test_log2_code_bits_agree_with_float_log2():
    # the exact bit evaluation equals floor(-log2(r) + 0.5) wherever a float log2 is not within rounding of a boundary
    from agile_tvm.kernels import reference

    r = np.random.default_rng(0).random(200_000).astype(np.float32) ** 8 + np.float32(1e-30)
    r = np.minimum(r, np.float32(1))
    via_log = -np.log2(r.astype(np.float64)) + 0.5
    safe = np.abs(via_log - np.round(via_log)) > 1e-6
    np.testing.assert_array_equal(reference.log2_code(r, 15)[safe], np.clip(np.floor(via_log), 0, 15)[safe])
    assert safe.mean() > 0.999
