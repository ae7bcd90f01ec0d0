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


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype,alibi,m", DECODE_CASES)
def test_decode_attention_equals_plain_loops(heads, kv_heads, head_dim, dtype, alibi, m, parallel):
    """The decode kernel (one query over m cached keys) against the plain loops; INT8 also bit for bit against the
    blocked kernel at n = 1 (its Q.K is an exact integer dot in any order, the softmax sums and AttnV keep the
    blocked kernel's order), so switching decode to it changes no decoded token."""
    from agile_tvm.frontend import tir_ops

    arrays = _inputs(heads, kv_heads, head_dim, dtype, 1, m)
    q = arrays[0]
    want = _run(tir_ops.attention(heads, kv_heads, head_dim, dtype, 4, alibi), arrays, q.shape)
    got = _run(tir_ops.attention_decode(heads, kv_heads, head_dim, dtype, 4, alibi, parallel=parallel), arrays,
               q.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if dtype == "int8":
        blocked = _run(tir_ops.attention_blocked(heads, kv_heads, head_dim, dtype, 4, alibi), arrays, q.shape)
        np.testing.assert_array_equal(got, blocked)
