"""W4A4 linear with the paper's packed-INT4 SIMD multiplier (Agile-Quant Fig. 5).

Bit layout. Weights are stored as unsigned codes ``u = q + 8`` in [0, 15]. Two weights of adjacent output rows
share one 16-bit lane::

    wpack[t, k, l] (uint16) = u[n0, k] | u[n0 + 1, k] << 8          n0 = t * 2L + 2 l,  L lanes per tile

One 16-bit multiply by the 4-bit activation a = xq[m, k] in [0, 15] gives both products at once, each in its own
byte, without carry (a * u <= 225 < 256)::

    p = a * wpack = (a*u0) | (a*u1) << 8                              (uint16 lane)

The product is spread (paper: byte layout [a*u0, 0, a*u1, 0] of a 32-bit lane) so each product gets 16 bits
of headroom. We keep the two 16-bit halves of that spread lane in two uint16 SIMD lanes (the same bits, one
widening instruction less per product)::

    s0 += p   (mod 2^16),   s1 += p >> 8 (= a*u1)                    (uint16 lanes)

A half holds at most 2^8 additions of a value <= 225 (256 * 225 = 57600 < 2^16), so the K loop runs in chunks of
at most 256 and each chunk's halves are split out and widened into int32 totals::

    D[m, n0] += (s0 - (s1 << 8)) mod 2^16,   D[m, n0 + 1] += s1      D = sum_k a * u  (exact)

The contract's accumulator follows with row sums (c = 8 + wzero[n], Xs = sum_k xq[m, k], Us = sum_k u[n, k]):
``acc = D - c*Xs - zp*Us + zp*c*K``; then the usual float epilogue. Per-channel weights only (G = 1).
Per SIMD multiply (32 products in a ymm) this costs a shift and two adds (4 instructions with the multiply),
against about 2.5 (pmaddubsw, a quarter pmaddwd, int16 adds) for the same 32 products on the x86 W4A8 path: the
packed multiplier can only pay off where no byte dot-product instruction exists (Cortex-A72). See BENCHMARKS.md.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from . import layout
from .linear import _m_var
from .schedule import mark_scheduled


def w4a4_lanes(isa: str) -> int:
    """16-bit lanes per tile: one SIMD register of uint16."""
    return {"avx512": 32, "avx2": 16, "generic": 16}.get(isa, 8)


def w4a4_chunk(K: int) -> int:
    """Largest divisor of K that is <= 256: the number of spread additions before a split."""
    for c in range(min(256, K), 0, -1):
        if K % c == 0:
            return c
    return 1


def w4a4_tensors(N, K, isa, *, has_bias=False, m=None, name="w4a4"):
    layout.check_linear_shape(N, K, None)
    L = w4a4_lanes(isa)
    C = w4a4_chunk(K)
    nt = -(-N // (2 * L))
    M = _m_var(m)
    xq = te.placeholder((M, K), "uint8", name="xq")
    wpack = te.placeholder((nt, K, L), "uint16", name="wpack")
    wsum = te.placeholder((nt * 2 * L, 2), "int32", name="wsum")  # [:, 0] = Us, [:, 1] = c = 8 + wzero
    wscale = te.placeholder((N, 1), "float32", name="wscale")
    act_scale = te.placeholder((), "float32", name="act_scale")
    act_zero = te.placeholder((), "int32", name="act_zero")
    args = [xq, wpack, wsum, wscale, act_scale, act_zero]

    kc = te.reduce_axis((0, C), name="kc")

    def half(p16, h):
        # h = 0: the raw 16-bit product, summed modulo 2^16; h = 1: its high byte a*u1 (exact, no mask needed)
        return tirx.Select(h == 0, p16, p16 >> tirx.const(8, "uint16"))

    # The paper's 32-bit spread lane [a*u0 | 0 | a*u1 | 0] is kept as two uint16 SIMD lanes: s0 = sum p (mod 2^16)
    # and s1 = sum a*u1. Then sum a*u0 = s0 - (s1 << 8) (mod 2^16), exact because it is < 2^16 (chunk <= 256).
    spread = te.compute(
        (M, K // C, nt, 2, L),
        lambda i, c, t, h, l: te.sum(half(xq[i, c * C + kc].astype("uint16") * wpack[t, c * C + kc, l], h), axis=kc),
        name="spread",
    )
    cr = te.reduce_axis((0, K // C), name="cr")

    def split(i, c, t, h, l):
        s1 = spread[i, c, t, 1, l]
        lo = (spread[i, c, t, 0, l] - (s1 << tirx.const(8, "uint16"))).astype("int32")
        return tirx.Select(h == 0, lo, s1.astype("int32"))

    dsum = te.compute(
        (M, nt, 2, L),
        lambda i, t, h, l: te.sum(split(i, cr, t, h, l), axis=cr),
        name="dsum",
    )
    kx = te.reduce_axis((0, K), name="kx")
    xsum = te.compute((M,), lambda i: te.sum(xq[i, kx].astype("int32"), axis=kx), name="xsum")

    def pre(i, n):
        d = dsum[i, n // (2 * L), n % 2, (n % (2 * L)) // 2]
        c = wsum[n, 1]
        zp = act_zero[()]
        acc = d - c * xsum[i] - zp * wsum[n, 0] + zp * c * K
        return acc.astype("float32") * wscale[n, 0] * act_scale[()]

    if has_bias:
        bias = te.placeholder((N,), "float32", name="bias")
        args.append(bias)
        y = te.compute((M, N), lambda i, n: pre(i, n) + bias[n], name="y")
    else:
        y = te.compute((M, N), pre, name="y")
    args.append(y)
    return args, dict(L=L, C=C, nt=nt, N=N, K=K, name=name)


def schedule_w4a4(func, info):
    """parallel(n tiles) > rows > [chunk: spread over L lanes (vectorized), split into int32 totals] > epilogue."""
    L = info["L"]
    sch = s_tir.Schedule(func)
    y = sch.get_sblock("y")
    i, n = sch.get_loops(y)
    t, nr = sch.split(n, [None, 2 * L])
    sch.reorder(t, i, nr)
    sch.parallel(t)
    dsum = sch.get_sblock("dsum")
    sch.compute_at(dsum, i, preserve_unit_loops=True)
    sch.compute_at(sch.get_sblock("xsum"), i, preserve_unit_loops=True)
    hh, ll, cc = sch.get_loops(dsum)[-3:]
    sch.reorder(cc, hh, ll)
    sch.vectorize(ll)
    spread = sch.get_sblock("spread")
    sch.compute_at(spread, cc, preserve_unit_loops=True)
    dinit = sch.decompose_reduction(dsum, cc)
    sch.vectorize(sch.get_loops(dinit)[-1])
    sl = sch.get_loops(spread)
    hl, lane, red = sl[-3], sl[-2], sl[-1]
    sch.reorder(red, hl, lane)
    sch.vectorize(lane)
    sch.unroll(hl)
    sinit = sch.decompose_reduction(spread, red)
    sch.vectorize(sch.get_loops(sinit)[-1])
    return mark_scheduled(sch.mod["main"])


def w4a4_linear_func(N, K, target, *, has_bias=False, m=None):
    """W4A4 linear (packed INT4 multiplier) for ``target``; args in the order of ``w4a4_tensors``."""
    from agile_tvm.targets import get_target, isa_of

    isa = isa_of(get_target(target))
    name = f"w4a4_linear_n{N}_k{K}" + ("_bias" if has_bias else "") + ("" if m is None else f"_m{m}")
    args, info = w4a4_tensors(N, K, isa, has_bias=has_bias, m=m, name=name)
    func = te.create_prim_func(args).with_attr("global_symbol", name)
    return schedule_w4a4(func, info)
