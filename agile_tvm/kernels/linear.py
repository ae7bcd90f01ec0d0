"""TRIP-folded W4A8 and W8A8 linear kernels: integer GEMM/GEMV with a float epilogue.

The TRIP power-of-two factors are folded into the weights at quantization time, so the kernel sees one
activation scale/zero per tensor (checkpoint v1, ``act="tensor"``) or per row (v2, ``act="token"``: s_m, zp_m
come from ``quantize_act_token_func``) and per-output-channel (optionally per-group) weight scales:

    dot[m, n, g] = sum_{k in g} xs[m, k] * w'[n, k]              (int32, SIMD dot-product instructions)
    acc          = dot + (o - zp_m) * wsum[n, g]                  (== the contract's accumulator, bit for bit)
    y[m, n]      = s_m * sum_g (float(acc_g) * wscale[n, g] + wmin[n, g] * float(xsum[m, g])) + bias[n]
    yq[m, n]     = clip(floor(y * (1/out_scale) * 2^-out_shift[n] + 0.5) + out_zero, 0, 255)  (requant=True)

``wmin`` (``has_wmin=True``, v2 float weight offsets) needs the per-row group sums ``xsum = sum (xq - zp_m)``,
which only the per-token quantizer produces, so it requires ``act="token"``.
Layouts and the meaning of ``o`` / ``w'`` / ``wsum`` are in ``layout.py``; the schedules in ``schedule.py``.
"""

from __future__ import annotations

from tvm import te, tirx

from agile_tvm.errors import UserError

from . import layout

F32 = "float32"


def _m_var(m):
    return tirx.Var("M", "int64") if m is None else int(m)


def _pow2_neg(shift):
    """2^-shift as float32, exact: 1 / float(1 << shift)."""
    return tirx.const(1.0, F32) / (tirx.const(1, "int32") << shift.astype("int32")).astype(F32)


def quantize_expr(v, inv_scale, zero, shift, bits: int):
    """The contract's activation quantizer on one float32 value -> uint8 expression."""
    f = te.floor(v * inv_scale * _pow2_neg(shift) + tirx.const(0.5, F32)) + zero.astype(F32)
    return te.max(te.min(f, tirx.const(float(2**bits - 1), F32)), tirx.const(0.0, F32)).astype("uint8")


def check_v2_options(act: str, has_wmin: bool, requant: bool) -> None:
    """Reject option combinations the kernels do not compute, with the fix in the message."""
    if act not in ("tensor", "token"):
        raise UserError(f'act must be "tensor" (checkpoint v1) or "token" (v2 per-row scales), got {act!r}')
    if has_wmin and act != "token":
        raise UserError('has_wmin=True (float weight offsets) needs the per-row xsum of act="token": pass act="token"')
    if requant and act == "token":
        raise UserError('requant=True needs a static output scale: use act="tensor", or requant=False with '
                        'act="token" and quantize the output with quantize_act_token_func')


class _ActParams:
    """The activation scale/zero parameters: 0-d tensors (``act="tensor"``) or one per row (``"token"``)."""

    def __init__(self, M, act):
        shape = (M,) if act == "token" else ()
        self.per_row = act == "token"
        self.scale = te.placeholder(shape, F32, name="act_scale")
        self.zero = te.placeholder(shape, "int32", name="act_zero")

    def s(self, i):
        return self.scale[i] if self.per_row else self.scale[()]

    def zp(self, i):
        return self.zero[i] if self.per_row else self.zero[()]


def _dot_int8(M, G, gs, n_pad, nb, kk, act, wpack):
    """dot[i, g, n] over one group, n innermost: the tensorized tile must be the contiguous dimension."""
    k = te.reduce_axis((0, gs), name="k")
    return te.compute(
        (M, G, n_pad),
        lambda i, g, n: te.sum(
            act[i, g * gs + k].astype("int32") * wpack[n // nb, (g * gs + k) // kk, n % nb, k % kk].astype("int32"),
            axis=k,
        ),
        name="dot",
    )


def _dot_nibble(M, G, gs, n_pad, nb, act, xq, wpack):
    """dot over 4-bit codes u unpacked from the nibble layout, plus the row sums of xq the correction needs."""
    k = te.reduce_axis((0, gs), name="k")
    half = 4 * nb

    def wval(n, kg):
        kl = kg % 16
        byte = wpack[n // nb, kg // 16, kl // 4 % 2 * half + n % nb * 4 + kl % 4]
        return (byte >> (kl // 8 * 4).astype("uint8")) & tirx.const(15, "uint8")

    dot = te.compute(
        (M, G, n_pad),
        lambda i, g, n: te.sum(act[i, g * gs + k].astype("int32") * wval(n, g * gs + k).astype("int32"), axis=k),
        name="dot",
    )
    kx = te.reduce_axis((0, gs), name="kx")
    xqsum = te.compute((M, G), lambda i, g: te.sum(xq[i, g * gs + kx].astype("int32"), axis=kx), name="xqsum")
    return dot, xqsum


def _transposed(src, G, n_pad, N, name):
    """[G, n_pad] copy of a [N or n_pad, G] per-(channel, group) tensor, zero beyond N: vector loads over n."""
    rows = src.shape[0]

    def value(g, n):
        if int(rows) >= n_pad:
            return src[n, g]
        return tirx.if_then_else(n < rows, src[tirx.min(n, rows - 1), g], tirx.const(0, src.dtype))

    return te.compute((G, n_pad), value, name=name)


def _exact_in_f32(gs: int, wbits: int) -> bool:
    """True when every integer of a group's accumulation (dot, zero-point correction, acc) is below 2^24, so
    float32 holds them exactly: |xq - o|, |zp - o| <= 255 and |q - wzero| <= 15 (4-bit) or 254 (8-bit)."""
    return gs * 255 * (15 if wbits == 4 else 254) < 2**24


def _grouped_acc_int8(dot, wsum, ap, G, n_pad, o, exact_f32):
    """float32(acc[i, n, g]) with acc = dot + (o - zp) * wsum[n, g], wsum read from a [G, n] table.

    Per-tensor zero point: the table holds (o - zp) * wsum, one integer add per group. Per-row zero point: when
    all the integers fit float32 exactly (``_exact_in_f32``), the table holds float(wsum) and the correction is
    one exact multiply-add in float (instead of an integer multiply, an add and the conversion)."""
    if not ap.per_row:
        wsum_t = te.compute((G, n_pad), lambda g, n: (o - ap.zero[()]) * wsum[n, g], name="wsum_t")
        return lambda i, n, g: (dot[i, g, n] + wsum_t[g, n]).astype(F32)
    if exact_f32:
        wsum_t = te.compute((G, n_pad), lambda g, n: wsum[n, g].astype(F32), name="wsum_t")
        return lambda i, n, g: dot[i, g, n].astype(F32) + (o - ap.zp(i)).astype(F32) * wsum_t[g, n]
    wsum_t = te.compute((G, n_pad), lambda g, n: wsum[n, g], name="wsum_t")
    return lambda i, n, g: (dot[i, g, n] + (o - ap.zp(i)) * wsum_t[g, n]).astype(F32)


def _grouped_acc_nibble(dot, xqsum, wsum, ap, G, gs, n_pad):
    """acc = dot(xq, u) - c * xqsum - zp * sum u + zp * c * gs with u = q + 8, c = 8 + wzero (layout.py),
    regrouped as dot - c * (xqsum - zp * gs) - zp * sum u; tables [G, n] of c and of (-zp *) sum u."""
    wsum_t = te.compute((G, n_pad), lambda g, n: wsum[n, 1, g], name="wsum_t")
    if ap.per_row:
        wsum0_t = te.compute((G, n_pad), lambda g, n: wsum[n, 0, g], name="wsum0_t")
        return lambda i, n, g: (dot[i, g, n] - wsum_t[g, n] * (xqsum[i, g] - ap.zp(i) * gs)
                                - ap.zp(i) * wsum0_t[g, n]).astype(F32)
    wsum0_t = te.compute((G, n_pad), lambda g, n: -ap.zero[()] * wsum[n, 0, g], name="wsum0_t")
    return lambda i, n, g: (dot[i, g, n] - wsum_t[g, n] * (xqsum[i, g] - ap.zero[()] * gs)
                            + wsum0_t[g, n]).astype(F32)


def linear_tensors(N, K, isa, wbits, *, group_size=None, has_bias=False, requant=False, m=None, name="linear",
                   wfmt="int8", act="tensor", has_wmin=False):
    """TE description of the quantized linear; returns (args, info) with the stage names the schedule uses.

    ``wfmt="nibble"`` (W4A8 on x86, group size % 16 == 0): weights stay 4-bit in memory (layout.py) and are
    unpacked in registers; the zero points move into a correction with the activation row sums.
    Grouped weights (G > 1) and the nibble format take the register-tile form ``facc``: per group, the int32
    tile of one row is corrected, converted and FMA'd into a float tile with transposed [G, n] scales
    (``schedule.py``). Per-channel int8-format weights keep v1's form (the TE of v1 is unchanged, so tuning
    records still match)."""
    check_v2_options(act, has_wmin, requant)
    gs, G = layout.check_linear_shape(N, K, group_size)
    nb, kk, wdt = layout.linear_layout(isa, wbits)
    if wfmt == "nibble":
        layout.check_nibble(isa, wbits, gs)
        kk = 16
    o = layout.activation_offset(isa)
    n_pad = -(-N // nb) * nb
    M = _m_var(m)
    xq = te.placeholder((M, K), "uint8", name="xq")
    if wfmt == "nibble":
        wpack = te.placeholder((n_pad // nb, K // 16, 8 * nb), "uint8", name="wpack")
        wsum = te.placeholder((n_pad, 2, G), "int32", name="wsum")  # [:, 0] = sum_k u, [:, 1] = 8 + wzero
    else:
        wpack = te.placeholder((n_pad // nb, K // kk, nb, kk), wdt, name="wpack")
        wsum = te.placeholder((n_pad, G), "int32", name="wsum")
    wscale = te.placeholder((N, G), F32, name="wscale")
    wmin = te.placeholder((N, G), F32, name="wmin") if has_wmin else None
    ap = _ActParams(M, act)
    xsum = te.placeholder((M, G), "int32", name="xsum") if has_wmin else None
    args = [xq, wpack, wsum, wscale] + ([wmin] if has_wmin else []) + [ap.scale, ap.zero] + ([xsum] if has_wmin else [])

    # No row tiling: a predicate on a ragged last row tile defeats tensorize, and a padded row tile defeats the
    # stage-pipeline analysis with a symbolic M. Register reuse comes from the n tiles instead (schedule.py).
    if wdt == "int16":  # x86 W8A8: int16 pmaddwd path
        xs = te.compute((M, K), lambda i, k: xq[i, k].astype("int16"), name="xs")
    elif o:  # ARM: signed bytes for sdot
        xs = te.compute((M, K), lambda i, k: (xq[i, k].astype("int32") - o).astype("int8"), name="xs")
    else:
        xs = None
    a = xq if xs is None else xs
    if wfmt == "nibble":
        dot, xqsum = _dot_nibble(M, G, gs, n_pad, nb, a, xq, wpack)
    else:
        dot, xqsum = _dot_int8(M, G, gs, n_pad, nb, kk, a, wpack), None
    grouped = G > 1 or wfmt == "nibble"
    stages = []
    if grouped:
        # per n panel: scales, zero-point corrections and offsets transposed to [G, n_pad], zero beyond N
        wscale_t = _transposed(wscale, G, n_pad, N, "wscale_t")
        wmin_t = _transposed(wmin, G, n_pad, N, "wmin_t") if has_wmin else None
        acc_f32 = _grouped_acc_nibble(dot, xqsum, wsum, ap, G, gs, n_pad) if wfmt == "nibble" else \
            _grouped_acc_int8(dot, wsum, ap, G, n_pad, o, _exact_in_f32(gs, wbits))
        stages = ["wscale_t", "wsum_t"] + (["wsum0_t"] if wfmt == "nibble" else []) + (["wmin_t"] if has_wmin else [])
        gr = te.reduce_axis((0, G), name="gr")
        if has_wmin:
            # two terms per group, each FMA'd into the float tile (the order of a float sum is free)
            part = te.reduce_axis((0, 2), name="part")

            def term(i, n, g, p):
                return tirx.Select(p == 0, acc_f32(i, n, g) * wscale_t[g, n], wmin_t[g, n] * xsum[i, g].astype(F32))

            facc = te.compute((M, n_pad), lambda i, n: te.sum(term(i, n, gr, part), axis=[gr, part]), name="facc")
        else:
            facc = te.compute((M, n_pad), lambda i, n: te.sum(acc_f32(i, n, gr) * wscale_t[gr, n], axis=gr),
                              name="facc")
        pre = lambda i, n: facc[i, n]  # noqa: E731
    else:  # per-channel int8 tiles: the epilogue reads wscale[n, 0] directly

        def pre(i, n):
            f = (dot[i, 0, n] + (o - ap.zp(i)) * wsum[n, 0]).astype(F32) * wscale[n, 0]
            return f + wmin[n, 0] * xsum[i, 0].astype(F32) if has_wmin else f

    if has_bias:
        bias = te.placeholder((N,), F32, name="bias")
        args.append(bias)
        y = te.compute((M, N), lambda i, n: pre(i, n) * ap.s(i) + bias[n], name="y")
    else:
        y = te.compute((M, N), lambda i, n: pre(i, n) * ap.s(i), name="y")
    out = y
    if requant:
        out_scale = te.placeholder((), F32, name="out_scale")
        out_zero = te.placeholder((), "int32", name="out_zero")
        out_shift = te.placeholder((N,), "uint8", name="out_shift")
        args += [out_scale, out_zero, out_shift]
        out = te.compute(
            (M, N),
            lambda i, n: quantize_expr(y[i, n], tirx.const(1.0, F32) / out_scale[()], out_zero[()], out_shift[n], 8),
            name="yq",
        )
    args.append(out)
    info = dict(nb=nb, kk=kk, n_pad=n_pad, G=G, gs=gs, has_xs=xs is not None, wfmt=wfmt, grouped=grouped,
                has_wmin=has_wmin,
                stages=stages, requant=requant, isa=isa, wbits=wbits, m=m, N=N, K=K, name=name)
    return args, info


def _linear_func(wbits, N, K, target, *, group_size=None, has_bias=False, requant=False, m=None, wfmt="int8",
                 act="tensor", has_wmin=False):
    from agile_tvm.targets import get_target, isa_of

    from .schedule import schedule_linear

    check_v2_options(act, has_wmin, requant)
    tgt = get_target(target)
    isa = isa_of(tgt)
    gs, _ = layout.check_linear_shape(N, K, group_size)
    name = (f"w{wbits}a8_linear_n{N}_k{K}" + ("" if gs == K else f"_g{gs}") + ("_bias" if has_bias else "")
            + ("_requant" if requant else "") + ("_tok" if act == "token" else "") + ("_wmin" if has_wmin else "")
            + ("" if m is None else f"_m{m}") + ("_u4" if wfmt == "nibble" else ""))
    args, info = linear_tensors(N, K, isa, wbits, group_size=group_size, has_bias=has_bias, requant=requant, m=m,
                                name=name, wfmt=wfmt, act=act, has_wmin=has_wmin)
    func = te.create_prim_func(args).with_attr("global_symbol", name)
    return schedule_linear(func, info)


def w4a8_linear_func(N, K, target, *, group_size=None, has_bias=False, requant=False, m=None, wfmt="int8",
                     act="tensor", has_wmin=False):
    """W4A8 linear for ``target`` (scheduled PrimFunc, symbolic M unless ``m`` is given). See module doc.

    ``wfmt="nibble"``: weights stay 4-bit in memory (pack with the same ``wfmt``), x86 only; half the weight
    traffic, which is what decode (M = 1) is bound by. ``act="token"`` / ``has_wmin=True``: checkpoint v2
    (per-row activation scale/zero f32[M]/i32[M]; float weight offsets wmin f32[N, G] with xsum i32[M, G])."""
    return _linear_func(4, N, K, target, group_size=group_size, has_bias=has_bias, requant=requant, m=m, wfmt=wfmt,
                        act=act, has_wmin=has_wmin)


def w8a8_linear_func(N, K, target, *, group_size=None, has_bias=False, requant=False, m=None, act="tensor",
                     has_wmin=False):
    """W8A8 linear for ``target`` (int16 pmaddwd on x86, sdot on ARM). See module doc and ``w4a8_linear_func``."""
    return _linear_func(8, N, K, target, group_size=group_size, has_bias=has_bias, requant=requant, m=m, act=act,
                        has_wmin=has_wmin)
