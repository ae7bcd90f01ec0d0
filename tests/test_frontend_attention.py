"""The frontend's blocked causal attention (`tir_ops.attention_blocked`, what every compiled model runs) equals the
plain whole-matrix loops that state the contract's math (`tir_ops.attention`), for INT8 (log2 softmax) and float
K/V, GQA, ALiBi, odd head sizes, a prefill chunk after cached keys (n < m), decode (n = 1) and other chunks of at most
ATTN_DIRECT_MAX_QUERIES queries (K/V read in place, no float copies), and enough positions for several query blocks
and key blocks with a ragged end. The decode kernel (`tir_ops.attention_decode`, n = 1) is checked the same way, at
cache lengths 1, ragged and whole multiples of its lane block, and for INT8 also bit for bit against the blocked one.

Tolerance rtol 1e-5 / atol 1e-6 (outputs ~1): the two differ only by float32 summation order, the exp polynomial
vs libm exp, and the order of the score scale's multiplies (~1e-7 relative each); the integer parts (INT8 Q.K,
log2 codes) agree exactly on these inputs, and a single differing log2 code would move an output by ~1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest

CASES = [  # heads, kv_heads, head_dim, kv dtype, alibi, n queries, m keys
    (9, 3, 64, "int8", False, 37, 37),
    (9, 3, 64, "int8", False, 5, 50),
    (9, 3, 64, "int8", False, 1, 23),
    (9, 3, 64, "int8", False, 4, 40),
    (4, 4, 12, "int8", True, 19, 19),
    (3, 1, 32, "int8", False, 203, 203),
    (4, 2, 16, "float32", False, 21, 21),
    (4, 4, 16, "float32", True, 1, 9),
    (4, 4, 16, "float32", True, 3, 30),
    (2, 2, 8, "float32", False, 70, 90),
]


DECODE_CASES = [  # heads, kv_heads, head_dim, kv dtype, alibi, m keys (n = 1): m = 1, ragged and whole lane blocks
    (9, 3, 64, "int8", False, 1),
    (9, 3, 64, "int8", False, 13),
    (9, 3, 64, "int8", False, 512),
    (9, 3, 64, "int8", False, 517),
    (4, 4, 16, "int8", True, 37),
    (6, 2, 8, "int8", False, 64),
    (4, 2, 16, "float32", False, 1),
    (4, 2, 16, "float32", False, 45),
    (4, 4, 24, "float32", True, 30),
]


def _inputs(heads, kv_heads, head_dim, dtype, n, m):
    rng = np.random.RandomState(n * 1000 + m)
    q = rng.randn(n, heads, head_dim).astype("float32")
    if dtype == "int8":
        k = rng.randint(-127, 128, (m, kv_heads, head_dim)).astype("int8")
        v = rng.randint(-127, 128, (m, kv_heads, head_dim)).astype("int8")
    else:
        k = rng.randn(m, kv_heads, head_dim).astype("float32")
        v = rng.randn(m, kv_heads, head_dim).astype("float32")
    scales = np.array([0.02, 0.05, 0.01], "float32")  # q, k, v scales: INT8 scores use every log2 code, top too
    slopes = (rng.rand(heads) * 0.2).astype("float32")
    return q, k, v, scales, slopes


def _run(func, arrays, out_shape):
    import tvm

    from agile_tvm.targets import get_target

    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target("host"))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)]
    ex.mod["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype,alibi,n,m", CASES)
def test_blocked_attention_equals_plain_loops(heads, kv_heads, head_dim, dtype, alibi, n, m):
    from agile_tvm.frontend import tir_ops

    arrays = _inputs(heads, kv_heads, head_dim, dtype, n, m)
    q = arrays[0]
    want = _run(tir_ops.attention(heads, kv_heads, head_dim, dtype, 4, alibi), arrays, q.shape)
    got = _run(tir_ops.attention_blocked(heads, kv_heads, head_dim, dtype, 4, alibi), arrays, q.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


INT16_DOT_CASES = [c for c in CASES if c[3] == "int8"]


@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype,alibi,n,m", INT16_DOT_CASES)
def test_int16_dot_attention_equals_float_dot_bit_for_bit(heads, kv_heads, head_dim, dtype, alibi, n, m):
    """INT8 Q.K by pmaddwd on int16 codes (`int16_dot`, what AVX2 models run) gives the exact integer dots the
    float32 FMAs give (both exact below 2^24), so the same outputs to the last bit; and the plain loops' within
    tolerance (the chunks of at most ATTN_DIRECT_MAX_QUERIES queries keep the float path)."""
    from agile_tvm.frontend import tir_ops
    from agile_tvm.targets import get_target, isa_of

    if isa_of(get_target("host")) not in ("avx2", "avx512"):
        pytest.skip("pmaddwd needs an AVX2 host")
    arrays = _inputs(heads, kv_heads, head_dim, dtype, n, m)
    q = arrays[0]
    got = _run(tir_ops.attention_blocked(heads, kv_heads, head_dim, dtype, 4, alibi, int16_dot=True), arrays, q.shape)
    floats = _run(tir_ops.attention_blocked(heads, kv_heads, head_dim, dtype, 4, alibi), arrays, q.shape)
    np.testing.assert_array_equal(got.view(np.int32), floats.view(np.int32))
    want = _run(tir_ops.attention(heads, kv_heads, head_dim, dtype, 4, alibi), arrays, q.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _decode_variants():
    """(case..., parallel, int16_dot): every case serial and parallel; the int16 dot (parallel, the models' choice)
    on the cases it applies to (INT8, head_dim a multiple of 16; it needs an AVX2 host)."""
    from agile_tvm.targets import get_target, isa_of

    avx2 = isa_of(get_target("host")) in ("avx2", "avx512")
    for case in DECODE_CASES:
        yield (*case, False, False)
        yield (*case, True, False)
        if case[3] == "int8" and case[2] % 16 == 0:
            yield pytest.param(*case, True, True, marks=pytest.mark.skipif(not avx2, reason="pmaddwd needs AVX2"))


@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype,alibi,m,parallel,int16_dot", list(_decode_variants()))
def test_decode_attention_equals_plain_loops(heads, kv_heads, head_dim, dtype, alibi, m, parallel, int16_dot):
    """The decode kernel (one query over m cached keys) against the plain loops; INT8 also bit for bit against the
    blocked kernel at n = 1 (its Q.K is an exact integer dot in any order, float32 or pmaddwd, the softmax sums and
    AttnV keep the blocked kernel's order), so switching decode to it changes no decoded token."""
    from agile_tvm.frontend import tir_ops

    arrays = _inputs(heads, kv_heads, head_dim, dtype, 1, m)
    q = arrays[0]
    want = _run(tir_ops.attention(heads, kv_heads, head_dim, dtype, 4, alibi), arrays, q.shape)
    got = _run(tir_ops.attention_decode(heads, kv_heads, head_dim, dtype, 4, alibi, parallel=parallel,
                                        int16_dot=int16_dot), arrays, q.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if dtype == "int8":
        blocked = _run(tir_ops.attention_blocked(heads, kv_heads, head_dim, dtype, 4, alibi), arrays, q.shape)
        np.testing.assert_array_equal(got, blocked)



def _chunk_crossing_inputs(n: int, head_dim: int):
    """One head whose scores step by ln 2 per unit of K's first code, so key j's log2 code is 127 - K[j, 0, 0]:
    ~90% of keys get code 0 (weight 2^14) and the rest codes 1..14 (the low bits), with V codes in 100..127. Each
    chunk's int32 sum is then ~10^9, past float32's 2^24, so where a chunk ends decides how the sum rounds."""
    rng = np.random.RandomState(7)
    scales = np.array([0.1, np.log(2) * np.sqrt(head_dim) / 127 / 0.1, 0.01], "float32")
    q = np.zeros((n, 1, head_dim), "float32")
    q[:, 0, 0] = 127 * scales[0]  # q8 = (127, 0, ...)
    codes = np.where(rng.rand(n) < 0.9, 0, rng.randint(1, 15, n))
    k = rng.randint(-127, 128, (n, 1, head_dim)).astype("int8")
    k[:, 0, 0] = 127 - codes
    v = rng.randint(100, 128, (n, 1, head_dim)).astype("int8")
    return q, k, v, scales, np.zeros(1, "float32")


@pytest.mark.parametrize("int16_dot", [False, True])
def test_prefill_and_decode_agree_across_int32_attn_v_chunks(int16_dot):
    """INT8 AttnV sums 2^(top-1-c) * v8 in int32 per chunk of `attn_v_key_chunk` keys (1024 for 4 bits), each
    chunk converted and added in float32. Past one chunk (m = 1100: a whole chunk and a ragged one) the blocked
    prefill's last row and the decode kernel for that query still agree bit for bit, on chunk sums large enough
    that a chunk ending elsewhere would round differently; and the blocked kernel's sum is the contract's exact sum
    rounded once per chunk, against float64 (the plain loops' float32 sum would not be)."""
    from agile_tvm.frontend import tir_ops
    from agile_tvm.targets import get_target, isa_of

    if int16_dot and isa_of(get_target("host")) not in ("avx2", "avx512"):
        pytest.skip("pmaddwd needs an AVX2 host")
    n, head_dim, chunk = 1100, 64, tir_ops.attn_v_key_chunk(4)
    assert chunk < n < 2 * chunk
    q, k, v, scales, slopes = _chunk_crossing_inputs(n, head_dim)
    blocked = _run(tir_ops.attention_blocked(1, 1, head_dim, "int8", 4, False, int16_dot=int16_dot),
                   (q, k, v, scales, slopes), q.shape)
    decode = _run(tir_ops.attention_decode(1, 1, head_dim, "int8", 4, False),
                  (q[-1:], k, v, scales, slopes), (1, 1, head_dim))
    np.testing.assert_array_equal(decode[0].view(np.int32), blocked[-1].view(np.int32))

    codes = 127 - k[:, 0, 0].astype(np.int64)  # the last row's log2 codes: every key is causal for it
    w = (2 ** (14 - codes))[:, None] * v[:, 0, :].astype(np.int64)
    sums = [w[:chunk].sum(0), w[chunk:].sum(0)]
    assert min(s.min() for s in sums) > 2**24  # the chunk sums do round in float32
    S = (np.float32(sums[0]) + np.float32(sums[1])) * np.float32(2.0**-14)
    pmax = np.float32(1) / np.float32(np.sum(2.0 ** -codes))  # exp(-c ln 2) summed: ~1 ulp of the kernel's sum
    np.testing.assert_allclose(blocked[-1, 0], S * (scales[2] * pmax), rtol=1e-6)


@pytest.mark.parametrize("bits", [3, 5])
def test_other_softmax_widths(bits):
    """3-bit codes take the integer AttnV (weights to 2^6, chunks of 2^18 keys), 5-bit codes the float32 one
    (weights to 2^30 fit neither int16 nor a useful int32 chunk): both equal the plain loops, and decode equals
    the blocked kernel bit for bit."""
    from agile_tvm.frontend import tir_ops

    assert (bits <= tir_ops.ATTN_INT_AV_MAX_BITS) == (bits == 3)
    arrays = _inputs(9, 3, 64, "int8", 37, 37)
    q = arrays[0]
    want = _run(tir_ops.attention(9, 3, 64, "int8", bits, False), arrays, q.shape)
    got = _run(tir_ops.attention_blocked(9, 3, 64, "int8", bits, False, int16_dot=True), arrays, q.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    decode = _run(tir_ops.attention_decode(9, 3, 64, "int8", bits, False, parallel=True),
                  (q[-1:], *arrays[1:]), (1, 9, 64))
    np.testing.assert_array_equal(decode[0], got[-1])
