"""TRIP-folded W4A8 and W8A8 linear kernels: integer GEMM/GEMV with a float epilogue.

The TRIP power-of-two factors are folded into the weights at quantization time, so the kernel sees one
per-tensor activation scale/zero and per-output-channel (optionally per-group) weight scales:

    dot[m, n, g] = sum_{k in g} xs[m, k] * w'[n, k]              (int32, SIMD dot-product instructions)
    acc          = dot + (o - zp) * wsum[n, g]                    (== the contract's accumulator, bit for bit)
    y[m, n]      = (sum_g float(acc_g) * wscale[n, g]) * act_scale + bias[n]
    yq[m, n]     = clip(floor(y * (1/out_scale) * 2^-out_shift[n] + 0.5) + out_zero, 0, 255)  (requant=True)

Layouts and the meaning of ``o`` / ``w'`` / ``wsum`` are in ``layout.py``; the schedules in ``schedule.py``.
"""

from __future__ import annotations

from tvm import te, tirx

from . import layout


def _m_var(m):
    return tirx.Var("M", "int64") if m is None else int(m)


def _pow2_neg(shift):
    """2^-shift as float32, exact: 1 / float(1 << shift)."""
    return tirx.const(1.0, "float32") / (tirx.const(1, "int32") << shift.astype("int32")).astype("float32")


def quantize_expr(v, inv_scale, zero, shift, bits: int):
    """The contract's activation quantizer on one float32 value -> uint8 expression."""
    f = te.floor(v * inv_scale * _pow2_neg(shift) + tirx.const(0.5, "float32")) + zero.astype("float32")
    return te.max(te.min(f, tirx.const(float(2**bits - 1), "float32")), tirx.const(0.0, "float32")).astype("uint8")


def linear_tensors(N, K, isa, wbits, *, group_size=None, has_bias=False, requant=False, m=None, name="linear",
                   wfmt="int8"):
    """TE description of the quantized linear; returns (args, info) with the stage names the schedule uses.

    ``wfmt="nibble"`` (W4A8 on x86, group size % 16 == 0): weights stay 4-bit in memory (layout.py) and are
    unpacked in registers; the zero points move into a correction with the activation row sums."""
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
    wscale = te.placeholder((N, G), "float32", name="wscale")
    act_scale = te.placeholder((), "float32", name="act_scale")
    act_zero = te.placeholder((), "int32", name="act_zero")
    args = [xq, wpack, wsum, wscale, act_scale, act_zero]

    # No row tiling: a predicate on a ragged last row tile defeats tensorize, and a padded row tile defeats the
    # stage-pipeline analysis with a symbolic M. Register reuse comes from the n tiles instead (schedule.py).
    if wdt == "int16":  # x86 W8A8: int16 pmaddwd path
        xs = te.compute((M, K), lambda i, k: xq[i, k].astype("int16"), name="xs")
    elif o:  # ARM: signed bytes for sdot
        xs = te.compute((M, K), lambda i, k: (xq[i, k].astype("int32") - o).astype("int8"), name="xs")
    else:
        xs = None
    act = xq if xs is None else xs

    k = te.reduce_axis((0, gs), name="k")
    if wfmt == "nibble":
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
        xsum = te.compute((M, G), lambda i, g: te.sum(xq[i, g * gs + kx].astype("int32"), axis=kx), name="xsum")

        def corrected(i, n, g):
            zp, c = act_zero[()], wsum[n, 1, g]
            acc = dot[i, g, n] - c * xsum[i, g] - zp * wsum[n, 0, g] + zp * c * gs
            return acc.astype("float32") * wscale[n, g]
    else:
        dot = te.compute(
            (M, G, n_pad),  # n innermost: the tensorized tile must be the contiguous dimension
            lambda i, g, n: te.sum(
                act[i, g * gs + k].astype("int32")
                * wpack[n // nb, (g * gs + k) // kk, n % nb, k % kk].astype("int32"),
                axis=k,
            ),
            name="dot",
        )

        def corrected(i, n, g):
            return (dot[i, g, n] + (o - act_zero[()]) * wsum[n, g]).astype("float32") * wscale[n, g]

    if G == 1:
        gsum = None
        pre = lambda i, n: corrected(i, n, 0)  # noqa: E731
    else:
        gr = te.reduce_axis((0, G), name="gr")
        gsum = te.compute((M, N), lambda i, n: te.sum(corrected(i, n, gr), axis=gr), name="gsum")
        pre = lambda i, n: gsum[i, n]  # noqa: E731
    if has_bias:
        bias = te.placeholder((N,), "float32", name="bias")
        args.append(bias)
        y = te.compute((M, N), lambda i, n: pre(i, n) * act_scale[()] + bias[n], name="y")
    else:
        y = te.compute((M, N), lambda i, n: pre(i, n) * act_scale[()], name="y")
    out = y
    if requant:
        out_scale = te.placeholder((), "float32", name="out_scale")
        out_zero = te.placeholder((), "int32", name="out_zero")
        out_shift = te.placeholder((N,), "uint8", name="out_shift")
        args += [out_scale, out_zero, out_shift]
        out = te.compute(
            (M, N),
            lambda i, n: quantize_expr(
                y[i, n], tirx.const(1.0, "float32") / out_scale[()], out_zero[()], out_shift[n], 8
            ),
            name="yq",
        )
    args.append(out)
    info = dict(nb=nb, kk=kk, n_pad=n_pad, G=G, gs=gs, has_xs=xs is not None, wfmt=wfmt, has_gsum=gsum is not None,
                requant=requant, isa=isa, wbits=wbits, m=m, N=N, K=K, name=name)
    return args, info


def _linear_func(wbits, N, K, target, *, group_size=None, has_bias=False, requant=False, m=None, wfmt="int8"):
    from agile_tvm.targets import get_target, isa_of

    from .schedule import schedule_linear

    tgt = get_target(target)
    isa = isa_of(tgt)
    gs, _ = layout.check_linear_shape(N, K, group_size)
    name = (f"w{wbits}a8_linear_n{N}_k{K}" + ("" if gs == K else f"_g{gs}") + ("_bias" if has_bias else "")
            + ("_requant" if requant else "") + ("" if m is None else f"_m{m}") + ("_u4" if wfmt == "nibble" else ""))
    args, info = linear_tensors(N, K, isa, wbits, group_size=group_size, has_bias=has_bias, requant=requant, m=m,
                                name=name, wfmt=wfmt)
    func = te.create_prim_func(args).with_attr("global_symbol", name)
    return schedule_linear(func, info)


def w4a8_linear_func(N, K, target, *, group_size=None, has_bias=False, requant=False, m=None, wfmt="int8"):
    """W4A8 linear for ``target`` (scheduled PrimFunc, symbolic M unless ``m`` is given). See module doc.

    ``wfmt="nibble"``: weights stay 4-bit in memory (pack with the same ``wfmt``), x86 only; half the weight
    traffic, which is what decode (M = 1) is bound by."""
    return _linear_func(4, N, K, target, group_size=group_size, has_bias=has_bias, requant=requant, m=m, wfmt=wfmt)


def w8a8_linear_func(N, K, target, *, group_size=None, has_bias=False, requant=False, m=None):
    """W8A8 linear for ``target`` (int16 pmaddwd on x86, sdot on ARM). See module doc."""
    return _linear_func(8, N, K, target, group_size=group_size, has_bias=has_bias, requant=requant, m=m)
