"""Hand-written default schedules of the linear kernels, one per ISA family.

GEMM (symbolic M): ``parallel(n tiles of NT*nb outputs) > rows > groups > K steps > [NT tiles] > tensorized``.
The packed weight panel of one n tile (NT*nb*K bytes, 13.5 KB for K = 576 on AVX2) stays in L1 while all M rows
stream through it, NT accumulator registers share each broadcast of the activations, and the epilogue
(zero-point correction, scales, bias, requantize) runs on the row of the tile right after its accumulation, so
int32 accumulators never reach memory. Rows are not tiled: a ragged last row tile would need a predicate, which
tensorize cannot match, and padding the rows defeats TVM's region analysis with a symbolic M.
On x86 with 4-bit weights and K steps of 16, four ``pmaddubsw`` results are summed in int16 before one
``pmaddwd`` (exact: |w| <= 15), which measured 236-247 GOP/s per Zen 3 core, near the multiply-port bound.
GEMV (``m=1``): the same nest with up to 8 tiles in flight (weight-load bound); nibble weights one tile at a time
(one sequential weight stream per thread, ``_gemv_nt``).
Without a dot-product instruction (Cortex-A72) the tiles use NEON smull + saddlp + addp.
Grouped weights (G > 1) and the nibble format: ``parallel(n panels) > [K chunks] > rows > groups > [int32 tile] >
[float tile += its correction, conversion and scales]``, both tiles in registers (``_schedule_grouped``).
"""

from __future__ import annotations

from tvm import s_tir

from . import intrin


def mark_scheduled(func):
    """Mark a PrimFunc as scheduled so Relax/dlight leave it alone. TVM 0.27 reads ``tirx.is_scheduled``; the
    older ``tir.is_scheduled`` spelling is set too, for code that still checks it."""
    return func.with_attr("tirx.is_scheduled", True).with_attr("tir.is_scheduled", True)


def _pick_nt(nblocks: int, want: int) -> int:
    for nt in range(min(want, nblocks), 0, -1):
        if nblocks % nt == 0:
            return nt
    return 1


def _gemm_nt(nblocks: int, tile_bytes: int, l1_budget: int = 32 * 1024) -> int:
    """Tiles per GEMM panel: as many as divide the tile count (<= 4) while the weight panel stays in L1
    (measured on Zen 3, K = 1536: 2 tiles 228 GOP/s, 3 tiles 218; K = 576: 4 tiles 244, 3 tiles 240)."""
    fits = [nt for nt in (4, 3, 2) if nblocks % nt == 0 and nt * tile_bytes <= l1_budget]
    return fits[0] if fits else 1


def _grouped_tiling(info, l1_budget: int = 28 * 1024) -> tuple[int, int]:
    """(tiles per panel, K chunks) of the grouped GEMM: 4 tiles when they divide the tile count (the int32 and
    float tiles of 4 fill 8 of AVX2's 16 registers), and the groups split into as few chunks as keep one chunk's
    weights plus its [G, n] tables in L1. Measured 1536 -> 576 g32 on Zen 3: 2 tiles, no chunks 1.32x the
    per-channel time; 4 tiles, 3 chunks of 512 k 1.21-1.24x; chunking K = 576 gained nothing."""
    nb, G, gs = info["nb"], info["G"], info["gs"]
    nblocks = info["n_pad"] // nb
    nt = next(t for t in (4, 3, 2, 1) if nblocks % t == 0)
    wbytes = 2 if info["kk"] == 2 else 1  # nibbles are unpacked to int8 tiles per panel (``decoded``)
    per_group = nt * nb * (gs * wbytes + 4 * len(info["stages"]))
    chunks = next((c for c in range(1, G + 1) if G % c == 0 and per_group * (G // c) <= l1_budget), G)
    return nt, chunks


def _gemv_nt(nblocks: int, info: dict | None = None) -> int:
    """Tiles in flight for the GEMV: as many independent accumulators as fit the registers (up to 8: the GEMV
    is bound by weight loads, and 8 streams measured 1.4x faster than 3), with an even number of parallel chunks
    when possible so two threads get equal work.

    Nibble weights take one tile at a time: a tile's codes are contiguous over K and the tiles follow each other,
    so each thread then reads one sequential stream instead of 8 interleaved ones, which the hardware prefetcher
    follows. Measured on SmolLM2's decode (Zen 3, 2 threads, interleaved runs, bit-identical tokens): 143-174 tok/s
    against 103-155 with 8 tiles; 2 tiles 142-150; the INT8 head gained nothing from it and keeps 8."""
    if info is not None and info.get("wfmt") == "nibble":
        return 1
    divisors = [nt for nt in range(8, 3, -1) if nblocks % nt == 0]
    even = [nt for nt in divisors if (nblocks // nt) % 2 == 0]
    return (even or divisors or [_pick_nt(nblocks, 4)])[0]


def _intrinsic(info) -> str | None:
    if info.get("signed_act") and info["isa"] in intrin.SIGNED_X86_INTRINSICS:  # x86 W8A8 in int8 tiles
        intrin.register_all()
        return intrin.SIGNED_X86_INTRINSICS[info["isa"]][0]
    key = (info["isa"], 16 if info["kk"] == 2 else 8)
    if key in intrin.DOT_INTRINSICS:
        intrin.register_all()
        return intrin.DOT_INTRINSICS[key][0]
    return None


def schedule_linear(func, info, *, nt: int | None = None, chunks: int | None = None, chunked: bool | None = None,
                    sch=None):
    """Apply the default schedule for ``info['isa']`` to a linear PrimFunc from ``linear.linear_tensors``.

    The free parameters (None: the hand choice; ``agile_tvm.tune.space.hand_space`` offers the others to
    MetaSchedule): ``nt`` tiles per panel; for grouped weights ``chunks`` K chunks and ``chunked``, the form with
    the groups split into chunks and the output pass after the panel (with one chunk too), or the output per row.
    ``sch``: schedule into this (traced) Schedule of the unscheduled function instead of a new one of ``func``."""
    nb, kk = info["nb"], info["kk"]
    gemv = info["m"] == 1
    nblocks = info["n_pad"] // nb
    sch = sch if sch is not None else s_tir.Schedule(func)
    if info["grouped"]:
        nt_g, chunks_g = (_gemv_nt(nblocks, info), 1) if gemv else _grouped_tiling(info)
        return _schedule_grouped(sch, info, nt or nt_g, chunks or chunks_g, chunked)
    if nt is None:
        nt = _gemv_nt(nblocks) if gemv else _gemm_nt(nblocks, nb * info["K"] * (2 if kk == 2 else 1))
    dot = sch.get_sblock("dot")
    mo, g, n, k = sch.get_loops(dot)
    no, noi, ni = sch.split(n, [None, nt, nb])
    ko, ki = sch.split(k, [None, kk])
    sch.reorder(no, mo, g, ko, noi, ni, ki)
    sch.parallel(no)

    # epilogue on the tile, right after its accumulation
    out_name = "yq" if info["requant"] else "y"
    if info["requant"]:
        sch.compute_inline(sch.get_sblock("y"))
    if info["outs"] or info["x_float"]:
        _schedule_outs(sch, info)
    else:
        sch.reverse_compute_at(sch.get_sblock(out_name), mo)
    _schedule_quantizer(sch, info)
    _place_xs(sch, info, mo)

    _tile_dot(sch, dot, info, ko, noi, ni, ki)
    return mark_scheduled(sch.mod["main"])


def _vectorize_last(sch, block, extent: int) -> None:
    lanes = next((v for v in (8, 4) if extent % v == 0), None)
    if lanes:
        sch.vectorize(sch.split(sch.get_loops(block)[-1], [None, lanes])[1])


def _schedule_outs(sch, info) -> None:
    """The decode GEMV's outputs (several with ``outs``; also with ``x_float``, whose row scale is produced before
    the parallel loop): written after it from the float row (a few hundred vector stores), vectorized."""
    for name in [f"y{j}" for j in range(info["outs"])] or ["y"]:
        block = sch.get_sblock(name)
        _vectorize_last(sch, block, int(sch.get(block).iter_vars[-1].dom.extent))


def _vectorized_reduction(sch, name: str, lanes: int = 8) -> None:
    """A row reduction (max over K, the sum of a group's codes) as `lanes` vector partials (rfactor), then a short
    scalar reduction of the partials: the scalar loop was a chain of K dependent max/add ops, a few us of the
    decode GEMV's serial prologue for K = 1536. Max and integer sums are exact in any order, so the results are
    unchanged."""
    block = sch.get_sblock(name)
    red = sch.get_loops(block)[-1]
    if int(sch.get(red).extent) % lanes:
        return
    _, ki = sch.split(red, [None, lanes])
    partial = sch.rfactor(ki, factor_axis=len(sch.get(block).iter_vars) - 1)
    sch.vectorize(sch.get_loops(partial)[-1])  # the partials' lanes (rfactor keeps them innermost)


def _schedule_quantizer(sch, info) -> None:
    """``x_float``: the row's quantizer runs once, before the parallel loop; its elementwise passes and its
    reductions vectorized."""
    if not info["x_float"]:
        return
    for name in ("xv", "xq"):
        _vectorize_last(sch, sch.get_sblock(name), info["K"])
    for name in ("xhi", "xnlo") + (("xqsum_q",) if info["has_wmin"] else ()):  # xsum feeds only the offsets
        _vectorized_reduction(sch, name)


def _place_xs(sch, info, row_loop):
    """The converted activations xs (int16 / signed bytes): per row inside each n panel for GEMM (the row is in
    L1 anyway); once, before the parallel loop, for GEMV (one row converted once instead of once per panel: the
    LM head has 768 panels)."""
    if not info["has_xs"]:
        return
    xs = sch.get_sblock("xs")
    if info["m"] == 1:
        k = sch.get_loops(xs)[-1]
        if info["K"] % 32 == 0:
            sch.vectorize(sch.split(k, [None, 32])[1])
        return
    sch.compute_at(xs, row_loop)


def _tile_dot(sch, dot, info, ko, noi, ni, ki):
    """Tensorize the [nb, kk] tiles of ``dot`` (loops ko > noi > ni > ki); on x86 with 4-bit weights and groups
    of 16k, four k tiles per step; without a dot-product instruction, vectorize over the nb lanes."""
    name = _intrinsic(info)
    x4 = intrin.DOT_X4_INTRINSICS.get(info["isa"]) if info["wbits"] == 4 else None
    if name is not None and x4 is not None and info["gs"] % 16 == 0:
        # 4 k-tiles per step: split ko again and tensorize [nb, 16] with int16 partial sums
        ko, kb = sch.split(ko, [None, 4])
        sch.reorder(ko, noi, ni, kb, ki)
        sch.fuse(kb, ki)
        name = x4[0]
    if name is None:  # no dot-product instruction: vectorize over the nb output lanes, k unrolled inside
        sch.reorder(ki, ni)
        sch.vectorize(ni)
        sch.unroll(ki)
    init = sch.decompose_reduction(dot, ko)
    if name is not None:
        sch.tensorize(ni, name)
    sch.unroll(noi)
    sch.vectorize(sch.get_loops(init)[-1])


def _schedule_grouped(sch, info, nt, chunks, chunked=None):
    """Grouped weights (and the nibble format): parallel(n panels) > rows > groups > [the group's int32 tile,
    tensorized] > [correct, convert and FMA it into the row's float tile]. Both tiles are nt*nb values, small
    enough for registers, so nothing per group reaches memory (the old form stored acc[m, n, g] and summed the
    groups in a scalar loop: 1.7-7x the per-channel time at M = 512; now W4A8 g32 1.13-1.4x, v2 with per-token
    zero points and float offsets 1.3-1.55x: per group and 8 outputs, 3-4 vector ops of epilogue against the
    ~20 of the group's dot product, the floor of this form). The [G, n] scale/offset/row-sum tables of a panel
    (of a K chunk, when the panel's weights overflow L1) are transposed once, before its rows, so the per-group
    epilogue reads them as vectors; float weight offsets add a second FMA per group (``part``). GEMV reads the
    [N, G] tensors in place instead."""
    nb, kk = info["nb"], info["kk"]
    chunked = chunks > 1 if chunked is None else chunked
    out_name = "yq" if info["requant"] else "y"
    if info["requant"]:
        sch.compute_inline(sch.get_sblock("y"))
    facc = sch.get_sblock("facc")
    i, n, gr, *part = sch.get_loops(facc)  # part: the (scale, offset) pair of terms per group with wmin
    no, noi, ni = sch.split(n, [None, nt, nb])
    if chunked:
        gro, gr = sch.split(gr, [chunks, None])
        sch.reorder(no, gro, i, gr, noi, *part, ni)
    else:
        sch.reorder(no, i, gr, noi, *part, ni)
    if part:
        sch.unroll(part[0])
    sch.parallel(no)
    if info["outs"] or info["x_float"]:
        _schedule_outs(sch, info)
    else:
        sch.reverse_compute_at(sch.get_sblock(out_name), no if chunked else i)
    _schedule_quantizer(sch, info)
    for stage in info["stages"]:  # GEMV: one row cannot amortize a copy; read the tables in place (tiled: vectors)
        if info["m"] == 1:
            sch.compute_inline(sch.get_sblock(stage))
        else:
            sch.compute_at(sch.get_sblock(stage), gro if chunked else no)
    dot = sch.get_sblock("dot")
    sch.compute_at(dot, gr)
    _place_xs(sch, info, i)
    if info["has_xqsum"]:
        sch.compute_at(sch.get_sblock("xqsum"), i)
    if info["decoded"]:  # the panel's (chunk's) nibbles unpacked once into int8 tiles, before its rows
        wdec = sch.get_sblock("wdec")
        sch.compute_at(wdec, gro if chunked else no)
        sch.vectorize(sch.fuse(*sch.get_loops(wdec)[-2:]))
    dn, dk = sch.get_loops(dot)[-2:]
    dnoi, dni = sch.split(dn, [None, nb])
    ko, ki = sch.split(dk, [None, kk])
    sch.reorder(ko, dnoi, dni, ki)
    if info["wfmt"] == "nibble" and not info["decoded"]:  # 16 k of 4-bit codes per step, unpacked in registers
        sch.decompose_reduction(dot, ko)
        intrin.register_all()
        table = intrin.NIBBLE_ZP_INTRINSICS if info.get("zero_in_dot") else intrin.NIBBLE_INTRINSICS
        sch.tensorize(dni, table[info["isa"]][0])
        sch.unroll(dnoi)
    else:
        _tile_dot(sch, dot, info, ko, dnoi, dni, ki)
    sch.unroll(noi)
    sch.vectorize(ni)
    finit = sch.decompose_reduction(facc, gro if chunked else gr)
    sch.vectorize(sch.get_loops(finit)[-1])
    if chunked and info["N"] % nb == 0 and not info["outs"]:  # the output pass over the panel (no ragged lanes)
        yl = sch.get_loops(sch.get_sblock(out_name))[-1]
        sch.vectorize(sch.split(yl, [None, nb])[1])
    return mark_scheduled(sch.mod["main"])
