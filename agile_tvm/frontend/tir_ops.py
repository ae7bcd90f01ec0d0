"""The frontend's own TensorIR: attention (INT8 Q.K, log2 softmax, AttnV, or float), the symmetric INT8
quantizer of Q/K/V, SwiGLU and the packed-table embedding (docs/checkpoint.md).

Every linear (integer and float) runs on `agile_tvm.kernels` instead; the frontend keeps no second copy of the
linear math, so there is one implementation of each contract formula to keep right.

Conventions: batch 1 is squeezed, so activations are [n, C] with a symbolic token count n (int64) and the attention
key length m. Per-tensor scalars (scales) are 1-element tensors, not constants, so one compiled kernel serves every
layer of the same shape.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from tvm.script import tirx as T


@functools.lru_cache(maxsize=None)
def quant_sym_int8(c: int, parallel: bool = True):
    """Symmetric INT8 for Q, K, V: q8 = clip(floor(x / s + 0.5), -127, 127). Parallel: left to the generic hand
    schedule; `parallel=False` marks it scheduled, so it stays one serial loop (decode's single row)."""

    @T.prim_func(private=True, s_tir=True)
    def func(x_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": not parallel})
        n = T.int64()
        X = T.match_buffer(x_h, (n, c), "float32")
        S = T.match_buffer(s_h, (1,), "float32")
        Y = T.match_buffer(y_h, (n, c), "int8")
        for i, j in T.grid(n, c):
            with T.sblock("q8"):
                vi, vj = T.axis.remap("SS", [i, j])
                Y[vi, vj] = T.Cast(
                    "int8",
                    T.max(T.min(T.floor(X[vi, vj] / S[0] + T.float32(0.5)), T.float32(127)), T.float32(-127)),
                )

    return func


@functools.lru_cache(maxsize=None)
def attention(heads: int, kv_heads: int, head_dim: int, kv_dtype: str, softmax_bits: int, alibi: bool):
    """Causal attention of n queries over m keys (the last n keys are the queries' own positions), as plain
    whole-matrix loops: the readable statement of the math. Compiled models run `attention_blocked`, the fast
    form; tests/test_frontend_attention.py checks the two agree.

    kv_dtype "int8": the contract's INT8 Q.K (exact integer dot, held in float32: |dot| <= 127^2 * D < 2^24),
    float32 softmax, log2 softmax codes, and AttnV `out = v_scale * pmax * sum_j 2^-c * v8` accumulated in
    float32 (the contract's integer shift-add sum up to float32 rounding, ~1e-7 relative).
    kv_dtype "float32": plain float attention (the `fp` checkpoint and configs that keep attention float).
    `scale[0..2]` = q_scale, k_scale, v_scale (ignored for float); `slopes` = ALiBi slopes per head (BLOOM).
    """
    group = heads // kv_heads
    inv_sqrt = 1.0 / math.sqrt(head_dim)
    top = 2**softmax_bits - 1
    quant = kv_dtype == "int8"
    use_alibi = alibi

    @T.prim_func(private=True, s_tir=True)
    def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, s_h: T.handle, sl_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        m = T.int64()
        Q = T.match_buffer(q_h, (n, heads, head_dim), "float32")
        K = T.match_buffer(k_h, (m, kv_heads, head_dim), kv_dtype)
        V = T.match_buffer(v_h, (m, kv_heads, head_dim), kv_dtype)
        SC = T.match_buffer(s_h, (3,), "float32")
        SL = T.match_buffer(sl_h, (heads,), "float32")
        O = T.match_buffer(o_h, (n, heads, head_dim), "float32")
        q8 = T.sblock_alloc_buffer((n, heads, head_dim), "float32")
        score = T.sblock_alloc_buffer((heads, n, m), "float32")
        smax = T.sblock_alloc_buffer((heads, n), "float32")
        ssum = T.sblock_alloc_buffer((heads, n), "float32")
        prob = T.sblock_alloc_buffer((heads, n, m), "float32")
        for i, h, d in T.grid(n, heads, head_dim):
            with T.sblock("qq"):
                vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                if quant:
                    q8[vi, vh, vd] = T.max(
                        T.min(T.floor(Q[vi, vh, vd] / SC[0] + T.float32(0.5)), T.float32(127)), T.float32(-127)
                    )
                else:
                    q8[vi, vh, vd] = Q[vi, vh, vd]
        for h, i, j, d in T.grid(heads, n, m, head_dim):
            with T.sblock("qk"):
                vh, vi, vj, vd = T.axis.remap("SSSR", [h, i, j, d])
                with T.init():
                    score[vh, vi, vj] = T.float32(0)
                score[vh, vi, vj] = score[vh, vi, vj] + q8[vi, vh, vd] * T.Cast("float32", K[vj, vh // group, vd])
        for h, i, j in T.grid(heads, n, m):
            with T.sblock("scale"):
                vh, vi, vj = T.axis.remap("SSS", [h, i, j])
                if quant:
                    score[vh, vi, vj] = score[vh, vi, vj] * SC[0] * SC[1] * T.float32(inv_sqrt)
                else:
                    score[vh, vi, vj] = score[vh, vi, vj] * T.float32(inv_sqrt)
                if use_alibi:
                    score[vh, vi, vj] = score[vh, vi, vj] + SL[vh] * T.Cast("float32", vj)
        for h, i, j in T.grid(heads, n, m):
            with T.sblock("max"):
                vh, vi, vj = T.axis.remap("SSR", [h, i, j])
                with T.init():
                    smax[vh, vi] = T.float32(-3.0e38)
                smax[vh, vi] = T.max(
                    smax[vh, vi], T.if_then_else(vj <= m - n + vi, score[vh, vi, vj], T.float32(-3.0e38))
                )
        for h, i, j in T.grid(heads, n, m):
            with T.sblock("exp"):
                vh, vi, vj = T.axis.remap("SSS", [h, i, j])
                prob[vh, vi, vj] = T.if_then_else(
                    vj <= m - n + vi, T.exp(score[vh, vi, vj] - smax[vh, vi]), T.float32(0)
                )
        for h, i, j in T.grid(heads, n, m):
            with T.sblock("sum"):
                vh, vi, vj = T.axis.remap("SSR", [h, i, j])
                with T.init():
                    ssum[vh, vi] = T.float32(0)
                ssum[vh, vi] = ssum[vh, vi] + prob[vh, vi, vj]
        for h, i, j in T.grid(heads, n, m):
            with T.sblock("norm"):
                vh, vi, vj = T.axis.remap("SSS", [h, i, j])
                if quant:
                    # p / pmax with pmax = max_j p = 1 / sum; code 2^b - 1 (and masked keys) mean zero.
                    prob[vh, vi, vj] = T.if_then_else(
                        prob[vh, vi, vj] > T.float32(0),
                        T.min(
                            T.max(
                                T.floor(
                                    T.float32(0)
                                    - T.log2((prob[vh, vi, vj] / ssum[vh, vi]) / (T.float32(1) / ssum[vh, vi]))
                                    + T.float32(0.5)
                                ),
                                T.float32(0),
                            ),
                            T.float32(top),
                        ),
                        T.float32(top),
                    )
                    prob[vh, vi, vj] = T.if_then_else(
                        prob[vh, vi, vj] < T.float32(top),
                        T.exp2(T.float32(0) - prob[vh, vi, vj]),
                        T.float32(0),
                    )
                else:
                    prob[vh, vi, vj] = prob[vh, vi, vj] / ssum[vh, vi]
        for i, h, d, j in T.grid(n, heads, head_dim, m):
            with T.sblock("av"):
                vi, vh, vd, vj = T.axis.remap("SSSR", [i, h, d, j])
                with T.init():
                    O[vi, vh, vd] = T.float32(0)
                O[vi, vh, vd] = O[vi, vh, vd] + prob[vh, vi, vj] * T.Cast("float32", V[vj, vh // group, vd])
        if quant:
            for i, h, d in T.grid(n, heads, head_dim):
                with T.sblock("vscale"):
                    vi, vh, vd = T.axis.remap("SSS", [i, h, d])
                    O[vi, vh, vd] = O[vi, vh, vd] * (SC[2] * (T.float32(1) / ssum[vh, vi]))

    return func


def _exp_nonpositive(x):
    """e^x for x <= 0 in float32 without a libm call (so the row loops vectorize): Cody-Waite reduction
    x = k ln2 + r, |r| <= ln2/2, then a degree-7 Taylor polynomial (error < 3e-9 relative, i.e. within ~1 ulp
    of torch's expf) and 2^k built from the exponent bits. Inputs below -87 give ~0 (like expf)."""
    from tvm import tirx

    f = lambda v: tirx.const(v, "float32")  # noqa: E731
    x = tirx.max(x, f(-87.0))
    k = tirx.floor(x * f(1.4426950408889634) + f(0.5))
    r = x - k * f(0.693359375) - k * f(-2.12194440e-4)
    p = f(1.0 / 5040.0)
    for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + f(c)
    bits = tirx.shift_left(tirx.Cast("int32", k) + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return p * tirx.reinterpret("float32", bits)


#: keys per block of the blocked attention (two 8-lane float vectors) and query rows per register tile
ATTN_KEY_BLOCK, ATTN_ROW_TILE = 16, 6
#: query positions per task of the blocked attention (each task: one KV head x this many positions x its heads)
ATTN_QUERY_BLOCK = 8
#: up to this many queries (decode: 1) the blocked attention reads the K/V codes directly instead of converting
#: the whole cache to float32 copies first (a copy of m keys would cost more than these few rows' work)
ATTN_DIRECT_MAX_QUERIES = 4


#: accumulators of the AttnV register tile (of AVX2's 16 vector registers; the rest hold V and a weight)
ATTN_AV_ACCUMULATORS = 48
#: the widest log2 softmax whose AttnV runs in integers: weights 2^(top-1-c) must fit int16 (pmaddwd) and a
#: useful chunk of keys int32; 5-bit codes (weights to 2^30) keep the float32 AttnV
ATTN_INT_AV_MAX_BITS = 4


def attn_v_key_chunk(softmax_bits: int) -> int:
    """Keys per int32 AttnV sum (INT8 K/V): |v8| * 2^(top - 1) * chunk < 2^31 (`kernels.attention.attn_v_chunk`),
    a whole number of key blocks. Chunks start at absolute key indices (0, chunk, 2 chunk, ...) in every attention
    kernel, so each sums the same integers and converts them the same way: prefill and decode agree bit for bit."""
    from agile_tvm.kernels.attention import attn_v_chunk

    step = ATTN_KEY_BLOCK * DECODE_LANES // math.gcd(ATTN_KEY_BLOCK, DECODE_LANES)
    return attn_v_chunk(softmax_bits) // step * step


def _attention_value_chunk(head_dim: int, group: int) -> int:
    """Values of head_dim per AttnV register tile: the largest divisor of head_dim with group x chunk floats
    within ATTN_AV_ACCUMULATORS (SmolLM2: 3 heads x 32)."""
    limit = max(1, ATTN_AV_ACCUMULATORS // group)
    return max(c for c in range(1, head_dim + 1) if head_dim % c == 0 and c <= limit)


@functools.lru_cache(maxsize=None)
def attention_blocked(heads: int, kv_heads: int, head_dim: int, kv_dtype: str, softmax_bits: int, alibi: bool,
                      first_probs: bool = False, key_positions: bool = False, int16_dot: bool = False):
    """The causal attention of `attention`, organised for speed at long sequences.

    Work: one task per (KV head g, block of ATTN_QUERY_BLOCK query positions), i.e. the block's positions times
    the `heads // kv_heads` query heads sharing g (GQA: each K/V value loaded serves all of them). Tasks run in
    parallel, ordered zig-zag over query blocks (cheap early blocks next to costly late ones), so the contiguous
    task ranges TVM gives each thread carry equal causal work. Keys are visited in blocks of ATTN_KEY_BLOCK, only
    up to the block's last causal key: the upper triangle is skipped but for the diagonal blocks.
    0. K and V are converted once per call to float32 copies, K transposed to [KVH, D, m] so a block of keys is a
       contiguous vector; INT8 codes are exact in float32 (INT8 V is read in place, as integers). With at most
       ATTN_DIRECT_MAX_QUERIES queries (decode) the loops below read K and V in place instead: the same values, so
       the same results bit for bit. `int16_dot` (AVX2 targets, INT8): K goes to int16 pairs [KVH, D/2, m, 2]
       instead, for step 1's pmaddwd, and V to int16 key pairs [KVH, m/2, D, 2] for step 3's.
    1. Q.K for a register tile of ATTN_ROW_TILE rows x ATTN_KEY_BLOCK keys by FMAs over d. INT8: the products and
       sums are integers below 2^24 (|dot| <= 127^2 * D), so the float32 dot *is* the contract's int32 dot.
       `int16_dot`: the same dot in int32 by pmaddwd (16 products an instruction, twice an FMA's 8; 10-20% off the
       kernel at 512-2048 tokens, measured), converted to float32: the same floats, so the same results bit for bit.
       Scores = dot * (q_scale * k_scale / sqrt(D)) (the scale formed first, as the PyTorch reference does),
       + ALiBi; each row keeps a running max over its causal keys.
    2. Per query position and key block, for the position's `heads // kv_heads` rows (one causal limit): softmax
       numerators e_j = exp(s_j - max) with a polynomial exp (`_exp_nonpositive`, vectorized), summed per lane;
       INT8: the log2 code of p_j / pmax = e_j and its weight 2^-c from the float's exponent and mantissa bits
       (`_log2_weight`); the weights overwrite the scores, and the block is flagged when any is > 0.
    3. Per position, AttnV in register tiles of its rows x a chunk of head_dim (`_attention_value_chunk`) over
       all its flagged blocks (each V vector loaded once for the rows; a block whose keys are all dropped, the top
       code, is skipped: adding 0 changes nothing). INT8: the contract's exact sum S = sum_j 2^-c v8 as integers,
       sum_j 2^(top-1-c) v8 in int32 per chunk of `attn_v_key_chunk` keys (no overflow), each chunk converted
       and added in float32 in key order; out = (S * 2^-(top-1)) * (v_scale * pmax) (pmax = 1 / sum). Below
       2^24 / 2^(top-1) (1024 for 4 bits) |S| is exact, as the PyTorch reference's float64 sum (the float32 FMA
       sum it replaced rounded there). `int16_dot`: two keys per pmaddwd (weights 2^(top-1-c) <= 2^14 and V codes
       as int16 pairs, V converted once per call to [KVH, key pair, D, 2]), 16 products an instruction against
       8 per FMA, and no FMA latency chain. Float K/V: acc = sum_j e_j v_j in float32 by FMAs, out = acc / sum.
    Float32 results differ from the contract's formulas by summation order and the exp polynomial (~1 ulp).
    Scratch per task: its scores [rows, m] (~200 KB at m = 2048 for SmolLM2), so the row softmax stays exact (two
    passes over the scores, no online rescaling).
    """
    group = heads // kv_heads
    inv_sqrt = 1.0 / math.sqrt(head_dim)
    top = 2**softmax_bits - 1
    quant = kv_dtype == "int8"
    assert not quant or head_dim * 127 * 127 < 2**24, "INT8 Q.K no longer exact in float32"
    lanes, kb, rt, block, direct_max = 8, ATTN_KEY_BLOCK, ATTN_ROW_TILE, ATTN_QUERY_BLOCK, ATTN_DIRECT_MAX_QUERIES
    rows_max = (block * group + rt - 1) // rt * rt  # (position, head) rows of one task, position-major, padded
    dchunk = _attention_value_chunk(head_dim, group)
    idot = int16_dot and quant and head_dim % 2 == 0
    use_alibi = alibi
    iav = quant and softmax_bits <= ATTN_INT_AV_MAX_BITS  # INT8 AttnV in integers (else float32 FMAs)
    cb = attn_v_key_chunk(softmax_bits) // kb if iav else 1  # key blocks per int32 AttnV chunk
    vpair = idot and iav and dchunk % lanes == 0  # AttnV by pmaddwd on V key pairs (int32x8 tiles of 8 of d)
    I64 = T.int64

    @T.macro
    def numerators(sc, rmax, rsum, e, anyw, wi, p, b, limit, masked):
        for r in T.serial(I64(group)):
            for c in T.unroll(I64(kb // lanes)):
                for l in T.vectorized(I64(lanes)):
                    if masked:
                        e[l] = T.Select(b * kb + c * lanes + l < limit, _exp_nonpositive(
                            sc[p * group + r, b * kb + c * lanes + l] - rmax[p * group + r, 0]), T.float32(0))
                    else:
                        e[l] = _exp_nonpositive(sc[p * group + r, b * kb + c * lanes + l] - rmax[p * group + r, 0])
                    rsum[p * group + r, l] = rsum[p * group + r, l] + e[l]
                    if quant:
                        sc[p * group + r, b * kb + c * lanes + l] = _log2_weight(e[l], top)
                        if iav:
                            wi[p * group + r, b * kb + c * lanes + l] = _int_av_weight(
                                sc[p * group + r, b * kb + c * lanes + l], top, "int16")
                    else:
                        sc[p * group + r, b * kb + c * lanes + l] = e[l]
                    anyw[l] = T.max(anyw[l], sc[p * group + r, b * kb + c * lanes + l])

    @T.macro
    def body(Q, K, V, SC, SL, KP, O, P0, n, m):
        # float32 copies of K (transposed) and V, zero-padded by one key block; a stub when reading K/V directly
        KT = T.decl_buffer((kv_heads, head_dim, T.int64(1) if idot else T.Select(n <= direct_max, T.int64(1), m + kb)),
                           "float32")
        # int16_dot: the K codes as int16 for pmaddwd, [g, d / 2, key, 2] (a d pair's two codes side by side)
        KI = T.decl_buffer((kv_heads, head_dim // 2 if idot else 1,
                            T.Select(n <= direct_max, T.int64(1), m + kb) if idot else T.int64(1), 2), "int16")
        VF = T.decl_buffer((kv_heads, T.int64(1) if iav else T.Select(n <= direct_max, T.int64(1), m + kb),
                            head_dim), "float32")
        # int16_dot: the V codes as int16 key pairs for AttnV's pmaddwd, [g, key // 2, d, key % 2]
        VI = T.decl_buffer((kv_heads, T.Select(n <= direct_max, T.int64(1), (m + kb + 1) // 2) if vpair else T.int64(1),
                            head_dim if vpair else 1, 2), "int16")
        if n > direct_max:
            for j in T.parallel(m + kb):
                for g in T.serial(I64(kv_heads)):
                    if idot:
                        for dp, e2 in T.grid(I64(head_dim // 2), I64(2)):
                            KI[g, dp, j, e2] = T.if_then_else(
                                j < m, T.Cast("int16", K[T.min(j, m - 1), g, dp * 2 + e2]), T.int16(0))
                    else:
                        for d in T.serial(I64(head_dim)):
                            KT[g, d, j] = T.if_then_else(j < m, T.Cast("float32", K[T.min(j, m - 1), g, d]),
                                                         T.float32(0))
                    if vpair:
                        if j % 2 == 0:
                            for e2 in T.unroll(I64(2)):
                                for d in T.vectorized(I64(head_dim)):
                                    VI[g, j // 2, d, e2] = T.if_then_else(
                                        j + e2 < m, T.Cast("int16", V[T.min(j + e2, m - 1), g, d]), T.int16(0))
                    elif not iav:
                        for d in T.vectorized(I64(head_dim)):
                            VF[g, j, d] = T.if_then_else(j < m, T.Cast("float32", V[T.min(j, m - 1), g, d]),
                                                         T.float32(0))
        nqb = (n + block - 1) // block
        for t in T.parallel(kv_heads * nqb):
            qf = T.decl_buffer((rows_max, head_dim), "float32")
            sc = T.decl_buffer((rows_max, m + kb), "float32")
            tile = T.decl_buffer((rt, kb), "float32", scope="local")
            tile_i = T.decl_buffer((rt, kb), "int32", scope="local")
            qi = T.decl_buffer((rows_max, head_dim if idot else 2), "int16")
            rmax = T.decl_buffer((rows_max, lanes), "float32")
            rsum = T.decl_buffer((rows_max, lanes), "float32")
            rs = T.decl_buffer((rows_max,), "float32")
            e = T.decl_buffer((lanes,), "float32", scope="local")
            anyw = T.decl_buffer((lanes,), "float32", scope="local")
            flag = T.decl_buffer((block, (m + kb - 1) // kb + 1), "float32")
            at = T.decl_buffer((group, dchunk), "float32", scope="local")
            at_i = T.decl_buffer((group, dchunk if iav else 1), "int32", scope="local")
            wi = T.decl_buffer((rows_max if iav else 1, m + kb if iav else 1), "int16")
            red = T.decl_buffer((2,), "float32")
            g = t % kv_heads
            s = t // kv_heads
            qb = T.if_then_else(s % 2 == 0, s // 2, nqb - 1 - s // 2)
            i0 = qb * block
            nrows = T.min(n - i0, block) * group  # row r: position i0 + r // group, head g * group + r % group
            nkb = (m - n + i0 + nrows // group + kb - 1) // kb  # key blocks up to the last row's causal limit
            if quant:
                red[0] = SC[0] * SC[1] * T.float32(inv_sqrt)
            else:
                red[0] = T.float32(inv_sqrt)
            for r in T.serial(I64(rows_max)):
                for d in T.vectorized(I64(head_dim)):
                    if quant:
                        qf[r, d] = T.if_then_else(r < nrows, T.max(T.min(T.floor(
                            Q[T.min(i0 + r // group, n - 1), g * group + r % group, d] / SC[0] + T.float32(0.5)),
                            T.float32(127)), T.float32(-127)), T.float32(0))
                    else:
                        qf[r, d] = T.if_then_else(
                            r < nrows, Q[T.min(i0 + r // group, n - 1), g * group + r % group, d], T.float32(0))
                if idot:
                    for d in T.vectorized(I64(head_dim)):
                        qi[r, d] = T.Cast("int16", qf[r, d])
                for l in T.vectorized(I64(lanes)):
                    rmax[r, l] = T.float32(-3.0e38)
                    rsum[r, l] = T.float32(0)
            for b in T.serial(nkb):
                for rr in T.serial((nrows + rt - 1) // rt):
                    for r, l in T.grid(I64(rt), I64(kb)):
                        tile[r, l] = T.float32(0)
                    if idot and n > direct_max:  # exact int32 dots, 16 products per pmaddwd: the same floats
                        for r, l in T.grid(I64(rt), I64(kb)):
                            tile_i[r, l] = 0
                        for dp in T.serial(I64(head_dim // 2)):
                            for r in T.unroll(I64(rt)):
                                for c in T.unroll(I64(kb // lanes)):
                                    tile_i[r, T.ramp(c * lanes, 1, lanes)] = tile_i.vload(
                                        [r, c * lanes], "int32x8") + _pmaddwd_pair(
                                        qi.vload([rr * rt + r, dp * 2], "int16x2"),
                                        KI.vload([g, dp, b * kb + c * lanes, 0], "int16x16"))
                        for r in T.unroll(I64(rt)):
                            for l in T.vectorized(I64(kb)):
                                tile[r, l] = T.Cast("float32", tile_i[r, l])
                    else:
                        for d in T.serial(I64(head_dim)):
                            if n <= direct_max:  # keys past m are clamped to a real key, masked below
                                for r in T.unroll(I64(rt)):
                                    for l in T.vectorized(I64(kb)):
                                        tile[r, l] = tile[r, l] + qf[rr * rt + r, d] * T.Cast(
                                            "float32", K[T.min(b * kb + l, m - 1), g, d])
                            else:
                                for r in T.unroll(I64(rt)):
                                    for l in T.vectorized(I64(kb)):
                                        tile[r, l] = tile[r, l] + qf[rr * rt + r, d] * KT[g, d, b * kb + l]
                    for r in T.unroll(I64(rt)):
                        for l in T.vectorized(I64(kb)):
                            sc[rr * rt + r, b * kb + l] = tile[r, l] * red[0]
                            if use_alibi:
                                if key_positions:
                                    sc[rr * rt + r, b * kb + l] = sc[rr * rt + r, b * kb + l] + SL[
                                        g * group + (rr * rt + r) % group] * T.Cast(
                                        "float32", KP[T.min(b * kb + l, m - 1)])
                                else:
                                    sc[rr * rt + r, b * kb + l] = sc[rr * rt + r, b * kb + l] + SL[
                                        g * group + (rr * rt + r) % group] * T.Cast("float32", b * kb + l)
                        for c in T.unroll(I64(kb // lanes)):
                            for l in T.vectorized(I64(lanes)):
                                rmax[rr * rt + r, l] = T.max(rmax[rr * rt + r, l], T.Select(
                                    b * kb + c * lanes + l < m - n + i0 + (rr * rt + r) // group + 1,
                                    sc[rr * rt + r, b * kb + c * lanes + l], T.float32(-3.0e38)))
            for r in T.serial(nrows):
                red[1] = T.float32(-3.0e38)
                for l in T.serial(I64(lanes)):
                    red[1] = T.max(red[1], rmax[r, l])
                rmax[r, 0] = red[1]
            # 2a. per position p and key block b, for the position's `group` rows (same causal limit): softmax
            # numerators into rsum, their weights over the scores in sc, and whether any weight of the block is > 0
            for p in T.serial(nrows // group):
                for b in T.serial((m - n + i0 + p + kb) // kb):
                    for l in T.vectorized(I64(lanes)):
                        anyw[l] = T.float32(0)
                    if (b + 1) * kb <= m - n + i0 + p + 1:  # every key of the block is causal: no mask
                        numerators(sc, rmax, rsum, e, anyw, wi, p, b, m - n + i0 + p + 1, False)
                    else:
                        numerators(sc, rmax, rsum, e, anyw, wi, p, b, m - n + i0 + p + 1, True)
                    for l in T.vectorized(I64(4)):
                        anyw[l] = T.max(anyw[l], anyw[l + 4])
                    flag[p, b] = T.max(T.max(anyw[0], anyw[1]), T.max(anyw[2], anyw[3]))
            for r in T.serial(nrows):
                rs[r] = T.float32(0)
                for l in T.serial(I64(lanes)):
                    rs[r] = rs[r] + rsum[r, l]
                if first_probs:
                    if quant:  # p^ = pmax * 2^-c, pmax = 1 / sum (the reference's log2_dequant); sc[r, 0]: key 0
                        P0[i0 + r // group, g * group + r % group] = sc[r, 0] * (T.float32(1) / rs[r])
                    else:
                        P0[i0 + r // group, g * group + r % group] = sc[r, 0] / rs[r]
            # 2b/3. out = sum_j w_j v_j over the causal keys, per position: its `group` rows x `dchunk` values of
            # head_dim accumulate in registers over all key blocks (each V value loaded once for the group), keys
            # in ascending order as before; blocks whose weights are all 0 are skipped (adding 0 changes nothing)
            for p in T.serial(nrows // group):
                for hc in T.serial(I64(head_dim // dchunk)):
                    for r, l in T.grid(I64(group), I64(dchunk)):
                        at[r, l] = T.float32(0)
                    if iav:  # exact int32 sums per chunk of cb key blocks, each added to the float sum in order
                        for ch in T.serial(((m - n + i0 + p + kb) // kb + cb - 1) // cb):
                            for r, l in T.grid(I64(group), I64(dchunk)):
                                at_i[r, l] = 0
                            for b in T.serial(ch * cb, T.min((ch + 1) * cb, (m - n + i0 + p + kb) // kb)):
                                if flag[p, b] > T.float32(0):
                                    if vpair and n > direct_max:  # two keys per pmaddwd
                                        for jp in T.serial(I64(kb // 2)):
                                            for r in T.unroll(I64(group)):
                                                for c in T.unroll(I64(dchunk // lanes)):
                                                    at_i[r, T.ramp(c * lanes, 1, lanes)] = at_i.vload(
                                                        [r, c * lanes], "int32x8") + _pmaddwd_pair(
                                                        wi.vload([p * group + r, b * kb + jp * 2], "int16x2"),
                                                        VI.vload([g, b * (kb // 2) + jp, hc * dchunk + c * lanes, 0],
                                                                 "int16x16"))
                                    else:  # keys past m: weight 0, V row clamped to a real one
                                        for jj in T.serial(I64(kb)):
                                            for r in T.unroll(I64(group)):
                                                for l in T.vectorized(I64(dchunk)):
                                                    at_i[r, l] = at_i[r, l] + T.Cast(
                                                        "int32", wi[p * group + r, b * kb + jj]) * T.Cast(
                                                        "int32", V[T.min(b * kb + jj, m - 1), g, hc * dchunk + l])
                            for r in T.unroll(I64(group)):
                                for l in T.vectorized(I64(dchunk)):
                                    at[r, l] = at[r, l] + T.Cast("float32", at_i[r, l])
                    else:
                        for b in T.serial((m - n + i0 + p + kb) // kb):
                            if flag[p, b] > T.float32(0):
                                for jj in T.serial(I64(kb)):
                                    for r in T.unroll(I64(group)):
                                        if n <= direct_max:  # w is 0 for keys past m, whose V row is clamped
                                            for l in T.vectorized(I64(dchunk)):
                                                at[r, l] = at[r, l] + sc[p * group + r, b * kb + jj] * T.Cast(
                                                    "float32", V[T.min(b * kb + jj, m - 1), g, hc * dchunk + l])
                                        else:
                                            for l in T.vectorized(I64(dchunk)):
                                                at[r, l] = at[r, l] + sc[p * group + r, b * kb + jj] * VF[
                                                    g, b * kb + jj, hc * dchunk + l]
                    for r in T.serial(I64(group)):
                        for l in T.vectorized(I64(dchunk)):
                            if iav:
                                O[i0 + p, g * group + r, hc * dchunk + l] = _int_av_out(at[r, l], top, SC[2],
                                                                                        rs[p * group + r])
                            elif quant:
                                O[i0 + p, g * group + r, hc * dchunk + l] = at[r, l] * (
                                    SC[2] * (T.float32(1) / rs[p * group + r]))
                            else:
                                O[i0 + p, g * group + r, hc * dchunk + l] = at[r, l] / rs[p * group + r]


    if not first_probs and not key_positions:
        @T.prim_func(private=True)
        def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, s_h: T.handle, sl_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
            n = T.int64()
            m = T.int64()
            Q = T.match_buffer(q_h, (n, heads, head_dim), "float32")
            K = T.match_buffer(k_h, (m, kv_heads, head_dim), kv_dtype)
            V = T.match_buffer(v_h, (m, kv_heads, head_dim), kv_dtype)
            SC = T.match_buffer(s_h, (3,), "float32")
            SL = T.match_buffer(sl_h, (heads,), "float32")
            O = T.match_buffer(o_h, (n, heads, head_dim), "float32")
            body(Q, K, V, SC, SL, None, O, None, n, m)
    elif not key_positions:
        @T.prim_func(private=True)
        def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, s_h: T.handle, sl_h: T.handle, o_h: T.handle,
                 p0_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
            n = T.int64()
            m = T.int64()
            Q = T.match_buffer(q_h, (n, heads, head_dim), "float32")
            K = T.match_buffer(k_h, (m, kv_heads, head_dim), kv_dtype)
            V = T.match_buffer(v_h, (m, kv_heads, head_dim), kv_dtype)
            SC = T.match_buffer(s_h, (3,), "float32")
            SL = T.match_buffer(sl_h, (heads,), "float32")
            O = T.match_buffer(o_h, (n, heads, head_dim), "float32")
            P0 = T.match_buffer(p0_h, (n, heads), "float32")
            body(Q, K, V, SC, SL, None, O, P0, n, m)
    elif not first_probs:
        @T.prim_func(private=True)
        def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, s_h: T.handle, sl_h: T.handle, kp_h: T.handle,
                 o_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
            n = T.int64()
            m = T.int64()
            Q = T.match_buffer(q_h, (n, heads, head_dim), "float32")
            K = T.match_buffer(k_h, (m, kv_heads, head_dim), kv_dtype)
            V = T.match_buffer(v_h, (m, kv_heads, head_dim), kv_dtype)
            SC = T.match_buffer(s_h, (3,), "float32")
            SL = T.match_buffer(sl_h, (heads,), "float32")
            KP = T.match_buffer(kp_h, (m,), "int32")
            O = T.match_buffer(o_h, (n, heads, head_dim), "float32")
            body(Q, K, V, SC, SL, KP, O, None, n, m)
    else:
        @T.prim_func(private=True)
        def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, s_h: T.handle, sl_h: T.handle, kp_h: T.handle,
                 o_h: T.handle, p0_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
            n = T.int64()
            m = T.int64()
            Q = T.match_buffer(q_h, (n, heads, head_dim), "float32")
            K = T.match_buffer(k_h, (m, kv_heads, head_dim), kv_dtype)
            V = T.match_buffer(v_h, (m, kv_heads, head_dim), kv_dtype)
            SC = T.match_buffer(s_h, (3,), "float32")
            SL = T.match_buffer(sl_h, (heads,), "float32")
            KP = T.match_buffer(kp_h, (m,), "int32")
            O = T.match_buffer(o_h, (n, heads, head_dim), "float32")
            P0 = T.match_buffer(p0_h, (n, heads), "float32")
            body(Q, K, V, SC, SL, KP, O, P0, n, m)

    return func


#: float lanes of the decode attention's vectors (AVX2: 8 x float32); head_dim must be a multiple for it
DECODE_LANES = 8


@functools.lru_cache(maxsize=None)
def attention_decode(heads: int, kv_heads: int, head_dim: int, kv_dtype: str, softmax_bits: int, alibi: bool,
                     parallel: bool = False, int16_dot: bool = False):
    """The attention of one query (decode: n = 1) over m cached keys, bit for bit what `attention_blocked` computes
    for n = 1, without its blocking: one pass per KV head g over its keys, for the `heads // kv_heads` query heads
    sharing g together (each K/V row is loaded once for all of them).

    1. Q.K per key: the K row is contiguous over d, so each of the group's rows gets DECODE_LANES partial sums
       over d (vector FMAs), added in a tree. INT8: every partial sum is an integer below 2^24, so any order gives
       the exact dot, the same float as the blocked kernel's. Score = dot * (q_scale * k_scale / sqrt(D)) + ALiBi.
    2. Per block of DECODE_LANES keys: e_j = exp(s_j - max) (`_exp_nonpositive`), summed in lane j % 8 (the blocked
       kernel's lane sums, same order), INT8: weight 2^-c of the log2 code (`_log2_weight`); out += w_j * v_j,
       skipped for w_j = 0 (adding 0 changes nothing). INT8: as integers 2^(top-1-c) * v8 in int32, converted and
       added to the float sum at the end of each `attn_v_key_chunk` of keys (the blocked kernel's chunks).
    3. out = (acc * 2^-(top-1)) * v_scale * pmax (pmax = 1 / sum of the lanes in order) for INT8, acc / sum for
       float.
    `parallel` (the models' choice): one parallel task per query head (each head's arithmetic is the same as in
    the serial form, so the results are too); without it one serial pass per KV head, its query heads sharing each
    K/V row load. SmolLM2's 9 heads / 3 KV heads on 2 threads, parallel vs serial: 7 vs 10 us at 128 keys, 25 vs
    34 at 512, 96-116 vs 136-149 at 2048 (one run, quiet machine).
    `int16_dot` (INT8 on AVX2, the models' choice there): step 1 as AVX2 pmaddwd of the int16 query codes with the
    sign-extended K row, 16 products per instruction into int32 lanes, instead of converting every K code to
    float32 and multiplying: the same exact integer dot, so the same score bits.
    """
    group = heads // kv_heads
    rows = 1 if parallel else group  # query heads per pass
    inv_sqrt = 1.0 / math.sqrt(head_dim)
    top = 2**softmax_bits - 1
    quant = kv_dtype == "int8"
    lanes = DECODE_LANES
    assert head_dim % lanes == 0, "decode attention needs head_dim a multiple of DECODE_LANES"
    assert not quant or head_dim * 127 * 127 < 2**24, "INT8 Q.K no longer exact in float32"
    chunks = head_dim // lanes
    idot = int16_dot and quant
    assert not idot or head_dim % 16 == 0, "the int16 dot takes 16 codes per pmaddwd"
    use_alibi = alibi
    iav = quant and softmax_bits <= ATTN_INT_AV_MAX_BITS  # INT8 AttnV in integers, as `attention_blocked`
    cbl = attn_v_key_chunk(softmax_bits) // lanes if iav else 1  # lane blocks per int32 AttnV chunk
    I64 = T.int64

    @T.macro
    def one_pass(Q, K, V, SC, SL, O, m, h0, g):
        qf = T.decl_buffer((rows, head_dim), "float32")
        sc = T.decl_buffer((rows, m + lanes), "float32")
        acc = T.decl_buffer((rows, head_dim), "float32")
        acc_i = T.decl_buffer((rows, head_dim if iav else 1), "int32")
        part = T.decl_buffer((rows, lanes), "float32", scope="local")
        row = T.decl_buffer((head_dim,), "float32", scope="local")  # the K or V row being used, as float32
        qi = T.decl_buffer((rows, head_dim if idot else 1), "int16")
        dot8 = T.decl_buffer((lanes,), "int32", scope="local")
        rmax = T.decl_buffer((rows, lanes), "float32")
        rsum = T.decl_buffer((rows, lanes), "float32")
        w = T.decl_buffer((rows, lanes), "float32")
        red = T.decl_buffer((2,), "float32")
        if quant:
            red[0] = SC[0] * SC[1] * T.float32(inv_sqrt)
        else:
            red[0] = T.float32(inv_sqrt)
        for r in T.serial(I64(rows)):
            for d in T.vectorized(I64(head_dim)):
                if quant:
                    qf[r, d] = T.max(T.min(T.floor(Q[0, h0 + r, d] / SC[0] + T.float32(0.5)),
                                           T.float32(127)), T.float32(-127))
                else:
                    qf[r, d] = Q[0, h0 + r, d]
                if idot:
                    qi[r, d] = T.Cast("int16", qf[r, d])
                acc[r, d] = T.float32(0)
                if iav:
                    acc_i[r, d] = 0
            for l in T.vectorized(I64(lanes)):
                rmax[r, l] = T.float32(-3.0e38)
                rsum[r, l] = T.float32(0)
        for j in T.serial(m):
            for r in T.unroll(I64(rows)):
                if idot:  # exact int32 lanes; the integer dot < 2^24 converts to the float path's exact sum
                    dot8[T.ramp(0, 1, lanes)] = _pmaddwd(qi.vload([r, 0], "int16x16"),
                                                         T.Cast("int16x16", K.vload([j, g, 0], "int8x16")))
                    for c in T.unroll(I64(1), I64(head_dim // 16)):
                        dot8[T.ramp(0, 1, lanes)] = dot8.vload([0], "int32x8") + _pmaddwd(
                            qi.vload([r, c * 16], "int16x16"), T.Cast("int16x16", K.vload([j, g, c * 16], "int8x16")))
                    for l in T.vectorized(I64(4)):
                        dot8[l] = dot8[l] + dot8[l + 4]
                    for l in T.vectorized(I64(2)):
                        dot8[l] = dot8[l] + dot8[l + 2]
                    sc[r, j] = T.Cast("float32", dot8[0] + dot8[1]) * red[0]
                else:
                    for l in T.vectorized(I64(lanes)):
                        part[r, l] = qf[r, l] * T.Cast("float32", K[j, g, l])
                    for c in T.unroll(I64(1), I64(chunks)):
                        for l in T.vectorized(I64(lanes)):
                            part[r, l] = part[r, l] + qf[r, c * lanes + l] * T.Cast("float32",
                                                                                    K[j, g, c * lanes + l])
                    for l in T.vectorized(I64(4)):
                        part[r, l] = part[r, l] + part[r, l + 4]
                    for l in T.vectorized(I64(2)):
                        part[r, l] = part[r, l] + part[r, l + 2]
                    sc[r, j] = (part[r, 0] + part[r, 1]) * red[0]
                if use_alibi:
                    sc[r, j] = sc[r, j] + SL[h0 + r] * T.Cast("float32", j)
                rmax[r, j % lanes] = T.max(rmax[r, j % lanes], sc[r, j])
        for r in T.serial(I64(rows)):
            red[1] = T.float32(-3.0e38)
            for l in T.serial(I64(lanes)):
                red[1] = T.max(red[1], rmax[r, l])
            rmax[r, 0] = red[1]
        for b in T.serial((m + lanes - 1) // lanes):
            for r in T.unroll(I64(rows)):
                for l in T.vectorized(I64(lanes)):
                    w[r, l] = T.Select(b * lanes + l < m, _exp_nonpositive(sc[r, b * lanes + l] - rmax[r, 0]),
                                       T.float32(0))
                    rsum[r, l] = rsum[r, l] + w[r, l]
                    if quant:
                        w[r, l] = _log2_weight(w[r, l], top)
            for jj in T.serial(T.min(I64(lanes), m - b * lanes)):
                for r in T.unroll(I64(rows)):
                    if w[r, jj] > T.float32(0):
                        for d in T.vectorized(I64(head_dim)):
                            if iav:
                                acc_i[r, d] = acc_i[r, d] + _int_av_weight(w[r, jj], top, "int32") * T.Cast(
                                    "int32", V[b * lanes + jj, g, d])
                            else:
                                acc[r, d] = acc[r, d] + w[r, jj] * T.Cast("float32", V[b * lanes + jj, g, d])
            if iav:
                if (b + 1) % cbl == 0 or b == (m + lanes - 1) // lanes - 1:  # a chunk's end: into the float sum
                    for r in T.serial(I64(rows)):
                        for d in T.vectorized(I64(head_dim)):
                            acc[r, d] = acc[r, d] + T.Cast("float32", acc_i[r, d])
                            acc_i[r, d] = 0
        for r in T.serial(I64(rows)):
            red[1] = T.float32(0)
            for l in T.serial(I64(lanes)):
                red[1] = red[1] + rsum[r, l]
            for d in T.vectorized(I64(head_dim)):
                if iav:
                    O[0, h0 + r, d] = _int_av_out(acc[r, d], top, SC[2], red[1])
                elif quant:
                    O[0, h0 + r, d] = acc[r, d] * (SC[2] * (T.float32(1) / red[1]))
                else:
                    O[0, h0 + r, d] = acc[r, d] / red[1]


    @T.prim_func(private=True)
    def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, s_h: T.handle, sl_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        m = T.int64()
        Q = T.match_buffer(q_h, (1, heads, head_dim), "float32")
        K = T.match_buffer(k_h, (m, kv_heads, head_dim), kv_dtype)
        V = T.match_buffer(v_h, (m, kv_heads, head_dim), kv_dtype)
        SC = T.match_buffer(s_h, (3,), "float32")
        SL = T.match_buffer(sl_h, (heads,), "float32")
        O = T.match_buffer(o_h, (1, heads, head_dim), "float32")
        if parallel:
            for h in T.parallel(I64(heads)):
                one_pass(Q, K, V, SC, SL, O, m, h, h // group)
        else:
            for g in T.serial(I64(kv_heads)):
                one_pass(Q, K, V, SC, SL, O, m, g * group, g)

    return func


def _int_av_weight(w, top: int, dtype: str):
    """The integer AttnV weight 2^(top-1-c) of a log2 weight w = 2^-c (0 stays 0): exact, w * 2^(top-1) is an
    integer below 2^15. One definition for every attention kernel, so they sum the same integers."""
    from tvm import tirx

    return tirx.Cast(dtype, w * tirx.const(float(2 ** (top - 1)), "float32"))


def _int_av_out(acc, top: int, v_scale, rsum):
    """AttnV's output from the float sum of its int32 chunks: (acc * 2^-(top-1)) * (v_scale * (1 / rsum)), the
    same float operations in every attention kernel (prefill and decode agree bit for bit)."""
    from tvm import tirx

    one = tirx.const(1.0, "float32")
    return (acc * tirx.const(1.0 / 2 ** (top - 1), "float32")) * (v_scale * (one / rsum))


def _pmaddwd(a, b):
    """AVX2 pmaddwd of two int16x16 vectors: int32x8 of a[2i] * b[2i] + a[2i + 1] * b[2i + 1], exact."""
    from tvm import tirx

    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", a, b)


def _pmaddwd_pair(pair, vec):
    """AVX2 pmaddwd of one int16 pair (int16x2), broadcast, with an int16x16 vector of 8 pairs: int32x8 of
    pair[0] * vec[2i] + pair[1] * vec[2i + 1], exact (the attention's Q.K over d pairs and AttnV over key pairs)."""
    from tvm import tirx

    broadcast = tirx.reinterpret("int16x16", tirx.Broadcast(tirx.reinterpret("int32", pair), 8))
    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", broadcast, vec)


#: mantissa bits of float32(sqrt(2)): the log2 code thresholds float32(2^(0.5 - c)) are 2^-c times this float
_SQRT2_MANTISSA = int(np.float32(np.sqrt(2.0)).view(np.int32)) & 0x7FFFFF


def _log2_weight(y, top: int):
    """2^-c for the log2 code c = clip(floor(-log2(y) + 0.5), 0, top) of y = p / pmax in [0, 1] (0 for the top code),
    from y's bits: with y = 2^e * mant, c = -e - (mant > sqrt 2), clipped. Equal to counting the float32 thresholds
    2^(0.5 - c) that y does not exceed (checked on every float32 in [0, 2)); y = 0 gives the top code."""
    from tvm import tirx

    i32 = lambda v: tirx.const(v, "int32")  # noqa: E731
    bits = tirx.reinterpret("int32", y)
    exponent = tirx.shift_right(bits, i32(23)) - i32(127)
    above = tirx.Cast("int32", tirx.bitwise_and(bits, i32(0x7FFFFF)) > i32(_SQRT2_MANTISSA))
    code = tirx.min(tirx.max(i32(0) - exponent - above, i32(0)), i32(top))
    weight = tirx.reinterpret("float32", tirx.shift_left(i32(127) - code, i32(23)))
    return tirx.Select(code < top, weight, tirx.const(0.0, "float32"))


#: rows per task of the rms_norm kernel: their serial sums of squares interleave (independent add chains)
RMS_NORM_ROWS = 8
#: float lanes of the rms_norm kernel's vectors; the width must be a multiple of it
RMS_NORM_LANES = 8


def _norm_rows_macro(width: int, eps: float, lanes: int, rows: int):
    """The RMSNorm of rows [t * rows, t * rows + rows) of X into O, in the order that matches Relax bit for bit
    (see `rms_norm`): squares to a scratch row (vectorized, no FMA can merge square and sum), the rows' serial sums
    interleaved, then the scale (vectorized). A macro: `rms_norm` and `add_rms_norm` inline it."""

    @T.macro(hygienic=True)
    def norm_rows(X, W, O, t, n):
        sq = T.decl_buffer((rows, width), "float32")
        acc = T.decl_buffer((rows,), "float32", scope="local")
        for r in T.serial(rows):
            for c in T.serial(width // lanes):
                for l in T.vectorized(lanes):
                    sq[r, c * lanes + l] = X[T.min(t * rows + r, n - 1), c * lanes + l] * X[
                        T.min(t * rows + r, n - 1), c * lanes + l]
            acc[r] = T.float32(0)
        for d in T.serial(width):
            for r in T.unroll(rows):
                acc[r] = acc[r] + sq[r, d]
        for r in T.serial(rows):
            if t * rows + r < n:
                acc[r] = T.rsqrt(acc[r] / T.float32(width) + T.float32(eps))
                for c in T.serial(width // lanes):
                    for l in T.vectorized(lanes):
                        O[t * rows + r, c * lanes + l] = acc[r] * X[t * rows + r, c * lanes + l] * W[c * lanes + l]

    return norm_rows


@functools.lru_cache(maxsize=None)
def rms_norm(width: int, eps: float, parallel: bool = True):
    """LLaMA's RMSNorm of each row of x [n, width], bit for bit what Relax's legalized R.nn.rms_norm computes:
    out = rsqrt(sum_d x_d^2 / width + eps) * x * weight, the squares rounded to float32 first and summed in order
    d = 0, 1, ... (the sum's order decides its rounding, and one ulp of a norm output can flip an activation code
    downstream: measured on SmolLM2 agileq8, a reordered sum moved logits by up to 7).

    Speed without changing that order: a task takes RMS_NORM_ROWS rows, writes their squares (vectorized) to a
    scratch row first (so no fused multiply-add can merge square and sum), then runs the rows' serial sums
    interleaved (independent dependency chains), then the scale, vectorized. `parallel=False` (the decode function's one
    row, `GraphBuilder.row_parallel`): no thread-pool round trip for a single task."""
    lanes, rows = RMS_NORM_LANES, RMS_NORM_ROWS
    assert width % lanes == 0, "rms_norm kernel needs width a multiple of RMS_NORM_LANES"
    norm_rows = _norm_rows_macro(width, eps, lanes, rows)
    over_rows = T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def func(x_h: T.handle, w_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        n = T.int64()
        X = T.match_buffer(x_h, (n, width), "float32")
        W = T.match_buffer(w_h, (width,), "float32")
        O = T.match_buffer(o_h, (n, width), "float32")
        for t in over_rows((n + rows - 1) // rows):
            norm_rows(X, W, O, t, n)

    return func


@functools.lru_cache(maxsize=None)
def add_rms_norm(width: int, eps: float, parallel: bool = True):
    """(s, rms_norm(s)) for s = x + y over [n, width]: a residual add and the RMSNorm that reads it, in one pass
    (the sum is still in cache when it is normed). Both outputs are bit for bit R.add and `rms_norm`'s: the same
    elementwise sum, stored, then the norm's own steps on the stored values."""
    lanes, rows = RMS_NORM_LANES, RMS_NORM_ROWS
    assert width % lanes == 0, "add_rms_norm kernel needs width a multiple of RMS_NORM_LANES"
    norm_rows = _norm_rows_macro(width, eps, lanes, rows)
    over_rows = T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def func(x_h: T.handle, y_h: T.handle, w_h: T.handle, s_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        n = T.int64()
        X = T.match_buffer(x_h, (n, width), "float32")
        Y = T.match_buffer(y_h, (n, width), "float32")
        W = T.match_buffer(w_h, (width,), "float32")
        S = T.match_buffer(s_h, (n, width), "float32")
        O = T.match_buffer(o_h, (n, width), "float32")
        for t in over_rows((n + rows - 1) // rows):
            for r in T.serial(rows):
                if t * rows + r < n:
                    for c in T.serial(width // lanes):
                        for l in T.vectorized(lanes):
                            S[t * rows + r, c * lanes + l] = X[t * rows + r, c * lanes + l] + Y[
                                t * rows + r, c * lanes + l]
            norm_rows(S, W, O, t, n)

    return func


def _rounded(x):
    """float32 x as a rounded float32 that no fused multiply-add may absorb: TVM's LLVM backend contracts a
    product feeding a sum into an FMA (one rounding instead of two) wherever it sees the pair, which changes last
    bits against ops that round the product (Relax's unfused elementwise ops). `llvm.arithmetic.fence` forbids
    that; it compiles to nothing."""
    from tvm import tirx

    return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", x)


#: float lanes of the RoPE kernel's vectors; head_dim / 2 must be a multiple of it
ROPE_LANES = 8


@functools.lru_cache(maxsize=None)
def rope(heads: int, head_dim: int, max_len: int, parallel: bool = True):
    """HF LLaMA RoPE (rotate_half layout) of x [n, heads * head_dim] at positions pos [n], from the cos/sin tables
    [max_len, head_dim]: out[i, h, d] = x[i, h, d] * cos[pos_i, d] + rot[i, h, d] * sin[pos_i, d], rot = (-x2, x1).
    The same float operations as the Relax ops it replaces (take, strided_slice, negative, concat, multiply, add:
    loops over [n, heads, head_dim] intermediates, ~10x slower), both products rounded (`_rounded`), so the same
    bits; one row of heads per parallel iteration."""
    half = head_dim // 2
    assert half % ROPE_LANES == 0, "rope kernel needs head_dim a multiple of 2 * ROPE_LANES"
    over_rows = T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def func(x_h: T.handle, c_h: T.handle, s_h: T.handle, p_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        n = T.int64()
        X = T.match_buffer(x_h, (n, heads * head_dim), "float32")
        C = T.match_buffer(c_h, (max_len, head_dim), "float32")
        S = T.match_buffer(s_h, (max_len, head_dim), "float32")
        P = T.match_buffer(p_h, (n,), "int32")
        O = T.match_buffer(o_h, (n, heads, head_dim), "float32")
        for i in over_rows(n):
            for h in T.serial(T.int64(heads)):
                for d in T.vectorized(T.int64(half)):
                    O[i, h, d] = _rounded(X[i, h * head_dim + d] * C[T.Cast("int64", P[i]), d]) + _rounded(
                        (-X[i, h * head_dim + half + d]) * S[T.Cast("int64", P[i]), d])
                for d in T.vectorized(T.int64(half)):
                    O[i, h, half + d] = _rounded(X[i, h * head_dim + half + d] * C[T.Cast("int64", P[i]), half + d]) + (
                        _rounded(X[i, h * head_dim + d] * S[T.Cast("int64", P[i]), half + d]))

    return func

@functools.lru_cache(maxsize=None)
def swiglu(width: int, parallel: bool = True):
    """silu(gate) * up, elementwise over [n, width], with the polynomial exp (no libm call, so it vectorizes):
    silu(x) = x / (1 + t) for x >= 0 and x * t / (1 + t) for x < 0, where t = exp(-|x|)."""
    assert width % 8 == 0
    over_vectors = T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def func(g_h: T.handle, u_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        n = T.int64()
        G = T.match_buffer(g_h, (n, width), "float32")
        U = T.match_buffer(u_h, (n, width), "float32")
        O = T.match_buffer(o_h, (n, width), "float32")
        for ib in over_vectors(n * (width // 8)):
            for l in T.vectorized(8):
                O[ib // (width // 8), ib % (width // 8) * 8 + l] = _silu(
                    G[ib // (width // 8), ib % (width // 8) * 8 + l]) * U[ib // (width // 8), ib % (width // 8) * 8 + l]

    return func


def _silu(x):
    from tvm import tirx

    t = _exp_nonpositive(tirx.const(0.0, "float32") - tirx.abs(x))
    one = tirx.const(1.0, "float32")
    # one division: x * 1 is x exactly, so this is Select(x >= 0, x / (1 + t), x * t / (1 + t)) to the last bit
    return x * tirx.Select(x >= tirx.const(0.0, "float32"), one, t) / (one + t)


@functools.lru_cache(maxsize=None)
def embed_packed(vocab_blocks: int, hidden: int, nb: int):
    """Embedding rows read from the LM head's packed FP32 layout W[V/nb, K, nb] (tied embeddings): the table is
    stored once instead of twice (SmolLM2: 113 MB saved)."""

    @T.prim_func(private=True)
    def func(ids_h: T.handle, w_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        n = T.int64()
        ids = T.match_buffer(ids_h, (n,), "int32")
        W = T.match_buffer(w_h, (vocab_blocks, hidden, nb), "float32")
        O = T.match_buffer(o_h, (n, hidden), "float32")
        for i in T.parallel(n):
            for k in T.serial(hidden):
                O[i, k] = W[T.Cast("int64", ids[i]) // nb, k, T.Cast("int64", ids[i]) % nb]

    return func


@functools.lru_cache(maxsize=None)
def embed_codes(blocks: int, kblocks: int, nb: int, kk: int, code_dtype: str, groups: int, scale_dtype: str,
                parallel: bool = True):
    """Embedding rows read from an integer LM head's packed codes W[V/nb, K/kk, nb, kk] (zero-corrected, any tile
    format of `kernels.layout`) times its tile-major group scales S[V/nb, G, nb]: the float embedding is not stored
    when these products equal it (`LinearEmitter.embedding_from_head`). The product is one float32 multiply of two
    exactly converted values, as numpy's check computes it, so the rows are bit for bit the checked table."""
    hidden = kblocks * kk
    gs = hidden // groups
    over_rows = T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def func(ids_h: T.handle, w_h: T.handle, s_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        n = T.int64()
        ids = T.match_buffer(ids_h, (n,), "int32")
        W = T.match_buffer(w_h, (blocks, kblocks, nb, kk), code_dtype)
        S = T.match_buffer(s_h, (blocks, groups, nb), scale_dtype)
        O = T.match_buffer(o_h, (n, hidden), "float32")
        for i in over_rows(n):
            for k in T.serial(hidden):
                O[i, k] = (T.Cast("float32", W[T.Cast("int64", ids[i]) // nb, k // kk, T.Cast("int64", ids[i]) % nb,
                                                k % kk])
                           * T.Cast("float32", S[T.Cast("int64", ids[i]) // nb, k // gs, T.Cast("int64", ids[i]) % nb]))

    return func


#: how `embed_narrow` stores a float32 table exactly in 16 bits: bfloat16 as its raw bits, or float16
NARROW_EMBEDDINGS = ("bfloat16", "float16")


def narrow_table(table: np.ndarray) -> tuple[np.ndarray, str]:
    """(stored array, storage) for a float32 embedding table: its 16-bit form when that is exact (checkpoints saved
    from bfloat16 or float16 weights; the quantizer writes float32), else the table itself ("float32")."""
    table = np.ascontiguousarray(table, np.float32)
    bits = table.view(np.uint32)
    if not np.any(bits & 0xFFFF):
        return (bits >> 16).astype(np.uint16), "bfloat16"
    half = table.astype(np.float16)
    if np.array_equal(half.astype(np.float32), table):  # NaN never compares equal: such a table stays float32
        return half, "float16"
    return table, "float32"


@functools.lru_cache(maxsize=None)
def embed_narrow(vocab: int, hidden: int, storage: str, parallel: bool = True):
    """Embedding rows of a table stored in 16 bits (`narrow_table`), widened to float32 exactly: bfloat16 bits
    shifted into the high half of a float32, float16 converted."""
    assert storage in NARROW_EMBEDDINGS, storage
    dtype = "uint16" if storage == "bfloat16" else "float16"
    over_rows = T.parallel if parallel else T.serial

    def widen(v):
        if storage == "bfloat16":
            return T.reinterpret("float32", T.shift_left(T.Cast("uint32", v), T.uint32(16)))
        return T.Cast("float32", v)

    @T.prim_func(private=True)
    def func(ids_h: T.handle, w_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        n = T.int64()
        ids = T.match_buffer(ids_h, (n,), "int32")
        W = T.match_buffer(w_h, (vocab, hidden), dtype)
        O = T.match_buffer(o_h, (n, hidden), "float32")
        for i in over_rows(n):
            for k in T.serial(hidden):
                O[i, k] = widen(W[T.Cast("int64", ids[i]), k])

    return func


# ------------------------------------------------------------------------------------------------ token pruning
#: a score above any sum of probabilities: the first token always ranks first (the reference sets it to +inf)
_FIRST_TOKEN_SCORE = 3.0e38


@functools.lru_cache(maxsize=None)
def prune_select(heads: int):
    """Indices [k] (ascending, int32) of the k rows to keep out of n, and their positions POS[idx], from the
    first-key probabilities P0 [n, heads] of the previous layer's attention; k is the outputs' length (the runtime's
    schedule picks it).

    As `quant.pruning.select_tokens`: score_i = sum_h P0[i, h] (summed over h in order, like torch's sum over the
    head axis), row 0 always first, then higher score first and among equal scores the earlier row. Row i is kept
    when its rank #{j: s_j > s_i} + #{j < i: s_j = s_i} is below k; the kept rows keep their order. O(n^2)
    compares, parallel over rows (n <= 2048: a few ms), then one serial pass to write the indices.
    (Two inputs on purpose: Relax's RewriteDataflowReshape inspects every one-input call_tir as a possible reshape,
    which fails on a kernel without a root block.)"""

    @T.prim_func(private=True)
    def func(p_h: T.handle, pos_h: T.handle, o_h: T.handle, opos_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        n = T.int64()
        k = T.int64()
        P = T.match_buffer(p_h, (n, heads), "float32")
        POS = T.match_buffer(pos_h, (n,), "int32")
        IDX = T.match_buffer(o_h, (k,), "int32")
        KPOS = T.match_buffer(opos_h, (k,), "int32")
        score = T.decl_buffer((n,), "float32")
        keep = T.decl_buffer((n,), "int32")
        for i in T.parallel(n):
            acc = T.decl_buffer((1,), "float32", scope="local")
            acc[0] = T.float32(0)
            for h in T.serial(T.int64(heads)):
                acc[0] = acc[0] + P[i, h]
            score[i] = T.Select(i == 0, T.float32(_FIRST_TOKEN_SCORE), acc[0])
        for i in T.parallel(n):
            rank = T.decl_buffer((1,), "int32", scope="local")
            rank[0] = 0
            for j in T.serial(n):
                rank[0] = rank[0] + T.Cast("int32", T.Or(score[j] > score[i], T.And(score[j] == score[i], j < i)))
            keep[i] = T.Cast("int32", T.Cast("int64", rank[0]) < k)
        count = T.decl_buffer((1,), "int64", scope="local")
        count[0] = T.int64(0)
        for i in T.serial(n):
            if keep[i] == 1:
                IDX[count[0]] = T.Cast("int32", i)
                KPOS[count[0]] = POS[i]
                count[0] = count[0] + T.int64(1)

    return func


@functools.lru_cache(maxsize=None)
def scatter_rows(width: int):
    """O [n, width] = H with rows ROWS[r] replaced by X[r]: the hidden state of every token after a pruning stage
    (a pruned token keeps the last value written for it)."""

    @T.prim_func(private=True)
    def func(h_h: T.handle, r_h: T.handle, x_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        n = T.int64()
        c = T.int64()
        H = T.match_buffer(h_h, (n, width), "float32")
        ROWS = T.match_buffer(r_h, (c,), "int32")
        X = T.match_buffer(x_h, (c, width), "float32")
        O = T.match_buffer(o_h, (n, width), "float32")
        for i in T.parallel(n):
            for d in T.serial(T.int64(width)):
                O[i, d] = H[i, d]
        for r in T.parallel(c):
            for d in T.serial(T.int64(width)):
                O[T.Cast("int64", ROWS[r]), d] = X[r, d]

    return func
