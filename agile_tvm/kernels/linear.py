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

    def __init__(self, M, act, scale=None, zero=None):
        shape = (M,) if act == "token" else ()
        self.per_row = act == "token"
        self.scale = te.placeholder(shape, F32, name="act_scale") if scale is None else scale
        self.zero = te.placeholder(shape, "int32", name="act_zero") if zero is None else zero

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


def _nibble(wpack, nb, n, k):
    """The 4-bit code u[n, k] (uint8 in [0, 15]) of the nibble layout (layout.py)."""
    kl = k % 16
    byte = wpack[n // nb, k // 16, kl // 4 % 2 * (4 * nb) + n % nb * 4 + kl % 4]
    return (byte >> (kl // 8 * 4).astype("uint8")) & tirx.const(15, "uint8")


def _dot_nibble(M, G, gs, n_pad, nb, act, wpack):
    """dot over 4-bit codes u unpacked from the nibble layout in registers (the GEMV: each code is used once)."""
    k = te.reduce_axis((0, gs), name="k")
    return te.compute(
        (M, G, n_pad),
        lambda i, g, n: te.sum(act[i, g * gs + k].astype("int32")
                               * _nibble(wpack, nb, n, g * gs + k).astype("int32"), axis=k),
        name="dot",
    )


def _dot_nibble_zp(M, G, gs, n_pad, nb, act, ap, wpack):
    """dot = sum_k (xq - zp) * u over 4-bit codes (``zero_in_dot``): the zero-point correction happens in the dot
    (``intrin.NIBBLE_ZP_INTRINSICS``), so the GEMV reads no row sums of the codes."""
    k = te.reduce_axis((0, gs), name="k")
    return te.compute(
        (M, G, n_pad),
        lambda i, g, n: te.sum((act[i, g * gs + k].astype("int32") - ap.zp(i))
                               * _nibble(wpack, nb, n, g * gs + k).astype("int32"), axis=k),
        name="dot",
    )


def _unpacked_nibbles(wpack, n_pad, K, nb, minus: int):
    """The codes u - ``minus`` as int8 [nb, 4] tiles (the int8 layout): the GEMM unpacks each panel once into L1
    and runs the int8 micro-kernel over all rows, instead of unpacking in registers once per row."""
    half = 4 * nb

    def code(t, kb, j, l):  # tile kb % 4 of its 16 k: bytes [0, half) or [half, 2 half), low or high nibbles
        byte = wpack[t, kb // 4, kb % 2 * half + j * 4 + l]  # contiguous in j * 4 + l: one vector load per tile
        u = ((byte >> (kb % 4 // 2 * 4).astype("uint8")) & tirx.const(15, "uint8")).astype("int8")
        return u - tirx.const(minus, "int8") if minus else u

    return te.compute((n_pad // nb, K // 4, nb, 4), code, name="wdec")


def _xqsum(M, G, gs, xq):
    """Per row and group sum of the codes xq: the nibble correction's activation term when no xsum is given."""
    kx = te.reduce_axis((0, gs), name="kx")
    return te.compute((M, G), lambda i, g: te.sum(xq[i, g * gs + kx].astype("int32"), axis=kx), name="xqsum")


class _Tiled:
    """A per-(channel, ...) table stored tile-major, [n_pad / nb, ..., nb] (``tables="tiled"``), indexed as its
    channel-major twin [n_pad, ...]: a tile's values of one group are one vector load (the GEMV reads them in
    place; channel-major [N, G] tables made it gather 8 scalars per table, group and tile)."""

    def __init__(self, tensor, nb: int, n_pad: int, offset: int = 0, dtype: str | None = None):
        self.tensor, self.nb, self.tile0 = tensor, nb, offset // nb
        self.shape = (n_pad, *tensor.shape[1:-1])
        self.dtype = dtype or tensor.dtype  # compact tables are stored narrower and widened on load

    def __getitem__(self, idx):
        n, *rest = idx
        v = self.tensor[(self.tile0 + n // self.nb, *rest, n % self.nb)]
        return v if self.dtype == self.tensor.dtype else v.astype(self.dtype)


class _GridTable:
    """A per-(channel, group) float table given by integer grid codes [tiles, G, nb] times a per-channel power of two
    srow [tiles, nb] (``grid``), indexed [n, g] like `_Tiled`. The product is exact in float32 (codes below 2^11,
    srow a power of two), so it equals the float table it replaces bit for bit while reading 1 (scale) or 2
    (offset) bytes per group instead of a float16's 2."""

    def __init__(self, code, srow, nb: int, n_pad: int, offset: int = 0):
        self.code, self.srow = _Tiled(code, nb, n_pad, offset, F32), _Tiled(srow, nb, n_pad, offset)
        self.shape, self.dtype = self.code.shape, F32

    def __getitem__(self, idx):
        n, g = idx
        return self.code[n, g] * self.srow[(n,)]


class _TileOffset:
    """The packed weights of channels [offset, offset + n_pad) of a longer (concatenated) weight array."""

    def __init__(self, tensor, tile0: int):
        self.tensor, self.tile0 = tensor, tile0

    def __getitem__(self, idx):
        t, *rest = idx
        return self.tensor[(self.tile0 + t, *rest)]


#: Storage dtype of a table with ``compact=True``: float16 scales/offsets (exact for weights that came from
#: fp16 blocks such as Q4_1; the frontend checks), int16 row sums (|sum| <= gs * 254 fits for groups <= 128).
COMPACT = {"float32": "float16", "int32": "int16"}


def _table(name, shape, dtype, tables, nb, n_pad, n_total=None, offset=0, compact=False):
    """(placeholder, indexable view [n, ...]) of one per-channel table in the ``tables`` layout; tiled tables
    may hold n_total channels of which the kernel reads [offset, offset + n_pad), in 16 bits when ``compact``."""
    if tables == "tiled":
        stored = COMPACT[dtype] if compact else dtype
        ph = te.placeholder(((n_total or n_pad) // nb, *shape[1:], nb), stored, name=name)
        return ph, _Tiled(ph, nb, n_pad, offset, dtype)
    ph = te.placeholder(shape, dtype, name=name)
    return ph, ph


def _token_quantizer(x, act_shift, M, K, gs, G, bits):
    """The v2 per-token quantizer as TE stages (docs/checkpoint.md, bit-exact to reference.quantize_act_token and
    to quantize_act_token_func): -> (xq, act_scale, act_zero, xsum). Used by the decode GEMV with ``x_float``,
    where one row's quantization is too little work for a kernel call of its own."""
    from .quantize import no_contract

    top = tirx.const(float(2**bits - 1), F32)
    half = tirx.const(0.5, F32)
    v = te.compute((M, K), lambda i, k: x[i, k] * _pow2_neg(act_shift[k]), name="xv")
    kr = te.reduce_axis((0, K), name="kr")
    nlo = te.compute((M,), lambda i: te.max(-v[i, kr], axis=kr, init=tirx.const(0.0, F32)), name="xnlo")
    kh = te.reduce_axis((0, K), name="kh")
    hi = te.compute((M,), lambda i: te.max(v[i, kh], axis=kh, init=tirx.const(0.0, F32)), name="xhi")

    def scale(i):  # (hi - lo) / top, 1 for an all-zero row; hi - lo == hi + (-lo) exactly
        s = (hi[i] + nlo[i]) / top
        return tirx.Select(s == tirx.const(0.0, F32), tirx.const(1.0, F32), s)

    act_scale = te.compute((M,), scale, name="act_scale")
    r = te.compute((M,), lambda i: tirx.const(1.0, F32) / act_scale[i], name="xr")
    act_zero = te.compute((M,), lambda i: te.max(te.min(te.floor(no_contract(nlo[i] * r[i]) + half), top),
                                                 tirx.const(0.0, F32)).astype("int32"), name="act_zero")
    xq = te.compute((M, K), lambda i, k: te.max(te.min(te.floor(no_contract(v[i, k] * r[i]) + half)
                                                       + act_zero[i].astype(F32), top),
                                                tirx.const(0.0, F32)).astype("uint8"), name="xq")
    kg = te.reduce_axis((0, gs), name="kg")
    xqsum = te.compute((M, G), lambda i, g: te.sum(xq[i, g * gs + kg].astype("int32"), axis=kg), name="xqsum_q")
    xsum = te.compute((M, G), lambda i, g: xqsum[i, g] - gs * act_zero[i], name="xsum")
    return xq, act_scale, act_zero, xsum


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


def _nibble_exact_in_f32(gs: int) -> bool:
    """True when float(dot) - zp * sum u - c * xsum stays exact in float32: each term and partial sum is below
    3 * gs * 255 * 15 < 2^24 (|dot|, zp * sum u <= gs * 255 * 15; |c * xsum| <= 15 * gs * 255)."""
    return 3 * gs * 255 * 15 < 2**24


def _grouped_acc_nibble_xsum(dot, xsum, wsum, ap, G, gs, n_pad):
    """The nibble correction with the per-row group sums xsum = xqsum - zp * gs the token quantizer already made:
    acc = dot(xq, u) - c * xsum - zp * sum u. Exact in float32 for groups up to 1461 (two FMAs on exact integers,
    tables [G, n] of float c and float sum u), else in int32."""
    if _nibble_exact_in_f32(gs):
        wsum_t = te.compute((G, n_pad), lambda g, n: wsum[n, 1, g].astype(F32), name="wsum_t")
        wsum0_t = te.compute((G, n_pad), lambda g, n: wsum[n, 0, g].astype(F32), name="wsum0_t")
        return lambda i, n, g: (dot[i, g, n].astype(F32) - ap.zp(i).astype(F32) * wsum0_t[g, n]
                                - wsum_t[g, n] * xsum[i, g].astype(F32))
    wsum_t = te.compute((G, n_pad), lambda g, n: wsum[n, 1, g], name="wsum_t")
    wsum0_t = te.compute((G, n_pad), lambda g, n: wsum[n, 0, g], name="wsum0_t")
    return lambda i, n, g: (dot[i, g, n] - ap.zp(i) * wsum0_t[g, n] - wsum_t[g, n] * xsum[i, g]).astype(F32)


def _decoded_nibble_v2(dot, wsum, wscale, wmin, ap, G, gs, n_pad):
    """Nibble GEMM with float offsets (v2): dot runs over q = u - 8, so acc = dot - zp * sum q - wzero * xsum;
    the last term joins the float offset term (wmin - wzero * wscale) * xsum, which is exactly wmin for the
    contract's v2 weights (wzero = 0). Per group and tile this is the int8 path's epilogue (a conversion and three
    FMAs) instead of one FMA more. Returns (acc_f32, wmin_t); acc_f32 is exact (|dot|, |zp * sum q| <= gs * 2040)."""
    wsum0_t = te.compute((G, n_pad), lambda g, n: (wsum[n, 0, g] - 8 * gs).astype(F32), name="wsum0_t")

    rows = int(wscale.shape[0])

    def offset(g, n):
        r = n if rows >= n_pad else tirx.min(n, rows - 1)
        v = wmin[r, g] - (wsum[n, 1, g] - 8).astype(F32) * wscale[r, g]
        return v if rows >= n_pad else tirx.if_then_else(n < rows, v, tirx.const(0.0, F32))

    wmin_t = te.compute((G, n_pad), offset, name="wmin_t")
    return (lambda i, n, g: dot[i, g, n].astype(F32) - ap.zp(i).astype(F32) * wsum0_t[g, n]), wmin_t


def _check_fusion(N, nb, m, act, tables, requant, n_offset, n_total, outs, x_float, compact, zero_in_dot=False,
                  wfmt=None, has_wmin=False, grid=False):
    """Validate the options that let one kernel serve part of, or several of, linears sharing an input."""
    if zero_in_dot and (wfmt != "nibble" or m != 1 or not has_wmin):
        raise UserError('zero_in_dot is for the decode GEMV over nibble weights with float offsets: pass '
                        'wfmt="nibble", m=1, act="token", has_wmin=True')
    if grid and (not zero_in_dot or tables != "tiled"):
        raise UserError('grid (scale and offset codes on a power-of-two row grid) is for the zero_in_dot decode '
                        'GEMV: pass zero_in_dot=True, tables="tiled"')
    if (n_offset or n_total or outs or compact) and tables != "tiled":
        raise UserError('slices of concatenated weights (n_offset, n_total, outs) and compact tables need '
                        'tables="tiled"')
    if n_offset % nb or (n_total and (n_total % nb or n_offset + N > n_total)):
        raise UserError(f"n_offset={n_offset} and n_total={n_total} must be multiples of {nb} holding the "
                        f"kernel's {N} outputs")
    if outs and (sum(int(n) for _, n in outs) > N or any(o + n > N for o, n in outs)):
        raise UserError(f"outs {outs} must lie within the kernel's N={N} outputs")
    if outs and (m != 1 or requant):
        raise UserError("several outputs (outs) are for the decode GEMV: pass m=1 and requant=False")
    if x_float and (m != 1 or act != "token"):
        raise UserError('x_float (the quantizer inside the linear) is for the decode GEMV: pass m=1, act="token"')


def linear_tensors(N, K, isa, wbits, *, group_size=None, has_bias=False, requant=False, m=None, name="linear",
                   wfmt=None, act="tensor", has_wmin=False, tables="ng", n_offset=0, n_total=None, outs=None,
                   x_float=False, a_bits=8, compact=False, zero_in_dot=False, grid=False):
    """TE description of the quantized linear; returns (args, info) with the stage names the schedule uses.

    ``wfmt="nibble"`` (W4A8 on x86, group size % 16 == 0): weights stay 4-bit in memory (layout.py) and are
    unpacked in registers; the zero points move into a correction with the activation row sums.
    Grouped weights (G > 1) and the nibble format take the register-tile form ``facc``: per group, the int32
    tile of one row is corrected, converted and FMA'd into a float tile with transposed [G, n] scales
    (``schedule.py``). Per-channel int8-format weights keep v1's form (the TE of v1 is unchanged, so tuning
    records still match).

    Linears sharing an input (q/k/v, gate/up) store their weights concatenated along N (tiled tables):
    ``n_offset``/``n_total`` make a kernel of the N outputs [n_offset, n_offset + N) of n_total concatenated
    ones (prefill: one call per linear, one weight copy); ``outs=((offset, N_j), ...)`` make one decode GEMV
    over all N write one output per linear; ``x_float`` takes the float input x f32[M, K] and act_shift u8[K]
    and quantizes it inside (v2 per token, ``a_bits``), instead of xq, act_scale, act_zero and xsum.
    ``compact`` (tiled tables): wscale/wmin stored float16 and wsum int16 (``COMPACT``), half the table bytes
    a GEMV reads; the caller guarantees the values are exact in 16 bits (results are then bit-identical).
    ``zero_in_dot`` (decode GEMV, nibbles, float offsets): the dot runs over xq - zp, so the kernel takes no wsum
    (a sixth of the bytes a W4 GEMV reads); the caller guarantees wzero = 0 (wsum[:, 1] == 8), then the results
    equal the wsum kernel's bit for bit (every term is an exact integer in float32).
    ``grid`` (with ``zero_in_dot``): the scales and offsets come as the integer-scale GEMM's power-of-two grid
    codes (``int_scales.pack_tables``: c8 u8, d16 i16, srow f32) instead of float tables, wscale = c * 2^e and
    wmin = d * 2^e exactly: the same floats (results bit for bit those of the float tables) from 3 bytes per group
    instead of float16's 4, and the tables prefill already holds."""
    check_v2_options(act, has_wmin, requant)
    gs, G = layout.check_linear_shape(N, K, group_size)
    wfmt = wfmt or layout.default_wfmt(isa, wbits)
    layout.check_wfmt(isa, wbits, wfmt)
    nb, kk, wdt = layout.linear_layout(isa, wbits, wfmt)
    decoded = wfmt == "nibble" and m != 1  # GEMM over nibbles: unpack panels to int8 tiles, then the int8 dot
    if wfmt == "nibble":
        layout.check_nibble(isa, wbits, gs)
        kk = 4 if decoded else 16
    o = layout.activation_offset(isa, wbits, wfmt)
    n_pad = -(-N // nb) * nb
    if tables not in ("ng", "tiled"):
        raise UserError(f'tables must be "ng" ([N, G] as in the checkpoint) or "tiled" (layout.tile_tables), '
                        f"got {tables!r}")
    _check_fusion(N, nb, m, act, tables, requant, n_offset, n_total, outs, x_float, compact, zero_in_dot, wfmt,
                  has_wmin, grid)
    n_all = n_total or n_pad  # channels held by the weight arrays
    M = _m_var(m)
    if x_float:
        x = te.placeholder((M, K), F32, name="x")
        act_shift = te.placeholder((K,), "uint8", name="act_shift")
        xq, scale, zero, xsum_q = _token_quantizer(x, act_shift, M, K, gs, G, a_bits)
        ap = _ActParams(M, act, scale, zero)
    else:
        xq = te.placeholder((M, K), "uint8", name="xq")
        ap = _ActParams(M, act)
    rows = n_pad if tables == "tiled" else N  # tiled tables are zero-padded to whole tiles
    tab = dict(n_total=n_all, offset=n_offset, compact=compact)
    if wfmt == "nibble":
        wpack_p = te.placeholder((n_all // nb, K // 16, 8 * nb), "uint8", name="wpack")
        # [:, 0] = sum_k u, [:, 1] = 8 + wzero
        wsum_p, wsum = _table("wsum", (n_pad, 2, G), "int32", tables, nb, n_pad, **tab)
    else:
        wpack_p = te.placeholder((n_all // nb, K // kk, nb, kk), wdt, name="wpack")
        wsum_p, wsum = _table("wsum", (n_pad, G), "int32", tables, nb, n_pad, **tab)
    wpack = _TileOffset(wpack_p, n_offset // nb) if n_offset else wpack_p
    if grid:  # c8 u8 and d16 i16 [tiles, G, nb], srow f32 [tiles, nb]
        c8 = te.placeholder((n_all // nb, G, nb), "uint8", name="c8")
        d16 = te.placeholder((n_all // nb, G, nb), "int16", name="d16")
        srow = te.placeholder((n_all // nb, nb), F32, name="srow")
        wscale = _GridTable(c8, srow, nb, n_pad, n_offset)
        wmin = _GridTable(d16, srow, nb, n_pad, n_offset)
        wscale_p, wmin_p = c8, d16
    else:
        wscale_p, wscale = _table("wscale", (rows, G), F32, tables, nb, n_pad, **tab)
        wmin_p, wmin = _table("wmin", (rows, G), F32, tables, nb, n_pad, **tab) if has_wmin else (None, None)
    wsum_args = [] if zero_in_dot else [wsum_p]
    if x_float:
        xsum = xsum_q if has_wmin else None
        args = [x, act_shift, wpack_p, *wsum_args, wscale_p] + ([wmin_p] if has_wmin else []) \
            + ([srow] if grid else [])
    else:
        xsum = te.placeholder((M, G), "int32", name="xsum") if has_wmin else None
        args = [xq, wpack_p, *wsum_args, wscale_p] + ([wmin_p] if has_wmin else []) + ([srow] if grid else []) \
            + [ap.scale, ap.zero] + ([xsum] if has_wmin else [])

    # No row tiling: a predicate on a ragged last row tile defeats tensorize, and a padded row tile defeats the
    # stage-pipeline analysis with a symbolic M. Register reuse comes from the n tiles instead (schedule.py).
    if wdt == "int16":  # x86 W8A8: int16 pmaddwd path
        xs = te.compute((M, K), lambda i, k: xq[i, k].astype("int16"), name="xs")
    elif o:  # ARM: signed bytes for sdot
        xs = te.compute((M, K), lambda i, k: (xq[i, k].astype("int32") - o).astype("int8"), name="xs")
    else:
        xs = None
    a = xq if xs is None else xs
    decoded_v2 = decoded and has_wmin
    if decoded:
        dot = _dot_int8(M, G, gs, n_pad, nb, kk, a, _unpacked_nibbles(wpack, n_pad, K, nb, 8 if decoded_v2 else 0))
    elif zero_in_dot:
        dot = _dot_nibble_zp(M, G, gs, n_pad, nb, a, ap, wpack)
    elif wfmt == "nibble":
        dot = _dot_nibble(M, G, gs, n_pad, nb, a, wpack)
    else:
        dot = _dot_int8(M, G, gs, n_pad, nb, kk, a, wpack)
    xqsum = _xqsum(M, G, gs, xq) if wfmt == "nibble" and not has_wmin else None
    grouped = G > 1 or wfmt == "nibble"
    stages = []
    if grouped:
        # per n panel: scales, zero-point corrections and offsets transposed to [G, n_pad], zero beyond N
        wscale_t = _transposed(wscale, G, n_pad, N, "wscale_t")
        wmin_t = _transposed(wmin, G, n_pad, N, "wmin_t") if has_wmin and not decoded_v2 else None
        if wfmt != "nibble":
            acc_f32 = _grouped_acc_int8(dot, wsum, ap, G, n_pad, o, _exact_in_f32(gs, wbits))
        elif decoded_v2:
            acc_f32, wmin_t = _decoded_nibble_v2(dot, wsum, wscale, wmin, ap, G, gs, n_pad)
        elif zero_in_dot:  # acc = sum (xq - zp) * (u - 8) = dot - 8 * xsum (wzero = 0), exact in float32
            acc_f32 = lambda i, n, g: (dot[i, g, n].astype(F32)  # noqa: E731
                                       - tirx.const(8.0, F32) * xsum[i, g].astype(F32))
        elif has_wmin:
            acc_f32 = _grouped_acc_nibble_xsum(dot, xsum, wsum, ap, G, gs, n_pad)
        else:
            acc_f32 = _grouped_acc_nibble(dot, xqsum, wsum, ap, G, gs, n_pad)
        stages = ["wscale_t"] + ([] if decoded_v2 or zero_in_dot else ["wsum_t"]) \
            + (["wsum0_t"] if wfmt == "nibble" and not zero_in_dot else []) + (["wmin_t"] if has_wmin else [])
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

    bias = None
    if has_bias:
        bias = te.placeholder((n_total or N,), F32, name="bias")
        args.append(bias)

    def y_of(i, n):  # (n + 0 is not written: the v1 TE stays structurally unchanged for its tuning records)
        return pre(i, n) * ap.s(i) + bias[n + n_offset if n_offset else n] if has_bias else pre(i, n) * ap.s(i)

    if outs:
        def output(j, off, nj):
            return te.compute((M, nj), lambda i, n: y_of(i, off + n), name=f"y{j}")

        ys = [output(j, int(off), int(nj)) for j, (off, nj) in enumerate(outs)]
        args += ys
        info = dict(nb=nb, kk=kk, n_pad=n_pad, G=G, gs=gs, has_xs=xs is not None, wfmt=wfmt, grouped=grouped,
                    signed_act=bool(o), decoded=decoded, has_xqsum=xqsum is not None,
                    has_wmin=has_wmin,
                    tables=tables, stages=stages, requant=False, isa=isa, wbits=wbits, m=m, N=N, K=K, name=name,
                    outs=len(ys), x_float=x_float, zero_in_dot=zero_in_dot)
        return args, info
    y = te.compute((M, N), y_of, name="y")
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
                signed_act=bool(o), decoded=decoded, has_xqsum=xqsum is not None,
                has_wmin=has_wmin, tables=tables,
                stages=stages, requant=requant, isa=isa, wbits=wbits, m=m, N=N, K=K, name=name, outs=0,
                x_float=x_float, zero_in_dot=zero_in_dot)
    return args, info


def _fusion_suffix(n_offset=0, n_total=None, outs=None, x_float=False, a_bits=8, compact=False,
                   zero_in_dot=False, grid=False) -> str:
    """The part of a kernel's name that says which slice / outputs / input form / table width it has."""
    return ((f"_of{n_offset}of{n_total}" if n_total else "") + ("_o" + "_".join(str(int(n)) for _, n in outs)
                                                                  if outs else "")
            + (f"_xf{a_bits}" if x_float else "") + ("_c16" if compact else "") + ("_zd" if zero_in_dot else "")
            + ("_grid" if grid else ""))


def _linear_func(wbits, N, K, target, *, schedule=True, **options):
    """The linear kernel as a PrimFunc named after its options: hand-scheduled (``schedule_linear``), or with
    ``schedule=False`` the unscheduled TE the hand schedule starts from, which is what tuning records are keyed by
    (``agile_tvm.tune.records.tuned_func``)."""
    from .schedule import schedule_linear

    func, info = linear_te(wbits, N, K, target, **options)
    return schedule_linear(func, info) if schedule else func


def linear_te(wbits, N, K, target, *, group_size=None, has_bias=False, requant=False, m=None, wfmt=None,
              act="tensor", has_wmin=False, tables="ng", **fusion):
    """(the unscheduled kernel PrimFunc named after its options, the ``info`` its schedules read): what
    ``_linear_func`` schedules by hand and ``agile_tvm.tune.space.hand_space`` offers MetaSchedule."""
    from agile_tvm.targets import get_target, isa_of

    check_v2_options(act, has_wmin, requant)
    tgt = get_target(target)
    isa = isa_of(tgt)
    gs, _ = layout.check_linear_shape(N, K, group_size)
    wfmt = wfmt or layout.default_wfmt(isa, wbits)
    name = (f"w{wbits}a8_linear_n{N}_k{K}" + ("" if gs == K else f"_g{gs}") + ("_bias" if has_bias else "")
            + ("_requant" if requant else "") + ("_tok" if act == "token" else "") + ("_wmin" if has_wmin else "")
            + ("" if m is None else f"_m{m}") + ("_u4" if wfmt == "nibble" else "")
            + ("_s8" if layout.signed_x86_w8(isa, wbits, wfmt) else "") + ("_tt" if tables == "tiled" else "")
            + _fusion_suffix(**fusion))
    args, info = linear_tensors(N, K, isa, wbits, group_size=group_size, has_bias=has_bias, requant=requant, m=m,
                                name=name, wfmt=wfmt, act=act, has_wmin=has_wmin, tables=tables, **fusion)
    return te.create_prim_func(args).with_attr("global_symbol", name), info


def w4a8_linear_func(N, K, target, *, group_size=None, has_bias=False, requant=False, m=None, wfmt=None,
                     act="tensor", has_wmin=False, tables="ng", **fusion):
    """W4A8 linear for ``target`` (scheduled PrimFunc, symbolic M unless ``m`` is given). See module doc.

    ``wfmt="nibble"``: weights stay 4-bit in memory (pack with the same ``wfmt``), x86 only; half the weight
    traffic, which is what decode (M = 1) is bound by. ``act="token"`` / ``has_wmin=True``: checkpoint v2
    (per-row activation scale/zero f32[M]/i32[M]; float weight offsets wmin f32[N, G] with xsum i32[M, G]).
    ``tables="tiled"``: wsum/wscale/wmin tile-major (``layout.tile_tables``). ``fusion``: n_offset, n_total,
    outs, x_float, a_bits (``linear_tensors``)."""
    return _linear_func(4, N, K, target, group_size=group_size, has_bias=has_bias, requant=requant, m=m, wfmt=wfmt,
                        act=act, has_wmin=has_wmin, tables=tables, **fusion)


def w8a8_linear_func(N, K, target, *, group_size=None, has_bias=False, requant=False, m=None, act="tensor",
                     has_wmin=False, wfmt=None, tables="ng", **fusion):
    """W8A8 linear for ``target`` (int16 pmaddwd on x86, sdot on ARM). See module doc and ``w4a8_linear_func``.

    ``wfmt="int8"`` on x86 AVX2: int8 weight tiles (half the bytes of int16; pack with the same ``wfmt``, needs
    |q - wzero| <= 127) and signed activations xq - 128, multiplied with ``vpsignb`` + ``vpmaddubsw``."""
    return _linear_func(8, N, K, target, group_size=group_size, has_bias=has_bias, requant=requant, m=m, act=act,
                        has_wmin=has_wmin, wfmt=wfmt, tables=tables, **fusion)
