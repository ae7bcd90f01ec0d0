"""The integer-scale W4A8 GEMM (kernels/int_scales.py) vs its numpy twin, and the grid it relies on.

Without a bias the kernel is compared bit for bit: its row sums are exact integers per K chunk (int32, checked by
the twin), converted and summed in float32 in the same order, then scaled by s_m * 2^e_n (exact). With a bias the
last multiply-add may be fused (one rounding instead of two), so those cases allow 1e-6 of the largest |y|.
The extreme cases put every code, scale code, offset code and zero point at the end of its range, where an int32
partial sum or an int16 pair sum would overflow if the bounds in the module doc were wrong.
"""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from agile_tvm.errors import UserError  # noqa: E402
from agile_tvm.kernels import int_scales, layout  # noqa: E402

from test_kernels_linear import TARGET, run  # noqa: E402

needs_avx2 = pytest.mark.skipif(layout._isa(TARGET) != "avx2", reason="the integer-scale GEMM is an x86 kernel")


def _case(N, K, M, *, gs=32, extreme=False, bias=False, n_offset=0, n_total=None, seed=0):
    """(kernel args with a zero output, the twin's y, the float64 value of the v2 formula on the same weights)."""
    rng = np.random.default_rng(seed)
    G, NT = K // gs, n_total or N
    q = rng.integers(-8, 8, (NT, K))
    c = rng.integers(0, 256, (NT, G)).astype(np.uint8)
    d = rng.integers(-2047, 2048, (NT, G)).astype(np.int16)
    e = rng.integers(-20, -8, NT).astype(np.int32)
    xq = rng.integers(0, 256, (M, K)).astype(np.uint8)
    zp = rng.integers(0, 256, M).astype(np.int32)
    if extreme:
        q = np.where(rng.random((NT, K)) < 0.5, -8, 7)
        c[:] = 255
        d = np.where(rng.random((NT, G)) < 0.5, -2047, 2047).astype(np.int16)
        xq = np.where(rng.random((M, K)) < 0.5, 0, 255).astype(np.uint8)
        zp = np.where(rng.random(M) < 0.5, 0, 255).astype(np.int32)
    s = rng.random(M).astype(np.float32)
    xsum = (xq.astype(np.int64) - zp[:, None]).reshape(M, G, gs).sum(axis=2).astype(np.int32)
    b = rng.standard_normal(NT).astype(np.float32) if bias else None
    wscale = np.ldexp(c.astype(np.float64), e[:, None]).astype(np.float32)
    wmin = np.ldexp(d.astype(np.float64), e[:, None]).astype(np.float32)
    c2, d2, e2 = int_scales.grid_codes(wscale, wmin)
    np.testing.assert_array_equal(np.ldexp(c2.astype(np.float64), e2[:, None]), wscale)
    np.testing.assert_array_equal(np.ldexp(d2.astype(np.float64), e2[:, None]), wmin)
    tables = int_scales.pack_tables(q, c2, d2, e2, TARGET)
    wpack = layout._pack_nibbles(q, np.zeros((NT, G), np.int8), "avx2")["wpack"]
    sl = slice(n_offset, n_offset + N)
    want = int_scales.reference(xq, zp, s, xsum, q[sl], c2[sl], d2[sl], e2[sl], b[sl] if bias else None)
    w64 = (np.repeat(wscale[sl].astype(np.float64), gs, 1) * q[sl] + np.repeat(wmin[sl].astype(np.float64), gs, 1))
    v2 = s[:, None] * ((xq.astype(np.float64) - zp[:, None]) @ w64.T) + (b[sl] if bias else 0)
    args = [xq, wpack, tables["c8"], tables["d16"], tables["zc"], tables["srow"], s, zp, xsum]
    return args + ([b] if bias else []) + [np.zeros((M, N), np.float32)], want, v2


@needs_avx2
@pytest.mark.parametrize("N,K", [(48, 128), (40, 576), (64, 1536)])  # one K chunk; a ragged tile count; two chunks
@pytest.mark.parametrize("extreme", [False, True])
def test_int_scale_gemm_is_its_twin_bit_for_bit(N, K, extreme):
    f = int_scales.int_scale_linear_func(N, K, TARGET, group_size=32)
    for M in (1, 7, 33):
        args, want, v2 = _case(N, K, M, extreme=extreme, seed=M)
        got = run(f, args, -1)
        np.testing.assert_array_equal(got, want)
        # and it is the contract's v2 linear of the same weights, to float32 rounding
        assert np.abs(got - v2).max() <= 1e-6 * np.abs(v2).max()


@needs_avx2
def test_int_scale_gemm_slice_with_bias():
    f = int_scales.int_scale_linear_func(24, 576, TARGET, group_size=32, has_bias=True, n_offset=16, n_total=48)
    args, want, _ = _case(24, 576, 5, bias=True, n_offset=16, n_total=48)
    got = run(f, args, -1)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_grid_codes_accept_only_the_grid():
    rng = np.random.default_rng(0)
    c = rng.integers(1, 256, (6, 4)).astype(np.float64)
    d = rng.integers(-2047, 2048, (6, 4)).astype(np.float64)
    e = rng.integers(-30, 0, 6)[:, None]
    wscale, wmin = np.ldexp(c, e).astype(np.float32), np.ldexp(d, e).astype(np.float32)
    c2, d2, e2 = int_scales.grid_codes(wscale, wmin)
    np.testing.assert_array_equal(np.ldexp(c2.astype(np.float64), e2[:, None]), wscale)
    np.testing.assert_array_equal(np.ldexp(d2.astype(np.float64), e2[:, None]), wmin)
    assert int_scales.grid_codes(wscale, np.zeros_like(wmin)) is not None  # no offsets: still a grid
    off = wscale.copy()
    off[2, 1] *= 1.0 + 2.0**-20  # one scale off the grid (needs ~28 bits): not a grid
    assert int_scales.grid_codes(off, wmin) is None
    big = wscale.copy()
    big[0] = np.ldexp(np.array([1.0, 3.0, 511.0, 2.0]), -10)  # scale codes beyond 255
    assert int_scales.grid_codes(big, wmin) is None
    assert int_scales.grid_codes(wscale, wmin * 4096) is None  # offset codes beyond 2047


def test_k_chunks_and_where_the_kernel_applies():
    assert int_scales.k_chunks(576, 32) == 1
    assert int_scales.k_chunks(1536, 32) == 2  # two chunks of 768
    assert int_scales.k_chunks(96, 32) is None  # three groups: no chunk of an even number of groups
    assert int_scales.k_chunks(11008, 32) * int_scales.MAX_CHUNK_K >= 11008
    assert int_scales.applicable("avx2", 576, 32) and not int_scales.applicable("neon", 576, 32)
    assert not int_scales.applicable("avx2", 96, 32)
    with pytest.raises(UserError, match="chunking"):
        int_scales.int_scale_linear_func(16, 96, TARGET, group_size=32)
