"""Hand-written default schedules of the linear kernels, one per ISA family.

GEMM (symbolic M): ``parallel(n tiles of NT*nb outputs) > rows > groups > K steps > [NT tiles] > tensorized``.
The packed weight panel of one n tile (NT*nb*K bytes, 13.5 KB for K = 576 on AVX2) stays in L1 while all M rows
stream through it, NT accumulator registers share each broadcast of the activations, and the epilogue
(zero-point correction, scales, bias, requantize) runs on the row of the tile right after its accumulation, so
int32 accumulators never reach memory. Rows are not tiled: a ragged last row tile would need a predicate, which
tensorize cannot match, and padding the rows defeats TVM's region analysis with a symbolic M.
On x86 with 4-bit weights and K steps of 16, four ``pmaddubsw`` results are summed in int16 before one
``pmaddwd`` (exact: |w| <= 15), which measured 236-247 GOP/s per Zen 3 core, near the multiply-port bound.
GEMV (``m=1``): the same nest with up to 8 tiles in flight (weight-load bound).
Without a dot-product instruction (Cortex-A72) the tiles use NEON smull + saddlp + addp.
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


def _gemv_nt(nblocks: int) -> int:
    """Tiles in flight for the GEMV: as many independent accumulators as fit the registers (up to 8: the GEMV
    is bound by weight loads, and 8 streams measured 1.4x faster than 3), with an even number of parallel chunks
    when possible so two threads get equal work."""
    divisors = [nt for nt in range(8, 3, -1) if nblocks % nt == 0]
    even = [nt for nt in divisors if (nblocks // nt) % 2 == 0]
    return (even or divisors or [_pick_nt(nblocks, 4)])[0]


def _intrinsic(info) -> str | None:
    key = (info["isa"], 16 if info["kk"] == 2 else 8)
    if key in intrin.DOT_INTRINSICS:
        intrin.register_all()
        return intrin.DOT_INTRINSICS[key][0]
    return None


def schedule_linear(func, info, *, nt: int | None = None):
    """Apply the default schedule for ``info['isa']`` to a linear PrimFunc from ``linear.linear_tensors``."""
    nb, kk = info["nb"], info["kk"]
    gemv = info["m"] == 1
    nblocks = info["n_pad"] // nb
    if nt is None:
        nt = _gemv_nt(nblocks) if gemv else _gemm_nt(nblocks, nb * info["K"] * (2 if kk == 2 else 1))
    sch = s_tir.Schedule(func)
    if info.get("wfmt") == "nibble":
        return _schedule_nibble(sch, info, nt)
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
    out = sch.get_sblock(out_name)
    if info["has_gsum"]:
        sch.reverse_compute_at(sch.get_sblock("gsum"), mo)
    sch.reverse_compute_at(out, mo)
    if info["has_xs"]:
        sch.compute_at(sch.get_sblock("xs"), mo)

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
    return mark_scheduled(sch.mod["main"])


def _schedule_nibble(sch, info, nt):
    """Consumer-driven variant: the epilogue's (n tile, row) loops host the row sums and the accumulation."""
    nb = info["nb"]
    out_name = "yq" if info["requant"] else "y"
    if info["requant"]:
        sch.compute_inline(sch.get_sblock("y"))
    out = sch.get_sblock(out_name)
    i, n = sch.get_loops(out)
    no, nr = sch.split(n, [None, nt * nb])
    sch.reorder(no, i, nr)
    sch.parallel(no)
    if info["has_gsum"]:
        gsum = sch.get_sblock("gsum")
        sch.compute_at(gsum, i, preserve_unit_loops=True)
    dot = sch.get_sblock("dot")
    sch.compute_at(dot, i, preserve_unit_loops=True)
    sch.compute_at(sch.get_sblock("xsum"), i, preserve_unit_loops=True)
    g, n2, k = sch.get_loops(dot)[-3:]
    noi, ni = sch.split(n2, [None, nb])
    ko, ki = sch.split(k, [None, 16])
    sch.reorder(g, ko, noi, ni, ki)
    sch.decompose_reduction(dot, ko)
    intrin.register_all()
    sch.tensorize(ni, intrin.NIBBLE_INTRINSICS[info["isa"]][0])
    sch.unroll(noi)
    return mark_scheduled(sch.mod["main"])
