"""Weight layouts of the linear kernels and the numpy packing that produces them (run once, at export time).

A packed weight is a 4-D tile array ``wpack[N_pad / nb, K / kk, nb, kk]``: one tile is the ``nb x kk`` block that a
single SIMD dot-product instruction consumes (see ``intrin.py``). Packing is not optional: tensorizing an unpacked
``[N, K]`` weight is accepted by TVM and silently computes wrong results (notes, tvm-0.27-findings).

The packed values are the zero-corrected codes ``w' = q - wzero`` (4-bit: [-15, 15]; 8-bit: int16 on x86, int8 on
ARM), so the kernel computes ``dot = sum_k xs[m, k] * w'[n, k]`` and recovers the contract's accumulator with one
precomputed row sum: ``acc = dot + (o - zp) * wsum[n, g]`` where ``xs = xq - o`` is the activation as the ISA wants
it (o = 0 on x86: pmaddubsw takes unsigned bytes; o = 128 on ARM: sdot takes signed bytes, and for x86 W8A8 in
int8 tiles, ``wfmt="int8"``: vpsignb moves the activation's sign onto the weight).
N is zero-padded to a multiple of ``nb`` (the padded outputs are computed and never stored); K must be a multiple
of ``kk`` and of 4. On x86 the W4A8 schedule consumes four consecutive k tiles per step when the group size is a
multiple of 16 (same layout).

``wfmt="nibble"`` (W4A8, x86) instead keeps the codes 4-bit: u = q + 8 in [0, 15], per (n tile, 16 k) the four
[nb, 4] tiles as 8*nb bytes, tiles 0/1 in the low nibbles of bytes [0, 4nb) / [4nb, 8nb) and tiles 2/3 in the high
nibbles; ``wsum`` then holds (sum_k u, 8 + wzero) and the zero point is corrected with activation row sums.
"""

from __future__ import annotations

import numpy as np

from agile_tvm.errors import UserError

from . import reference


def check_wfmt(isa: str, wbits: int, wfmt: str) -> None:
    """The weight formats a kernel accepts: "int8" tiles everywhere for 4-bit weights (and on ARM for 8-bit);
    on x86, 8-bit weights default to "int16" tiles and take "int8" (signed activations, ``vpsignb``) on AVX2."""
    ok = {4: ("int8", "nibble"), 8: ("int8", "int16")}.get(wbits, ())
    if wfmt not in ok:
        raise UserError(f"weight format {wfmt!r} does not exist for {wbits}-bit weights (choose one of {ok})")
    if wbits == 8 and wfmt == "int16" and isa not in ("avx512", "avx2", "generic"):
        raise UserError(f"the int16 weight format is the x86 W8A8 path; {isa} uses wfmt='int8'")
    if wbits == 8 and wfmt == "int8" and isa not in ("avx2", "sdot", "neon"):
        raise UserError(f"8-bit weights in int8 tiles need AVX2's vpsignb or an ARM target, not {isa}: "
                        "use wfmt='int16'")


def default_wfmt(isa: str, wbits: int) -> str:
    """The weight format of a kernel built without ``wfmt``: int16 tiles for W8A8 on x86, int8 tiles otherwise."""
    return "int16" if wbits == 8 and isa in ("avx512", "avx2", "generic") else "int8"


def signed_x86_w8(isa: str, wbits: int, wfmt: str) -> bool:
    """True for W8A8 on x86 in int8 tiles: activations become signed bytes xq - 128 and each product is made
    with ``vpsignb`` + ``vpmaddubsw`` (|xq - 128| <= 128, |w'| <= 127: a pair sum <= 32512 never saturates)."""
    return wbits == 8 and wfmt == "int8" and isa in ("avx512", "avx2", "generic")


def linear_layout(isa: str, wbits: int, wfmt: str | None = None) -> tuple[int, int, str]:
    """(nb, kk, dtype) of the packed weight tile for an ISA family and stored weight width (4 or 8 bits)."""
    x86_wide = wbits == 8 and (wfmt or default_wfmt(isa, wbits)) == "int16"  # int16 pmaddwd tiles
    if isa == "avx512":
        return (16, 2, "int16") if x86_wide else (16, 4, "int8")
    if isa in ("avx2", "generic"):
        return (8, 2, "int16") if x86_wide else (8, 4, "int8")
    if isa in ("sdot", "neon"):
        return 4, 4, "int8"
    raise UserError(f"unknown ISA family {isa!r}")


def activation_offset(isa: str, wbits: int = 4, wfmt: str | None = None) -> int:
    """o such that the kernel multiplies xs = xq - o (0 on x86: unsigned bytes; 128 on ARM and for x86 W8A8 in
    int8 tiles: signed bytes)."""
    signed = isa in ("sdot", "neon") or signed_x86_w8(isa, wbits, wfmt or default_wfmt(isa, wbits))
    return 128 if signed else 0


def check_linear_shape(N: int, K: int, group_size: int | None) -> tuple[int, int]:
    """Validate (N, K, group size) for the kernels; return (group size, number of groups)."""
    if N <= 0 or K <= 0:
        raise UserError(f"linear shape N={N}, K={K} must be positive")
    if K % 4:
        raise UserError(f"K={K} is not a multiple of 4: pad the input features of the checkpoint to a multiple of 4")
    gs = K if group_size in (None, -1, 0) else int(group_size)
    if gs % 4 or K % gs:
        raise UserError(f"group size {gs} must divide K={K} and be a multiple of 4")
    return gs, K // gs


def _check_groups(N: int, K: int, G: int) -> None:
    if G <= 0 or K % G:
        raise UserError(f"wzero has {G} groups, which does not divide K={K}")
    check_linear_shape(N, K, K // G)


def _tile(w: np.ndarray, nb: int, kk: int, dtype: str) -> np.ndarray:
    N, K = w.shape
    n_pad = -(-N // nb) * nb
    wp = np.zeros((n_pad, K), dtype=np.int32)
    wp[:N] = w
    return np.ascontiguousarray(wp.reshape(n_pad // nb, nb, K // kk, kk).transpose(0, 2, 1, 3)).astype(dtype)


def _pack_corrected(w: np.ndarray, G: int, isa: str, wbits: int, wfmt: str | None = None) -> dict[str, np.ndarray]:
    nb, kk, dtype = linear_layout(isa, wbits, wfmt)
    N, K = w.shape
    info = np.iinfo(dtype)
    lo = -127 if signed_x86_w8(isa, wbits, wfmt or default_wfmt(isa, wbits)) else info.min  # vpsignb: no -128
    if w.min() < lo or w.max() > info.max:
        raise UserError(
            f"weight codes minus zero point span [{w.min()}, {w.max()}], outside [{lo}, {info.max}] needed by the "
            f"{isa} kernel: use symmetric 8-bit weights (wzero = 0)" + (" or wfmt='int16'" if lo == -127 else "")
        )
    n_pad = -(-N // nb) * nb
    wsum = np.zeros((n_pad, G), dtype=np.int32)
    wsum[:N] = w.reshape(N, G, K // G).sum(axis=2, dtype=np.int64).astype(np.int32)
    return {"wpack": _tile(w, nb, kk, dtype), "wsum": wsum}


def check_nibble(isa: str, wbits: int, gs: int) -> None:
    """The nibble format exists for W4A8 on x86 with group size a multiple of 16."""
    if wbits != 4 or isa not in ("avx2", "avx512"):
        raise UserError(f"the nibble weight format needs W4A8 on an x86 AVX2/AVX-512 target (got w{wbits}, {isa})")
    if gs % 16:
        raise UserError(f"the nibble weight format needs a group size that is a multiple of 16, got {gs}")


def _pack_nibbles(q: np.ndarray, wzero: np.ndarray, isa: str) -> dict[str, np.ndarray]:
    """u = q + 8 in [0, 15]; per (n tile, 16 k): four [nb, 4] tiles, tiles 0/1 in the low nibbles of bytes
    [0, 4nb) / [4nb, 8nb), tiles 2/3 in the high nibbles of the same bytes."""
    nb = linear_layout(isa, 4)[0]
    N, K = q.shape
    G = wzero.shape[1]
    gs = K // G
    check_nibble(isa, 4, gs)
    n_pad = -(-N // nb) * nb
    u = np.zeros((n_pad, K), np.uint8)
    u[:N] = (q + 8).astype(np.uint8)
    t = u.reshape(n_pad // nb, nb, K // 16, 4, 4).transpose(0, 2, 3, 1, 4)  # [NB, KB, tile s, nb, 4]
    t = t.reshape(n_pad // nb, K // 16, 2, 2, 4 * nb)  # s = 2 * hi + part
    wpack = np.ascontiguousarray((t[:, :, 0] | (t[:, :, 1] << 4)).reshape(n_pad // nb, K // 16, 8 * nb))
    wsum = np.zeros((n_pad, 2, G), np.int32)
    wsum[:N, 0] = u[:N].reshape(N, G, gs).sum(axis=2, dtype=np.int64)
    wsum[:, 1] = 8
    wsum[:N, 1] = 8 + wzero.astype(np.int32)
    return {"wpack": wpack, "wsum": wsum}


def tile_tables(table, target, wbits: int = 4, wfmt: str | None = None) -> np.ndarray:
    """A per-output-channel table [N or n_pad, ...] (wscale, wmin [N, G]; wsum [n_pad, G] or [n_pad, 2, G]) in the
    kernels' ``tables="tiled"`` layout [n_pad / nb, ..., nb], zero-padded to whole tiles of nb channels: each
    tile's values of one group are contiguous, so the GEMV reads them as vectors (run once, at export)."""
    table = np.asarray(table)
    isa = _isa(target)
    nb = linear_layout(isa, wbits, wfmt or default_wfmt(isa, wbits))[0]
    n_pad = -(-table.shape[0] // nb) * nb
    padded = np.zeros((n_pad, *table.shape[1:]), table.dtype)
    padded[: table.shape[0]] = table
    tiles = padded.reshape(n_pad // nb, nb, *table.shape[1:])
    return np.ascontiguousarray(np.moveaxis(tiles, 1, -1))


def _isa(target) -> str:
    from agile_tvm.targets import isa_of

    return target if target in ("avx512", "avx2", "sdot", "neon", "generic") else isa_of(target)


def pack_w4a8_weights(qweight, wzero, target, wfmt: str = "int8") -> dict[str, np.ndarray]:
    """Checkpoint 4-bit ``qweight`` u8[N, K/2] + ``wzero`` i8[N, G] -> {"wpack", "wsum"} for ``target``.

    ``wfmt="int8"``: tiles of w' = q - wzero (one byte per weight); ``"nibble"``: 4-bit codes u = q + 8, two per
    byte, for the x86 kernels that unpack in registers (wsum then holds [sum_k u, 8 + wzero])."""
    qweight = np.asarray(qweight)
    wzero = np.asarray(wzero)
    if qweight.dtype != np.uint8 or qweight.ndim != 2:
        raise UserError(f"4-bit qweight must be uint8 [N, K/2], got {qweight.dtype} {qweight.shape}")
    q = reference.unpack_int4(qweight).astype(np.int32)
    N, K = q.shape
    if wzero.ndim != 2 or wzero.shape[0] != N:
        raise UserError(f"wzero must be int8 [N={N}, G], got {wzero.shape}")
    G = wzero.shape[1]
    _check_groups(N, K, G)
    if wfmt == "nibble":
        return _pack_nibbles(q, wzero, _isa(target))
    w = q - np.repeat(wzero.astype(np.int32), K // G, axis=1)
    return _pack_corrected(w, G, _isa(target), 4)


def pack_w8a8_weights(qweight, wzero, target, wfmt: str | None = None) -> dict[str, np.ndarray]:
    """Checkpoint 8-bit ``qweight`` i8[N, K] + ``wzero`` i8[N, G] -> {"wpack", "wsum"} for ``target``.

    ``wfmt`` (default per ISA, ``default_wfmt``): "int16" tiles (x86, any zero point) or "int8" tiles (ARM; x86
    AVX2 with |q - wzero| <= 127, half the bytes: what a bandwidth-bound GEMV such as the LM head wants)."""
    qweight = np.asarray(qweight)
    wzero = np.asarray(wzero)
    if qweight.dtype != np.int8 or qweight.ndim != 2:
        raise UserError(f"8-bit qweight must be int8 [N, K], got {qweight.dtype} {qweight.shape}")
    N, K = qweight.shape
    if wzero.ndim != 2 or wzero.shape[0] != N:
        raise UserError(f"wzero must be int8 [N={N}, G], got {wzero.shape}")
    G = wzero.shape[1]
    _check_groups(N, K, G)
    w = qweight.astype(np.int32) - np.repeat(wzero.astype(np.int32), K // G, axis=1)
    isa = _isa(target)
    wfmt = wfmt or default_wfmt(isa, 8)
    check_wfmt(isa, 8, wfmt)
    return _pack_corrected(w, G, isa, 8, wfmt)


def pack_w4a4_weights(qweight, wzero, target) -> dict[str, np.ndarray]:
    """4-bit ``qweight`` u8[N, K/2] + per-channel ``wzero`` i8[N, 1] -> {"wpack" u16[T, K, L], "wsum" i32[T*2L, 2]}.

    Layout in ``w4a4.py``: lane l of tile t holds u[2l] | u[2l+1] << 8 with u = q + 8; wsum[:, 0] = sum_k u,
    wsum[:, 1] = 8 + wzero.
    """
    from .w4a4 import w4a4_lanes

    qweight = np.asarray(qweight)
    wzero = np.asarray(wzero)
    if qweight.dtype != np.uint8 or qweight.ndim != 2:
        raise UserError(f"4-bit qweight must be uint8 [N, K/2], got {qweight.dtype} {qweight.shape}")
    q = reference.unpack_int4(qweight).astype(np.int32)
    N, K = q.shape
    if wzero.shape != (N, 1):
        raise UserError(f"W4A4 supports per-channel weights only: wzero must be [N={N}, 1], got {wzero.shape}")
    check_linear_shape(N, K, None)
    L = w4a4_lanes(_isa(target))
    nt = -(-N // (2 * L))
    u = np.zeros((nt * 2 * L, K), dtype=np.uint16)
    u[:N] = q + 8
    pairs = u[0::2] | (u[1::2] << 8)  # [nt*L, K]
    wpack = np.ascontiguousarray(pairs.reshape(nt, L, K).transpose(0, 2, 1))
    wsum = np.zeros((nt * 2 * L, 2), dtype=np.int32)
    wsum[:N, 0] = u[:N].sum(axis=1, dtype=np.int64)
    wsum[:, 1] = 8
    wsum[:N, 1] = 8 + wzero[:, 0].astype(np.int32)
    return {"wpack": wpack, "wsum": wsum}
