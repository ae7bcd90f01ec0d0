"""The W4A8 prefill GEMM for weights whose group scales lie on a power-of-two row grid: no per-group float epilogue.

Why: on AVX2 without VNNI the v2 GEMM spends, per group of 32 k and 4 tiles of 8 outputs, 32 ``vpmaddubsw`` and
8 ``vpmaddwd`` on the dot and 16 more ops (a conversion and three FMAs per tile) on the float epilogue, all on the
same two pipes (BENCHMARKS.md, session 6). When every group scale and offset of row n is an integer multiple of
one power of two (the quantizer's ``scale_grid="pow2"``, docs/checkpoint.md),

    wscale[n, g] = 2^e_n * c[n, g]  (c integer, 0 <= c <= 255),    wmin[n, g] = 2^e_n * d[n, g]  (|d| <= 2047),

the row's sum over groups is one integer:

    V[m, n] = sum_g (c[n, g] * acc[m, n, g] + d[n, g] * xsum[m, g])          y[m, n] = s_m * 2^e_n * V + bias[n]

``c`` becomes the multiplier of the ``vpmaddwd`` that already widens the int16 pair sums (c instead of 1: no extra
instruction; the kernel widens a panel's uint8 codes to that int16 pair once, before its rows), ``d * xsum`` is one
``vpmaddwd`` per pair of groups, and the zero-point term -zp_m * sum_g c * sum q one multiply per row and tile;
the float conversion runs once per row, tile and K chunk instead of once per group. The weights are the same real
numbers as the float tables (2^e * c is exact in float32), so this computes the contract's v2 linear; it rounds
once per chunk where the float-epilogue kernel rounds once per group.

Exact in int32: per chunk of kc k, |sum xq * c * q| and |zp * sum c * q| <= kc * 255 * 8 * 255 and
|sum d * xsum| <= kc * 255 * 2047, so every partial sum stays below 2^31 for kc <= 1374 (``MAX_CHUNK_K`` = 768, which
also keeps a 4-tile panel's unpacked chunk in L1).
"""

from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx

from agile_tvm.errors import UserError

from . import intrin, layout
from .linear import F32, _m_var, _unpacked_nibbles
from .schedule import mark_scheduled

#: The grid: scale codes c in [0, C_MAX], offset codes |d| <= D_MAX (both exact in float16 times 2^e, so compact
#: float16 tables still hold them), K chunks of at most MAX_CHUNK_K.
C_MAX, D_MAX, MAX_CHUNK_K = 255, 2047, 768
assert 2 * MAX_CHUNK_K * 255 * 8 * C_MAX + MAX_CHUNK_K * 255 * D_MAX < 2**31


def _lsb_exponent(v: np.ndarray) -> np.ndarray:
    """e with v / 2^e an odd integer, per nonzero float32 v (a large value for zeros, which any grid holds)."""
    m, x = np.frexp(v.astype(np.float64))
    mant = np.abs(m * 2.0**24).astype(np.int64)
    low = mant & -mant
    tz = np.where(mant > 0, np.log2(np.maximum(low, 1)).astype(np.int64), 0)
    return np.where(v != 0, x.astype(np.int64) - 24 + tz, np.iinfo(np.int64).max // 2)


def grid_codes(wscale, wmin) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(c u8 [N, G], d i16 [N, G], e i32 [N]) with wscale = 2^e * c and wmin = 2^e * d exactly, or None when some
    row's values are not on such a grid (the caller then uses the float-epilogue kernel)."""
    wscale = np.asarray(wscale, np.float32)
    wmin = np.zeros_like(wscale) if wmin is None else np.asarray(wmin, np.float32)
    if wscale.ndim != 2 or wmin.shape != wscale.shape or not (np.isfinite(wscale).all() and np.isfinite(wmin).all()):
        return None
    e = np.minimum(_lsb_exponent(wscale).min(axis=1), _lsb_exponent(wmin).min(axis=1))
    e = np.where(e > 127, 0, e)  # an all-zero row
    if (e < -149).any():
        return None
    c = np.ldexp(wscale.astype(np.float64), -e[:, None])
    d = np.ldexp(wmin.astype(np.float64), -e[:, None])
    if (c < 0).any() or (c > C_MAX).any() or (np.abs(d) > D_MAX).any():
        return None
    return c.astype(np.uint8), d.astype(np.int16), e.astype(np.int32)


def k_chunks(K: int, gs: int) -> int | None:
    """Number of equal K chunks (whole, even numbers of groups, <= MAX_CHUNK_K each), or None if there is none."""
    G = K // gs
    for nch in range(-(-K // MAX_CHUNK_K), G + 1):
        if G % nch == 0 and (G // nch) % 2 == 0 and K // nch <= MAX_CHUNK_K:
            return nch
    return None


def applicable(isa: str, K: int, gs: int) -> bool:
    """Whether this kernel exists for the shape: nibble weights on x86 (groups % 16 == 0) and a K chunking."""
    return isa in intrin.INT_SCALE_INTRINSICS and gs % 16 == 0 and K % gs == 0 and k_chunks(K, gs) is not None


def pack_tables(q, c, d, e, target) -> dict[str, np.ndarray]:
    """The kernel's tables from the signed codes q [N, K] and ``grid_codes``, tile-major over n (padded):
    c8 u8 [N/nb, G, nb] (the scale codes; the decode GEMV reads them too, `kernels.linear` ``grid``), d16 i16
    [N/nb, G, nb] (the offset codes, also read by the GEMV), zc i32 [N/nb, nch, nb] (sum over a chunk's groups of
    c * sum q), srow f32 [N/nb, nb] (2^e)."""
    q = np.asarray(q, np.int64)
    N, K = q.shape
    G = c.shape[1]
    gs = K // G
    nch = k_chunks(K, gs)
    if nch is None:
        raise UserError(f"K={K} with groups of {gs} has no chunking for the integer-scale GEMM (int_scales.k_chunks)")
    c64 = c.astype(np.int64)
    zc = (c64 * q.reshape(N, G, gs).sum(axis=2)).reshape(N, nch, G // nch).sum(axis=2)

    def tiles(a):  # [N, ...] -> [n_pad / nb, ..., nb], zero-padded: the kernels' tiled tables
        return layout.tile_tables(a, target, 4, "nibble")

    return {"c8": tiles(c.astype(np.uint8)), "d16": tiles(d.astype(np.int16)),
            "zc": tiles(zc.astype(np.int32)), "srow": tiles(np.ldexp(np.ones(N), e).astype(np.float32))}


def int_scale_tensors(N: int, K: int, isa: str, gs: int, *, has_bias=False, n_offset=0, n_total=None, name="lin"):
    """TE of the GEMM (symbolic M): (args, info). Arguments: (xq u8[M, K], wpack (nibble layout), c8, d16, zc, srow
    (``pack_tables``; of n_total channels, the kernel reads [n_offset, n_offset + N)), act_scale f32[M], act_zero
    i32[M], xsum i32[M, G], [bias f32[n_total or N]], y f32[M, N])."""
    if not applicable(isa, K, gs):
        raise UserError(f"the integer-scale GEMM needs nibble weights on x86 and a K chunking: {isa}, K={K}, "
                        f"group {gs}")
    nb = layout.linear_layout(isa, 4, "nibble")[0]
    G, nch = K // gs, k_chunks(K, gs)
    Gc = G // nch
    n_pad = -(-N // nb) * nb
    n_all = n_total or n_pad
    if n_offset % nb or n_offset + n_pad > n_all:
        raise UserError(f"n_offset={n_offset} must be a multiple of {nb} with the kernel's {N} outputs inside "
                        f"n_total={n_all}")
    t0 = n_offset // nb
    M = _m_var(None)
    xq = te.placeholder((M, K), "uint8", name="xq")
    wpack = te.placeholder((n_all // nb, K // 16, 8 * nb), "uint8", name="wpack")
    c8 = te.placeholder((n_all // nb, G, nb), "uint8", name="c8")
    # c in both int16 halves (c * 65537), the vpmaddwd multiplier pair: widened once per panel, before its rows
    ct = te.compute((n_pad // nb, G, nb), lambda t, g, l: c8[t0 + t, g, l].astype("int32") * 65537, name="ct")
    d16 = te.placeholder((n_all // nb, G, nb), "int16", name="d16")
    # d of two groups side by side, the pmaddwd operand pair with xsum's: arranged once per panel, before its rows
    dt = te.compute((n_pad // nb, G // 2, nb, 2), lambda t, gp, l, e2: d16[t0 + t, gp * 2 + e2, l], name="dt")
    zc = te.placeholder((n_all // nb, nch, nb), "int32", name="zc")
    srow = te.placeholder((n_all // nb, nb), F32, name="srow")
    s = te.placeholder((M,), F32, name="act_scale")
    zp = te.placeholder((M,), "int32", name="act_zero")
    xsum = te.placeholder((M, G), "int32", name="xsum")

    class _Panel:  # the kernel's n_pad channels of the concatenated weights
        def __getitem__(self, idx):
            t, *rest = idx
            return wpack[(t0 + t, *rest)]

    wdec = _unpacked_nibbles(_Panel() if t0 else wpack, n_pad, K, nb, 8)  # codes q = u - 8, int8
    g, k = te.reduce_axis((0, Gc), name="g"), te.reduce_axis((0, gs), name="k")
    acc = te.compute((nch, M, n_pad), lambda h, i, n: te.sum(
        xq[i, (h * Gc + g) * gs + k].astype("int32")
        * wdec[n // nb, ((h * Gc + g) * gs + k) // 4, n % nb, k % 4].astype("int32")
        * ct[n // nb, h * Gc + g, n % nb].astype("int16").astype("int32"), axis=[g, k]), name="acc")
    xs16 = te.compute((M, G), lambda i, j: xsum[i, j].astype("int16"), name="xs16")  # |xsum| <= gs * 255
    g2 = te.reduce_axis((0, Gc), name="g2")
    dterm = te.compute((nch, M, n_pad), lambda h, i, n: te.sum(
        xs16[i, h * Gc + g2].astype("int32")
        * dt[n // nb, (h * Gc + g2) // 2, n % nb, g2 % 2].astype("int32"), axis=g2), name="dterm")
    def chunk(h, i, n):  # one chunk's exact integer row sum, converted
        return (acc[h, i, n] + dterm[h, i, n] - zp[i] * zc[t0 + n // nb, h, n % nb]).astype(F32)

    if nch > 1:
        hr = te.reduce_axis((0, nch), name="hr")
        vsum = te.compute((M, n_pad), lambda i, n: te.sum(chunk(hr, i, n), axis=hr), name="vsum")
    else:
        vsum = te.compute((M, n_pad), lambda i, n: chunk(0, i, n), name="vsum")
    bias = te.placeholder((n_total or N,), F32, name="bias") if has_bias else None

    def y_of(i, n):
        v = vsum[i, n] * (s[i] * srow[t0 + n // nb, n % nb])
        return v + bias[n + n_offset] if has_bias else v

    y = te.compute((M, N), y_of, name="y")
    args = [xq, wpack, c8, d16, zc, srow, s, zp, xsum] + ([bias] if has_bias else []) + [y]
    info = dict(isa=isa, nb=nb, n_pad=n_pad, N=N, K=K, G=G, gs=gs, nch=nch, name=name)
    return args, info


def schedule_int_scale(func, info, nt: int | None = None):
    """parallel(panels of nt tiles) > [K chunk > rows > groups > 16 k > tiles: the int32 tile += c * dot] > rows >
    [d * xsum, the chunks' conversion and scales, y]. With one chunk the int32 tile of a row is finished and
    converted right away; with several, the panel's rows are accumulated chunk by chunk (each chunk's unpacked
    weights stay in L1) in an int32 buffer of the panel."""
    nb, nch = info["nb"], info["nch"]
    nblocks = info["n_pad"] // nb
    nt = nt or next(t for t in (4, 3, 2, 1) if nblocks % t == 0)
    sch = s_tir.Schedule(func)
    yb = sch.get_sblock("y")
    yi, yn = sch.get_loops(yb)
    yno, yni = sch.split(yn, [None, nt * nb])
    sch.reorder(yno, yi, yni)
    sch.parallel(yno)
    sch.compute_at(sch.get_sblock("vsum"), yi)
    acc = sch.get_sblock("acc")
    sch.compute_at(acc, yno if nch > 1 else yi)
    dterm = sch.get_sblock("dterm")
    sch.compute_at(dterm, yi)
    sch.compute_at(sch.get_sblock("xs16"), yi)
    if nch > 1:
        ah, ai, an, ag, ak = sch.get_loops(acc)[-5:]
    else:  # compute_at drops the chunk loop of extent 1
        an, ag, ak = sch.get_loops(acc)[-3:]
        ah = None
    noi, ni = sch.split(an, [None, nb])
    ko, kb, ki = sch.split(ak, [None, 4, 4])
    sch.reorder(ag, ko, noi, ni, kb, ki)
    sch.fuse(kb, ki)
    wdec = sch.get_sblock("wdec")
    sch.compute_at(wdec, ah if nch > 1 else yno)  # a chunk's (the panel's) nibbles unpacked once, before its rows
    sch.vectorize(sch.fuse(*sch.get_loops(wdec)[-2:]))
    for table in ("ct", "dt"):
        sch.compute_at(sch.get_sblock(table), yno)
    sch.vectorize(sch.get_loops(sch.get_sblock("ct"))[-1])
    sch.vectorize(sch.fuse(*sch.get_loops(sch.get_sblock("dt"))[-2:]))
    init = sch.decompose_reduction(acc, ag if nch == 1 else ai)
    intrin.register_all()
    sch.tensorize(ni, intrin.INT_SCALE_INTRINSICS[info["isa"]][0])
    sch.unroll(noi)
    sch.vectorize(sch.get_loops(init)[-1])
    if nch > 1:
        dh, dn, dg = sch.get_loops(dterm)[-3:]
    else:
        (dn, dg), dh = sch.get_loops(dterm)[-2:], None
    dno, dni = sch.split(dn, [None, nb])
    dgo, dgi = sch.split(dg, [None, 2])
    sch.reorder(*([dh] if dh is not None else []), dgo, dno, dni, dgi)
    dinit = sch.decompose_reduction(dterm, dgo)
    sch.tensorize(dni, intrin.DOT_INTRINSICS[(info["isa"], 16)][0])
    sch.vectorize(sch.get_loops(dinit)[-1])
    vs = sch.get_sblock("vsum")
    if nch > 1:
        vn, vh = sch.get_loops(vs)[-2:]
        sch.reorder(vh, vn)
        sch.vectorize(vn)
        vinit = sch.decompose_reduction(vs, vh)
        sch.vectorize(sch.get_loops(vinit)[-1])
    else:
        sch.vectorize(sch.get_loops(vs)[-1])
    if info["N"] % nb == 0:
        sch.vectorize(sch.split(yni, [None, nb])[1])
    return mark_scheduled(sch.mod["main"])


def int_scale_linear_func(N: int, K: int, target, *, group_size: int, has_bias=False, n_offset=0, n_total=None,
                          schedule=True):
    """The scheduled PrimFunc (``schedule=False``: the unscheduled TE) named after its shape and options."""
    from agile_tvm.targets import get_target, isa_of

    isa = isa_of(get_target(target))
    name = (f"w4a8_linear_n{N}_k{K}_g{group_size}_intscale" + ("_bias" if has_bias else "")
            + (f"_of{n_offset}of{n_total}" if n_total else ""))
    args, info = int_scale_tensors(N, K, isa, group_size, has_bias=has_bias, n_offset=n_offset, n_total=n_total,
                                   name=name)
    func = te.create_prim_func(args).with_attr("global_symbol", name)
    return schedule_int_scale(func, info) if schedule else func


def reference(xq, zp, s, xsum, q, c, d, e, bias=None) -> np.ndarray:
    """numpy twin: y = s_m * 2^e_n * V[m, n] + bias with V the exact integer row sum (int64), rounded to float32 the
    kernel's way (one float32 sum of the chunks' exact integers)."""
    q = np.asarray(q, np.int64)
    N, K = q.shape
    G = c.shape[1]
    gs = K // G
    nch = k_chunks(K, gs)
    xc = np.asarray(xq, np.int64) - np.asarray(zp, np.int64)[:, None]
    w = np.repeat(c.astype(np.int64), gs, axis=1) * q
    v = np.zeros((xq.shape[0], N), np.float32)
    for h in range(nch):
        ks, gsl = slice(h * K // nch, (h + 1) * K // nch), slice(h * G // nch, (h + 1) * G // nch)
        part = xc[:, ks] @ w[:, ks].T + np.asarray(xsum, np.int64)[:, gsl] @ d[:, gsl].astype(np.int64).T
        assert np.abs(part).max(initial=0) < 2**31
        v = v + part.astype(np.float32)
    y = v * (np.asarray(s, np.float32)[:, None] * np.ldexp(np.ones(N), e).astype(np.float32)[None, :])
    return y + bias.astype(np.float32) if bias is not None else y
