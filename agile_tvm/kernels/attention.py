"""Quantized attention kernels: INT8 Q.K^T, log2 softmax quantization, and AttnV with shifts (docs/checkpoint.md).

Shapes: Hq query heads, Hkv KV heads (GQA: query head h reads KV head h // (Hq // Hkv)), M queries and N keys
(both symbolic, so prefill and decode with a growing KV cache share one kernel), head dim D (multiple of 8).
The causal mask / ALiBi bias and the float softmax stay with the caller (Relax), between QK and the log2 step.

Exactness tricks (each keeps the integer part bit-exact):
- QK: |q8 * k8| <= 127^2, so every partial sum of a D <= 1040 dot product is an integer below 2^24 and float32
  FMAs compute the int32 dot exactly; that lets the prefill path run as a float GEMM over a transposed K
  (8 keys per FMA) instead of sign-extended int32 multiplies.
- log2 codes: floor(-log2(r) + 0.5) for r = m * 2^e (1 <= m < 2) is exactly ``-e - [m > sqrt 2]``, read from the
  float's bits: no log2 call, no rounding near the code boundaries.
- AttnV: ``v8 << (2^b - 2 - c)`` is accumulated in int32 for at most 2^(24 - (2^b - 2)) keys (1024 at b = 4) and
  flushed into int64, so any sequence length is exact; dropped keys (top code, e.g. causally masked) cost nothing.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

from agile_tvm.errors import UserError

from .schedule import mark_scheduled


def _check_heads(Hq, Hkv, D):
    if Hq % Hkv:
        raise UserError(f"query heads {Hq} must be a multiple of KV heads {Hkv}")
    if D % 8 or D > 1040:
        raise UserError(f"head dim {D} must be a multiple of 8 and at most 1040")
    return Hq // Hkv


def qk_int8_func(Hq, Hkv, D, target, *, causal: bool = False, key_block: int = 64, small_m: int = 4):
    """Scores s = float(int32 dot) * (q_scale * k_scale) * (1/sqrt(D)).

    M <= small_m (decode): per key, a vectorized dot over D. Otherwise (prefill): K is transposed to float once per
    KV head into blocks of ``key_block`` keys, and each query row accumulates a block of scores in registers.
    ``causal=True``: query i sits at position N - M + i (the KV cache holds the earlier tokens) and sees keys
    j <= N - M + i; later keys get -inf (softmax 0, log2 code "dropped") and their dot products are skipped,
    which halves the prefill work."""
    rep = _check_heads(Hq, Hkv, D)
    inv = float(np.float32(1.0) / np.sqrt(np.float32(D)))
    JB = int(key_block)
    everything = not causal
    ninf = float("-inf")

    @T.prim_func(s_tir=True)
    def qk(q_h: T.handle, k_h: T.handle, qs_h: T.handle, ks_h: T.handle, s_h: T.handle):
        M = T.int64()
        N = T.int64()
        q8 = T.match_buffer(q_h, (Hq, M, D), "int8")
        k8 = T.match_buffer(k_h, (Hkv, N, D), "int8")
        q_scale = T.match_buffer(qs_h, (), "float32")
        k_scale = T.match_buffer(ks_h, (), "float32")
        s = T.match_buffer(s_h, (Hq, M, N), "float32")
        with T.sblock("root"):
            if M <= small_m:
                for h in T.parallel(Hq):
                    for i in range(M):
                        qf = T.alloc_buffer((D,), "float32")
                        for d in T.vectorized(D):
                            qf[d] = T.Cast("float32", q8[h, i, d])
                        for j in range(N):
                            if T.Or(everything, j <= N - M + i):
                                p8 = T.alloc_buffer((8,), "float32")
                                for lane in T.vectorized(8):
                                    p8[lane] = T.float32(0)
                                for t in T.unroll(D // 8):
                                    for lane in T.vectorized(8):
                                        p8[lane] = p8[lane] + qf[t * 8 + lane] * T.Cast(
                                            "float32", k8[h // rep, j, t * 8 + lane])
                                s[h, i, j] = (((p8[0] + p8[1]) + (p8[2] + p8[3])) + (
                                    (p8[4] + p8[5]) + (p8[6] + p8[7]))) * (q_scale[()] * k_scale[()]) * T.float32(inv)
                            else:
                                s[h, i, j] = T.float32(ninf)
            else:
                kT = T.alloc_buffer((Hkv, (N + JB - 1) // JB, D, JB), "float32")
                for hk in T.parallel(Hkv):
                    for jb in range((N + JB - 1) // JB):
                        for d in range(D):
                            for jj in T.vectorized(JB):
                                kT[hk, jb, d, jj] = T.if_then_else(
                                    jb * JB + jj < N, T.Cast("float32", k8[hk, T.min(jb * JB + jj, N - 1), d]),
                                    T.float32(0))
                for h in T.parallel(Hq):
                    for i in range(M):
                        qf = T.alloc_buffer((D,), "float32")
                        for d in range(D):
                            qf[d] = T.Cast("float32", q8[h, i, d])
                        for jb in range((N + JB - 1) // JB):
                            if T.Or(everything, jb * JB <= N - M + i):
                                acc = T.alloc_buffer((JB,), "float32")
                                for jj in T.vectorized(JB):
                                    acc[jj] = T.float32(0)
                                for d in range(D):
                                    for jj in T.vectorized(JB):
                                        acc[jj] = acc[jj] + qf[d] * kT[h // rep, jb, d, jj]
                                for jj in range(JB):
                                    if jb * JB + jj < N:
                                        s[h, i, jb * JB + jj] = T.Select(
                                            T.Or(everything, jb * JB + jj <= N - M + i),
                                            acc[jj] * (q_scale[()] * k_scale[()]) * T.float32(inv), T.float32(ninf))
                            else:
                                for jj in range(JB):
                                    if jb * JB + jj < N:
                                        s[h, i, jb * JB + jj] = T.float32(ninf)

    name = f"qk_int8_h{Hq}_{Hkv}_d{D}" + ("_causal" if causal else "")
    return mark_scheduled(qk.with_attr("tirx.noalias", True).with_attr("global_symbol", name))


def log2_code_expr(r, top: int):
    """Exact floor(-log2(r) + 0.5) clipped to [0, top] for float32 r in (0, 1], from the bits of r."""
    bits = tirx.call_intrin("int32", "tirx.reinterpret", r)
    e = ((bits >> 23) & 0xFF) - 127
    m_above_sqrt2 = tirx.Select((bits & 0x7FFFFF) > _SQRT2_MANTISSA, tirx.const(1, "int32"), tirx.const(0, "int32"))
    c = -e - m_above_sqrt2
    return te.max(te.min(c, tirx.const(top, "int32")), tirx.const(0, "int32"))


#: mantissa bits of float32(sqrt 2) (rounded down; no float equals sqrt 2, so m > sqrt 2 <=> bits > this)
_SQRT2_MANTISSA = int(np.array(np.sqrt(np.float32(2.0)), np.float32).view(np.int32)) & 0x7FFFFF


def log2_softmax_tensors(Hq, bits):
    if not 2 <= bits <= 4:
        raise UserError(f"softmax bits must be in 2..4, got {bits}")
    M, N = tirx.Var("M", "int64"), tirx.Var("N", "int64")
    top = 2**bits - 1
    p = te.placeholder((Hq, M, N), "float32", name="p")
    j = te.reduce_axis((0, N), name="j")
    pmax = te.compute((Hq, M), lambda h, i: te.max(p[h, i, j], axis=j), name="pmax")

    def code(h, i, jj):
        r = p[h, i, jj] / pmax[h, i]
        c = tirx.Select(p[h, i, jj] > tirx.const(0.0, "float32"), log2_code_expr(r, top), tirx.const(top, "int32"))
        return c.astype("uint8")

    codes = te.compute((Hq, M, N), code, name="codes")
    return [p, codes, pmax]


def log2_softmax_quant_func(Hq, bits, target):
    """codes = clip(floor(-log2(p / rowmax) + 0.5), 0, 2^b - 1), top code = dropped (p = 0); also returns rowmax.

    Hand-written loops: heads in parallel, the row max and the codes 8 lanes at a time (a float max reduction is
    exact in any order, but LLVM will not reorder it by itself), then a scalar tail."""
    if not 2 <= bits <= 4:
        raise UserError(f"softmax bits must be in 2..4, got {bits}")
    top = 2**bits - 1

    def code(pv, mv):
        return tirx.Select(pv > tirx.const(0.0, "float32"), log2_code_expr(pv / mv, top),
                           tirx.const(top, "int32")).astype("uint8")

    @T.prim_func(s_tir=True)
    def log2q(p_h: T.handle, c_h: T.handle, pm_h: T.handle):
        M = T.int64()
        N = T.int64()
        p = T.match_buffer(p_h, (Hq, M, N), "float32")
        codes = T.match_buffer(c_h, (Hq, M, N), "uint8")
        pmax = T.match_buffer(pm_h, (Hq, M), "float32")
        with T.sblock("root"):
            for h in T.parallel(Hq):
                for i in range(M):
                    m8 = T.alloc_buffer((8,), "float32")
                    for lane in T.vectorized(8):
                        m8[lane] = p[h, i, 0]
                    for jb in range(N // 8):
                        for lane in T.vectorized(8):
                            m8[lane] = T.max(m8[lane], p[h, i, jb * 8 + lane])
                    pm = T.alloc_buffer((1,), "float32")
                    pm[0] = T.max(T.max(T.max(m8[0], m8[1]), T.max(m8[2], m8[3])),
                                  T.max(T.max(m8[4], m8[5]), T.max(m8[6], m8[7])))
                    for j in range(N // 8 * 8, N):
                        pm[0] = T.max(pm[0], p[h, i, j])
                    pmax[h, i] = pm[0]
                    for jb in range(N // 8):
                        for lane in T.vectorized(8):
                            codes[h, i, jb * 8 + lane] = code(p[h, i, jb * 8 + lane], pm[0])
                    for j in range(N // 8 * 8, N):
                        codes[h, i, j] = code(p[h, i, j], pm[0])

    log2q = log2q.with_attr("tirx.noalias", True)
    return mark_scheduled(log2q.with_attr("global_symbol", f"log2_softmax_quant_h{Hq}_b{bits}"))


def attn_v_chunk(bits: int) -> int:
    """Keys per int32 accumulation: |v8 << (2^b - 2)| * chunk < 2^31."""
    return 2 ** (31 - 7 - (2**bits - 2))


def attn_v_log2_func(Hq, Hkv, D, bits, target, *, small_m: int = 4):
    """out = float(sum_j v8 << (2^b-2-c)) * (pmax * v_scale * 2^-(2^b-2)); rows in parallel, D vectorized.

    Decode (M <= small_m) and non-x86 targets: per kept key, sign-extend its V row and add it shifted.
    Prefill on x86: the shift is a weight w = 2^(2^b-2-c) <= 2^14 that fits int16, so two keys at a time go through
    ``pmaddwd`` against V re-laid as int16 key pairs (exact: a pair sum is <= 2 * 127 * 2^14), ~3x fewer
    instructions; key pairs whose codes are both "dropped" (masked, negligible) are skipped."""
    from agile_tvm.targets import get_target, isa_of

    rep = _check_heads(Hq, Hkv, D)
    if not 2 <= bits <= 4:
        raise UserError(f"softmax bits must be in 2..4, got {bits}")
    top = 2**bits - 1
    CH = attn_v_chunk(bits)
    CHP = CH // 2
    f = float(2.0 ** -(top - 1))
    isa = isa_of(get_target(target))
    name = f"attn_v_log2_h{Hq}_{Hkv}_d{D}_b{bits}"

    @T.prim_func(s_tir=True)
    def attn_v(c_h: T.handle, v_h: T.handle, pm_h: T.handle, vs_h: T.handle, o_h: T.handle):
        M = T.int64()
        N = T.int64()
        codes = T.match_buffer(c_h, (Hq, M, N), "uint8")
        v8 = T.match_buffer(v_h, (Hkv, N, D), "int8")
        pmax = T.match_buffer(pm_h, (Hq, M), "float32")
        v_scale = T.match_buffer(vs_h, (), "float32")
        out = T.match_buffer(o_h, (Hq, M, D), "float32")
        with T.sblock("root"):
            for h in T.parallel(Hq):
                for i in range(M):
                    acc64 = T.alloc_buffer((D,), "int64")
                    acc32 = T.alloc_buffer((D,), "int32")
                    for d in T.vectorized(D):
                        acc64[d] = T.int64(0)
                        acc32[d] = 0
                    for j in range(N):
                        if T.Cast("int32", codes[h, i, j]) < top:
                            for d in T.vectorized(D):
                                acc32[d] = acc32[d] + T.shift_left(
                                    T.Cast("int32", v8[h // rep, j, d]), top - 1 - T.Cast("int32", codes[h, i, j]))
                        if j % CH == CH - 1:
                            for d in T.vectorized(D):
                                acc64[d] = acc64[d] + T.Cast("int64", acc32[d])
                                acc32[d] = 0
                    for d in T.vectorized(D):
                        out[h, i, d] = T.Cast("float32", acc64[d] + T.Cast("int64", acc32[d])) * (
                            pmax[h, i] * v_scale[()] * T.float32(f))

    if isa not in ("avx2", "avx512"):
        attn_v = attn_v.with_attr("tirx.noalias", True)
        return mark_scheduled(attn_v.with_attr("global_symbol", name))

    L = 16 if isa == "avx512" and D % 16 == 0 else 8
    wd = "llvm.x86.avx512.pmaddw.d.512" if L == 16 else "llvm.x86.avx2.pmadd.wd"
    i16v, i32v = f"int16x{2 * L}", f"int32x{L}"

    @T.prim_func(s_tir=True)
    def attn_v_x86(c_h: T.handle, v_h: T.handle, pm_h: T.handle, vs_h: T.handle, o_h: T.handle):
        M = T.int64()
        N = T.int64()
        codes = T.match_buffer(c_h, (Hq, M, N), "uint8")
        v8 = T.match_buffer(v_h, (Hkv, N, D), "int8")
        pmax = T.match_buffer(pm_h, (Hq, M), "float32")
        v_scale = T.match_buffer(vs_h, (), "float32")
        out = T.match_buffer(o_h, (Hq, M, D), "float32")
        with T.sblock("root"):
            if M <= small_m:
                for h in T.parallel(Hq):
                    for i in range(M):
                        acc64 = T.alloc_buffer((D,), "int64")
                        acc32 = T.alloc_buffer((D,), "int32")
                        for d in T.vectorized(D):
                            acc64[d] = T.int64(0)
                            acc32[d] = 0
                        for j in range(N):
                            if T.Cast("int32", codes[h, i, j]) < top:
                                for d in T.vectorized(D):
                                    acc32[d] = acc32[d] + T.shift_left(
                                        T.Cast("int32", v8[h // rep, j, d]), top - 1 - T.Cast("int32", codes[h, i, j]))
                            if j % CH == CH - 1:
                                for d in T.vectorized(D):
                                    acc64[d] = acc64[d] + T.Cast("int64", acc32[d])
                                    acc32[d] = 0
                        for d in T.vectorized(D):
                            out[h, i, d] = T.Cast("float32", acc64[d] + T.Cast("int64", acc32[d])) * (
                                pmax[h, i] * v_scale[()] * T.float32(f))
            else:
                vp = T.alloc_buffer((Hkv, (N + 1) // 2, 2 * D), "int16")
                for hk in T.parallel(Hkv):
                    for jp in range((N + 1) // 2):
                        for d in range(D):
                            for t in T.unroll(2):
                                vp[hk, jp, d * 2 + t] = T.if_then_else(
                                    jp * 2 + t < N, T.Cast("int16", v8[hk, T.min(jp * 2 + t, N - 1), d]), T.int16(0))
                for h in T.parallel(Hq):
                    for i in range(M):
                        acc64 = T.alloc_buffer((D,), "int64")
                        acc32 = T.alloc_buffer((D,), "int32")
                        for d in T.vectorized(D):
                            acc64[d] = T.int64(0)
                            acc32[d] = 0
                        for jp in range((N + 1) // 2):
                            c0 = T.Cast("int32", codes[h, i, jp * 2])
                            c1 = T.if_then_else(jp * 2 + 1 < N, T.Cast("int32", codes[h, i, T.min(jp * 2 + 1, N - 1)]),
                                                top)
                            if T.Or(c0 < top, c1 < top):
                                w0 = T.Select(c0 < top, T.shift_left(1, top - 1 - c0), 0)
                                w1 = T.Select(c1 < top, T.shift_left(1, top - 1 - c1), 0)
                                wpair = T.bitwise_or(w0, T.shift_left(w1, 16))
                                for d0 in T.unroll(D // L):
                                    acc32[T.ramp(d0 * L, 1, L)] = acc32[T.ramp(d0 * L, 1, L)] + T.call_llvm_pure_intrin(
                                        i32v, wd, T.reinterpret(i16v, T.broadcast(wpair, L)),
                                        vp.vload([h // rep, jp, d0 * 2 * L], i16v))
                            if jp % CHP == CHP - 1:
                                for d in T.vectorized(D):
                                    acc64[d] = acc64[d] + T.Cast("int64", acc32[d])
                                    acc32[d] = 0
                        for d in T.vectorized(D):
                            out[h, i, d] = T.Cast("float32", acc64[d] + T.Cast("int64", acc32[d])) * (
                                pmax[h, i] * v_scale[()] * T.float32(f))

    attn_v_x86 = attn_v_x86.with_attr("tirx.noalias", True)
    return mark_scheduled(attn_v_x86.with_attr("global_symbol", name))
