"""Straightforward TensorIR for the contract's integer math (docs/checkpoint.md), used by the Relax frontend.

These are the frontend's own kernels: plain loops that compute exactly what the checkpoint contract says, with a light
CPU schedule (parallel rows, vectorised inner loop) so the path runs end to end. The tuned kernels of
`agile_tvm.kernels` replace them where that package provides a matching API (see `agile_tvm.frontend.kernel_bridge`).

Conventions: batch 1 is squeezed, so activations are [n, K] with a symbolic token count n (int64) and the attention
key length m. Per-tensor scalars (activation scale, zero point) are 1-element tensors, not constants, so one compiled
kernel serves every layer of the same shape.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from tvm.script import tirx as T


@functools.lru_cache(maxsize=None)
def act_quant(k: int, bits: int):
    """TRIP activation quantization: xq = clip(floor(x * (1/s) * 2^-alpha_c + 0.5) + zp, 0, 2^b - 1), uint8."""
    qmax = float(2**bits - 1)

    @T.prim_func(private=True, s_tir=True)
    def func(x_h: T.handle, s_h: T.handle, zp_h: T.handle, sh_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        X = T.match_buffer(x_h, (n, k), "float32")
        S = T.match_buffer(s_h, (1,), "float32")
        ZP = T.match_buffer(zp_h, (1,), "int32")
        SH = T.match_buffer(sh_h, (k,), "uint8")
        Y = T.match_buffer(y_h, (n, k), "uint8")
        for i, c in T.grid(n, k):
            with T.sblock("quant"):
                vi, vc = T.axis.remap("SS", [i, c])
                Y[vi, vc] = T.Cast(
                    "uint8",
                    T.max(
                        T.min(
                            T.floor(
                                X[vi, vc] * (T.float32(1) / S[0])
                                / T.Cast("float32", T.shift_left(1, T.Cast("int32", SH[vc])))
                                + T.float32(0.5)
                            )
                            + T.Cast("float32", ZP[0]),
                            T.float32(qmax),
                        ),
                        T.float32(0),
                    ),
                )

    return func


@functools.lru_cache(maxsize=None)
def linear_int(k: int, n_out: int, groups: int, bias: bool, wdtype: str = "int8"):
    """W4A8 linear: acc = sum (xq - zp) * wq over each group, y = s * sum_g wscale * acc (+ bias).

    `wq` is [N, K] holding `q - wzero` (unpacked at export time): int8 for 4-bit weights ([-15, 15]) and
    symmetric 8-bit ones, int16 when an asymmetric 8-bit weight's `q - wzero` leaves the int8 range.
    """
    gs = k // groups

    if bias:

        @T.prim_func(private=True, s_tir=True)
        def func(x_h: T.handle, zp_h: T.handle, s_h: T.handle, w_h: T.handle, ws_h: T.handle, b_h: T.handle,
                 y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            X = T.match_buffer(x_h, (n, k), "uint8")
            ZP = T.match_buffer(zp_h, (1,), "int32")
            S = T.match_buffer(s_h, (1,), "float32")
            W = T.match_buffer(w_h, (n_out, k), wdtype)
            WS = T.match_buffer(ws_h, (n_out, groups), "float32")
            B = T.match_buffer(b_h, (n_out,), "float32")
            Y = T.match_buffer(y_h, (n, n_out), "float32")
            acc = T.sblock_alloc_buffer((n, n_out, groups), "int32")
            for i, j, g, kk in T.grid(n, n_out, groups, gs):
                with T.sblock("acc"):
                    vi, vj, vg, vk = T.axis.remap("SSSR", [i, j, g, kk])
                    with T.init():
                        acc[vi, vj, vg] = 0
                    acc[vi, vj, vg] = acc[vi, vj, vg] + (
                        T.Cast("int32", X[vi, vg * gs + vk]) - ZP[0]
                    ) * T.Cast("int32", W[vj, vg * gs + vk])
            for i, j in T.grid(n, n_out):
                with T.sblock("out"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    Y[vi, vj] = B[vj]
            for i, j, g in T.grid(n, n_out, groups):
                with T.sblock("deq"):
                    vi, vj, vg = T.axis.remap("SSR", [i, j, g])
                    Y[vi, vj] = Y[vi, vj] + S[0] * (WS[vj, vg] * T.Cast("float32", acc[vi, vj, vg]))

        return func

    @T.prim_func(private=True, s_tir=True)
    def func_nb(x_h: T.handle, zp_h: T.handle, s_h: T.handle, w_h: T.handle, ws_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        X = T.match_buffer(x_h, (n, k), "uint8")
        ZP = T.match_buffer(zp_h, (1,), "int32")
        S = T.match_buffer(s_h, (1,), "float32")
        W = T.match_buffer(w_h, (n_out, k), wdtype)
        WS = T.match_buffer(ws_h, (n_out, groups), "float32")
        Y = T.match_buffer(y_h, (n, n_out), "float32")
        acc = T.sblock_alloc_buffer((n, n_out, groups), "int32")
        for i, j, g, kk in T.grid(n, n_out, groups, gs):
            with T.sblock("acc"):
                vi, vj, vg, vk = T.axis.remap("SSSR", [i, j, g, kk])
                with T.init():
                    acc[vi, vj, vg] = 0
                acc[vi, vj, vg] = acc[vi, vj, vg] + (
                    T.Cast("int32", X[vi, vg * gs + vk]) - ZP[0]
                ) * T.Cast("int32", W[vj, vg * gs + vk])
        for i, j, g in T.grid(n, n_out, groups):
            with T.sblock("deq"):
                vi, vj, vg = T.axis.remap("SSR", [i, j, g])
                with T.init():
                    Y[vi, vj] = T.float32(0)
                Y[vi, vj] = Y[vi, vj] + S[0] * (WS[vj, vg] * T.Cast("float32", acc[vi, vj, vg]))

    return func_nb


@functools.lru_cache(maxsize=None)
def linear_float(k: int, n_out: int, bias: bool):
    """y = x @ W.T (+ bias) in float32, W stored [N, K] (Hugging Face layout)."""
    if bias:

        @T.prim_func(private=True, s_tir=True)
        def func(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            X = T.match_buffer(x_h, (n, k), "float32")
            W = T.match_buffer(w_h, (n_out, k), "float32")
            B = T.match_buffer(b_h, (n_out,), "float32")
            Y = T.match_buffer(y_h, (n, n_out), "float32")
            acc = T.sblock_alloc_buffer((n, n_out), "float32")
            for i, j, kk in T.grid(n, n_out, k):
                with T.sblock("mm"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, kk])
                    with T.init():
                        acc[vi, vj] = T.float32(0)
                    acc[vi, vj] = acc[vi, vj] + X[vi, vk] * W[vj, vk]
            for i, j in T.grid(n, n_out):
                with T.sblock("bias"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    Y[vi, vj] = acc[vi, vj] + B[vj]

        return func

    @T.prim_func(private=True, s_tir=True)
    def func_nb(x_h: T.handle, w_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        X = T.match_buffer(x_h, (n, k), "float32")
        W = T.match_buffer(w_h, (n_out, k), "float32")
        Y = T.match_buffer(y_h, (n, n_out), "float32")
        for i, j, kk in T.grid(n, n_out, k):
            with T.sblock("mm"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, kk])
                with T.init():
                    Y[vi, vj] = T.float32(0)
                Y[vi, vj] = Y[vi, vj] + X[vi, vk] * W[vj, vk]

    return func_nb


@functools.lru_cache(maxsize=None)
def quant_sym_int8(c: int):
    """Symmetric INT8 for Q, K, V: q8 = clip(floor(x / s + 0.5), -127, 127)."""

    @T.prim_func(private=True, s_tir=True)
    def func(x_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
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
    whole-matrix loops: the readable statement of the math, used when head_dim is not a multiple of 8 (otherwise
    `attention_rows`, the fast row-wise form, is used).

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


@functools.lru_cache(maxsize=None)
def attention_rows(heads: int, kv_heads: int, head_dim: int, kv_dtype: str, softmax_bits: int, alibi: bool):
    """The same causal attention as `attention`, written row by row for speed (one (query, head) row per task).

    Each row only visits its causal keys (j <= m - n + i) and keeps its scores in a row buffer:
    1. Q.K per key as an 8-lane vector dot (int32 for INT8, exact; float32 otherwise), scaled (+ ALiBi);
    2. softmax numerators e_j = exp(s_j - max) 8 keys at a time with a polynomial exp (`_exp_nonpositive`);
    3. INT8 path: log2 codes of y_j = p_j / pmax = e_j (pmax = 1 / sum, the max key has e = 1) by comparing with
       the code thresholds 2^(0.5 - c) (= clip(floor(-log2 y + 0.5), 0, top) without a log2 call), and the
       weights 2^-c built from exponent bits (0 for the top code); float path: p_j = e_j / sum;
    4. AttnV as `sum_j w_j * v[j, :]` over head_dim vector lanes, times v_scale * pmax (INT8) at the end.
    Float32 results differ from the contract's formulas by summation order and the exp polynomial (~1 ulp).
    """
    assert head_dim % 8 == 0
    group = heads // kv_heads
    inv_sqrt = 1.0 / math.sqrt(head_dim)
    top = 2**softmax_bits - 1
    quant = kv_dtype == "int8"
    acc_t = "int32" if quant else "float32"
    lanes = 8
    chunks = head_dim // lanes
    thresholds = [float(np.float32(2.0 ** (0.5 - c))) for c in range(1, top + 1)]
    use_alibi = alibi

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
        for hi in T.parallel(n * heads):
            row = T.decl_buffer((m + lanes,), "float32")
            qv = T.decl_buffer((head_dim,), acc_t)
            part = T.decl_buffer((lanes,), acc_t)
            fpart = T.decl_buffer((lanes,), "float32")
            acc = T.decl_buffer((head_dim,), "float32")
            red = T.decl_buffer((2,), "float32")
            i = hi // heads
            h = hi % heads
            g = h // group
            limit = m - n + i + 1
            blocks = (limit + lanes - 1) // lanes
            for d in T.vectorized(head_dim):
                if quant:
                    qv[d] = T.Cast(acc_t, T.max(T.min(T.floor(Q[i, h, d] / SC[0] + T.float32(0.5)),
                                                      T.float32(127)), T.float32(-127)))
                else:
                    qv[d] = Q[i, h, d]
            red[0] = T.float32(-3.0e38)
            for j in T.serial(limit):
                for l in T.vectorized(lanes):
                    part[l] = T.Cast(acc_t, 0)
                for c in T.serial(chunks):
                    for l in T.vectorized(lanes):
                        part[l] = part[l] + qv[c * lanes + l] * T.Cast(acc_t, K[j, g, c * lanes + l])
                for l in T.serial(lanes - 1):
                    part[0] = part[0] + part[l + 1]
                if quant:
                    row[j] = T.Cast("float32", part[0]) * SC[0] * SC[1] * T.float32(inv_sqrt)
                else:
                    row[j] = part[0] * T.float32(inv_sqrt)
                if use_alibi:
                    row[j] = row[j] + SL[h] * T.Cast("float32", j)
                red[0] = T.max(red[0], row[j])
            for l in T.vectorized(lanes):
                fpart[l] = T.float32(0)
            for b in T.serial(blocks):
                for l in T.vectorized(lanes):
                    row[b * lanes + l] = T.if_then_else(b * lanes + l < limit,
                                                        _exp_nonpositive(row[b * lanes + l] - red[0]), T.float32(0))
                    fpart[l] = fpart[l] + row[b * lanes + l]
            red[1] = T.float32(0)
            for l in T.serial(lanes):
                red[1] = red[1] + fpart[l]
            for b in T.serial(blocks):
                for l in T.vectorized(lanes):
                    if quant:
                        row[b * lanes + l] = _log2_weight(row[b * lanes + l], thresholds, top)
                    else:
                        row[b * lanes + l] = row[b * lanes + l] / red[1]
            for d in T.vectorized(head_dim):
                acc[d] = T.float32(0)
            for j in T.serial(limit):
                for d in T.vectorized(head_dim):
                    acc[d] = acc[d] + row[j] * T.Cast("float32", V[j, g, d])
            for d in T.vectorized(head_dim):
                if quant:
                    O[i, h, d] = acc[d] * (SC[2] * (T.float32(1) / red[1]))
                else:
                    O[i, h, d] = acc[d]

    return func


def _log2_weight(y, thresholds, top: int):
    """2^-c for the log2 code c of y = p / pmax (0 for the top code), from exponent bits: no log2, no division."""
    from tvm import tirx

    code = _code_of(y, thresholds)
    bits = tirx.shift_left(tirx.const(127, "int32") - code, tirx.const(23, "int32"))
    return tirx.Select(code < top, tirx.reinterpret("float32", bits), tirx.const(0.0, "float32"))


def _code_of(y, thresholds):
    """Log2 code of y = p / pmax in (0, 1]: the number of thresholds 2^(0.5 - c) that y does not exceed
    (= clip(floor(-log2(y) + 0.5), 0, top)); y = 0 (underflow) gives the top code."""
    from tvm import tirx

    code = tirx.const(0, "int32")
    for t in thresholds:
        code = code + tirx.Cast("int32", y <= tirx.const(t, "float32"))
    return code


@functools.lru_cache(maxsize=None)
def swiglu(width: int):
    """silu(gate) * up, elementwise over [n, width], with the polynomial exp (no libm call, so it vectorizes):
    silu(x) = x / (1 + t) for x >= 0 and x * t / (1 + t) for x < 0, where t = exp(-|x|)."""
    assert width % 8 == 0

    @T.prim_func(private=True)
    def func(g_h: T.handle, u_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tir.is_scheduled": True})
        n = T.int64()
        G = T.match_buffer(g_h, (n, width), "float32")
        U = T.match_buffer(u_h, (n, width), "float32")
        O = T.match_buffer(o_h, (n, width), "float32")
        for ib in T.parallel(n * (width // 8)):
            for l in T.vectorized(8):
                O[ib // (width // 8), ib % (width // 8) * 8 + l] = _silu(
                    G[ib // (width // 8), ib % (width // 8) * 8 + l]) * U[ib // (width // 8), ib % (width // 8) * 8 + l]

    return func


def _silu(x):
    from tvm import tirx

    t = _exp_nonpositive(tirx.const(0.0, "float32") - tirx.abs(x))
    one = tirx.const(1.0, "float32")
    return tirx.Select(x >= tirx.const(0.0, "float32"), x / (one + t), x * t / (one + t))


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
