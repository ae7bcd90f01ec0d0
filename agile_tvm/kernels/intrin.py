"""Tensor intrinsics used by the default schedules, registered under ``agile_*`` names.

We define our own instead of importing ``tvm.s_tir.tensor_intrin``: that package imports the CUDA intrinsics
and takes 75-100 s, and it has no int16 ``pmaddwd`` or AVX2 variant. Each intrinsic is a description (what
the loop nest computes, used for pattern matching) plus an implementation (one or two LLVM intrinsics).

| name | ISA | C[lanes] += sum_k A[k] * B[lanes, k] | weights tile |
|---|---|---|---|
| ``agile_u8i8_avx512_16x4`` | AVX-512BW | u8 x s8 -> s32, k = 4: ``vpmaddubsw`` + ``vpmaddwd`` | [16, 4] int8 |
| ``agile_u8i8_avx2_8x4``    | AVX2      | same on ymm                                | [8, 4] int8 |
| ``agile_i16_avx512_16x2``  | AVX-512BW | s16 x s16 -> s32, k = 2: ``vpmaddwd``      | [16, 2] int16 |
| ``agile_i16_avx2_8x2``     | AVX2      | same on ymm                                | [8, 2] int16 |
| ``agile_s8s8_avx2_8x4``    | AVX2      | s8 x s8 -> s32, k = 4: 2 ``vpsignb`` + u8i8's two | [8, 4] int8 |
| ``agile_u4x4zp_avx2_8x16`` | AVX2      | (u8 - zp) x u4 -> s32, k = 16, nibbles: the GEMV without row sums | 64 bytes |
| ``agile_u8i8x4c_avx2_8x16`` | AVX2     | C[i] += c[i] * sum_k A[k] B[., i, .], k = 16: the pmaddwd multiplier c (int_scales.py) | [4, 8, 4] int8 |
| ``agile_sdot_4x4``         | AArch64 +dotprod | s8 x s8 -> s32, k = 4: ``sdot``     | [4, 4] int8 |
| ``agile_neon_smull_4x4``   | AArch64 NEON     | same: ``smull`` + ``saddlp`` + ``addp`` | [4, 4] int8 |

``pmaddubsw`` adds two u8*s8 products in int16 with saturation: exact only when |a0*b0 + a1*b1| <= 32767,
true for 8-bit activations times 5-bit weights (|q - wzero| <= 15), false for 8-bit weights. That is why
W8A8 on x86 uses the int16 ``pmaddwd`` path (half the multiplies per instruction), or on AVX2 with |w| <= 127 the
``vpsignb`` path: signed activations xq - 128 give |a| <= 128, and 2 * 128 * 127 = 32512 fits.
"""

from __future__ import annotations

import functools

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


def _dot_desc(lanes: int, kk: int, a_dtype: str, b_dtype: str):
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (kk,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, kk), b_dtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:kk], B[0:lanes, 0:kk])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, kk):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    return desc


def _pmaddubsw_impl(lanes: int):
    """C += pmaddwd(pmaddubsw(broadcast(A as u32), B), 1): 4 products per int32 lane."""
    bits = lanes * 32
    ub = "llvm.x86.avx512.pmaddubs.w.512" if lanes == 16 else "llvm.x86.avx2.pmadd.ub.sw"
    wd = "llvm.x86.avx512.pmaddw.d.512" if lanes == 16 else "llvm.x86.avx2.pmadd.wd"
    u8v, i8v, i16v, i32v = (f"uint8x{bits // 8}", f"int8x{bits // 8}", f"int16x{bits // 16}", f"int32x{lanes}")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_u32 = T.reinterpret("int32", A.vload([0], "uint8x4"))
            a_vec = T.reinterpret(u8v, T.broadcast(a_u32, lanes))
            pairs = T.call_llvm_pure_intrin(i16v, ub, a_vec, B.vload([0, 0], i8v))
            C[T.ramp(0, 1, lanes)] = C.vload([0], i32v) + T.call_llvm_pure_intrin(
                i32v, wd, pairs, T.broadcast(T.int16(1), bits // 16)
            )

    return impl


def _dot_desc_x4(lanes: int):
    """C[i] += sum_{k < 16} A[k] * B[k // 4, i, k % 4]: four consecutive [lanes, 4] weight tiles."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (4, lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:16], B[0:4, 0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 16):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vk // 4, vi, vk % 4])

    return desc


def _x4_pair_sums(A, B, lanes: int):
    """The int16 pair sums of 16 k (four broadcast 4-byte activation groups A times four [lanes, 4] weight tiles B):
    four pmaddubsw added in int16, ready for one pmaddwd."""
    bits = lanes * 32
    ub = "llvm.x86.avx512.pmaddubs.w.512" if lanes == 16 else "llvm.x86.avx2.pmadd.ub.sw"
    u8v, i8v, i16v = f"uint8x{bits // 8}", f"int8x{bits // 8}", f"int16x{bits // 16}"
    a = [T.reinterpret(u8v, T.broadcast(T.reinterpret("int32", A.vload([4 * j], "uint8x4")), lanes))
         for j in range(4)]
    p = [T.call_llvm_pure_intrin(i16v, ub, a[j], B.vload([j, 0, 0], i8v)) for j in range(4)]
    return (p[0] + p[1]) + (p[2] + p[3])


def _pmaddubsw_x4_impl(lanes: int):
    """Four pmaddubsw summed in int16 before one pmaddwd (5-bit weights only).

    A pmaddubsw lane is a0*w0 + a1*w1 <= 2 * 255 * 15 = 7650 when |w| <= 15, so four of them (30600) still fit
    int16: 4 byte-multiplies + 3 int16 adds + 1 widening multiply instead of 4 + 4, fewer multiply-port uops.
    """
    bits = lanes * 32
    wd = "llvm.x86.avx512.pmaddw.d.512" if lanes == 16 else "llvm.x86.avx2.pmadd.wd"
    i32v = f"int32x{lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (4, lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:16], B[0:4, 0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(0, 1, lanes)] = C.vload([0], i32v) + T.call_llvm_pure_intrin(
                i32v, wd, _x4_pair_sums(A, B, lanes), T.broadcast(T.int16(1), bits // 16)
            )

    return impl


def _dot_desc_x4c(lanes: int):
    """C[i] += int16(S[i]) * sum_{k < 16} A[k] * B[k // 4, i, k % 4]: the x4 step times a per-lane integer scale,
    S holding c in both int16 halves (c * 65537), so it is the pmaddwd multiplier pair as it stands."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, s: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (4, lanes, 4), "int8", offset_factor=1)
        S = T.match_buffer(s, (lanes,), "int32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:16], B[0:4, 0:lanes, 0:4], S[0:lanes])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 16):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vk // 4, vi, vk % 4]) * T.Cast(
                        "int32", T.Cast("int16", S[vi]))

    return desc


def _pmaddubsw_x4c_impl(lanes: int):
    """The x4 step with pmaddwd(p, S as int16 pairs) instead of pmaddwd(p, 1): the scale costs no instruction.
    Exact: the int16 sum p of four pmaddubsw lanes is <= 4 * 2 * 255 * 8 = 16320 for codes in [-8, 7], and
    pmaddwd's int32 lane p0 * c + p1 * c <= 2 * 16320 * 32767 fits."""
    wd = "llvm.x86.avx512.pmaddw.d.512" if lanes == 16 else "llvm.x86.avx2.pmadd.wd"
    i16v, i32v = f"int16x{lanes * 2}", f"int32x{lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, s: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (4, lanes, 4), "int8", offset_factor=1)
        S = T.match_buffer(s, (lanes,), "int32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:16], B[0:4, 0:lanes, 0:4], S[0:lanes])
            T.writes(C[0:lanes])
            C[T.ramp(0, 1, lanes)] = C.vload([0], i32v) + T.call_llvm_pure_intrin(
                i32v, wd, _x4_pair_sums(A, B, lanes), T.reinterpret(i16v, S.vload([0], i32v)))

    return impl


def _nibble_code(B, half: int, i, k):
    """The 4-bit code u(k, i) of the nibble layout (layout.py): lane i, k-th of 16 in the two registers B."""
    return T.shift_right(B[k // 4 % 2 * half + i * 4 + k % 4], T.Cast("uint8", k // 8 * 4)) & T.uint8(15)


def _nibble_desc(lanes: int):
    """C[i] += sum_{k < 16} A[k] * u(k, i), u read from 8*lanes bytes of nibbles (layout.py, ``nibble``)."""
    half = 4 * lanes

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (2 * half,), "uint8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:16], B[0 : 2 * half])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 16):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", _nibble_code(B, half, vi, vk))

    return desc


def _nibble_codes(B, lanes: int) -> list:
    """The 4 [lanes, 4] tiles of 4-bit codes (uint8 vectors) in two registers of nibbles B[0 : 8 * lanes]."""
    bits, half = lanes * 32, 4 * lanes
    u8v = f"uint8x{bits // 8}"
    b02, b13 = B.vload([0], u8v), B.vload([half], u8v)
    m15, four = T.broadcast(T.uint8(15), bits // 8), T.broadcast(T.uint8(4), bits // 8)
    return [b02 & m15, b13 & m15, T.shift_right(b02, four), T.shift_right(b13, four)]


def _nibble_dot(A, B, lanes: int):
    """sum_{k < 16} A[k] * u(k, i) per lane as int32: four pmaddubsw summed in int16 (|sum| <= 4 * 7650), one
    pmaddwd."""
    bits = lanes * 32
    ub = "llvm.x86.avx512.pmaddubs.w.512" if lanes == 16 else "llvm.x86.avx2.pmadd.ub.sw"
    wd = "llvm.x86.avx512.pmaddw.d.512" if lanes == 16 else "llvm.x86.avx2.pmadd.wd"
    u8v, i8v, i16v, i32v = (f"uint8x{bits // 8}", f"int8x{bits // 8}", f"int16x{bits // 16}", f"int32x{lanes}")
    a = [T.reinterpret(u8v, T.broadcast(T.reinterpret("int32", A.vload([4 * j], "uint8x4")), lanes))
         for j in range(4)]
    t = [T.reinterpret(i8v, u) for u in _nibble_codes(B, lanes)]
    p01 = T.call_llvm_pure_intrin(i16v, ub, a[0], t[0]) + T.call_llvm_pure_intrin(i16v, ub, a[1], t[1])
    p23 = T.call_llvm_pure_intrin(i16v, ub, a[2], t[2]) + T.call_llvm_pure_intrin(i16v, ub, a[3], t[3])
    return T.call_llvm_pure_intrin(i32v, wd, p01 + p23, T.broadcast(T.int16(1), bits // 16))


def _nibble_zero_term(Z, B, lanes: int):
    """Z[0] * sum_{k < 16} u(k, i) per lane as int32: the codes of the 4 tiles added as bytes (<= 60), pmaddubsw
    with ones to int16 pairs, pmaddwd with zp."""
    bits = lanes * 32
    ub = "llvm.x86.avx512.pmaddubs.w.512" if lanes == 16 else "llvm.x86.avx2.pmadd.ub.sw"
    wd = "llvm.x86.avx512.pmaddw.d.512" if lanes == 16 else "llvm.x86.avx2.pmadd.wd"
    i16v, i32v = f"int16x{bits // 16}", f"int32x{lanes}"
    u = _nibble_codes(B, lanes)
    pairs = T.call_llvm_pure_intrin(i16v, ub, (u[0] + u[1]) + (u[2] + u[3]), T.broadcast(T.int8(1), bits // 8))
    return T.call_llvm_pure_intrin(i32v, wd, pairs, T.broadcast(T.Cast("int16", Z[0]), bits // 16))


def _nibble_impl(lanes: int):
    """Unpack 4 [lanes, 4] tiles of 4-bit codes from two registers of nibbles, then the x4 pmaddubsw step."""
    half = 4 * lanes

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (2 * half,), "uint8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:16], B[0 : 2 * half])
            T.writes(C[0:lanes])
            C[T.ramp(0, 1, lanes)] = C.vload([0], f"int32x{lanes}") + _nibble_dot(A, B, lanes)

    return impl


def _nibble_zp_desc(lanes: int):
    """C[i] += sum_{k < 16} (A[k] - Z[0]) * u(k, i): the nibble dot with the activation zero point inside."""
    half = 4 * lanes

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, z: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16,), "uint8", offset_factor=1)
        Z = T.match_buffer(z, (1,), "int32", offset_factor=1)
        B = T.match_buffer(b, (2 * half,), "uint8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:16], Z[0:1], B[0 : 2 * half])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 16):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + (T.Cast("int32", A[vk]) - Z[0]) * T.Cast("int32", _nibble_code(B, half, vi, vk))

    return desc


def _nibble_zp_impl(lanes: int):
    """The nibble step minus zp * (the lane's 16 codes summed), so the GEMV needs no stored row sums."""
    half = 4 * lanes

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, z: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16,), "uint8", offset_factor=1)
        Z = T.match_buffer(z, (1,), "int32", offset_factor=1)
        B = T.match_buffer(b, (2 * half,), "uint8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:16], Z[0:1], B[0 : 2 * half])
            T.writes(C[0:lanes])
            C[T.ramp(0, 1, lanes)] = (C.vload([0], f"int32x{lanes}") + _nibble_dot(A, B, lanes)
                                      - _nibble_zero_term(Z, B, lanes))

    return impl


def _psign_pmaddubsw_impl(lanes: int):
    """Signed x signed bytes on AVX2: C += pmaddwd(pmaddubsw(|a|, sign(B, a)), 1) with a = broadcast(A as i32).

    vpsignb moves the sign of each activation byte onto its weight byte, so pmaddubsw's unsigned operand is |a|
    <= 128 and its signed one |w| <= 127 (packing refuses -128): a pair sum is at most 2 * 128 * 127 = 32512,
    below int16 saturation. |a| of -128 wraps to the byte 0x80, which is 128 read as unsigned."""
    bits = lanes * 32
    u8v, i8v, i16v, i32v = (f"uint8x{bits // 8}", f"int8x{bits // 8}", f"int16x{bits // 16}", f"int32x{lanes}")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_vec = T.reinterpret(i8v, T.broadcast(T.reinterpret("int32", A.vload([0], "int8x4")), lanes))
            a_abs = T.reinterpret(u8v, T.call_llvm_pure_intrin(i8v, "llvm.x86.avx2.psign.b", a_vec, a_vec))
            w_signed = T.call_llvm_pure_intrin(i8v, "llvm.x86.avx2.psign.b", B.vload([0, 0], i8v), a_vec)
            pairs = T.call_llvm_pure_intrin(i16v, "llvm.x86.avx2.pmadd.ub.sw", a_abs, w_signed)
            C[T.ramp(0, 1, lanes)] = C.vload([0], i32v) + T.call_llvm_pure_intrin(
                i32v, "llvm.x86.avx2.pmadd.wd", pairs, T.broadcast(T.int16(1), bits // 16)
            )

    return impl


def _pmaddwd_impl(lanes: int):
    """C += pmaddwd(broadcast(A as i32), B): 2 int16 products per int32 lane."""
    bits = lanes * 32
    wd = "llvm.x86.avx512.pmaddw.d.512" if lanes == 16 else "llvm.x86.avx2.pmadd.wd"
    i16v, i32v = f"int16x{bits // 16}", f"int32x{lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), "int16", offset_factor=1)
        B = T.match_buffer(b, (lanes, 2), "int16", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            a_i32 = T.reinterpret("int32", A.vload([0], "int16x2"))
            a_vec = T.reinterpret(i16v, T.broadcast(a_i32, lanes))
            C[T.ramp(0, 1, lanes)] = C.vload([0], i32v) + T.call_llvm_pure_intrin(
                i32v, wd, a_vec, B.vload([0, 0], i16v)
            )

    return impl


def _sdot_impl():
    """C += sdot(B, broadcast(A as i32)): lane i gets sum_k A[k] * B[i, k]."""

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a_vec = T.reinterpret("int8x16", T.broadcast(T.reinterpret("int32", A.vload([0], "int8x4")), 4))
            C[T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(
                "int32x4",
                "llvm.aarch64.neon.sdot.v4i32.v16i8",
                
                C.vload([0], "int32x4"),
                B.vload([0, 0], "int8x16"),
                a_vec,
            )

    return impl


def _neon_smull_impl():
    """No dotprod (Cortex-A72): smull to int16, pairwise widening add (saddlp) and addp to one int32 per row."""

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a8 = T.reinterpret("int8x8", T.broadcast(T.reinterpret("int32", A.vload([0], "int8x4")), 2))
            p01 = T.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16", a8, B.vload([0, 0], "int8x8"))
            p23 = T.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull.v8i16", a8, B.vload([2, 0], "int8x8"))
            s01 = T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", p01)
            s23 = T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", p23)
            C[T.ramp(0, 1, 4)] = C.vload([0], "int32x4") + T.call_llvm_pure_intrin(
                "int32x4", "llvm.aarch64.neon.addp.v4i32", s01, s23)

    return impl


#: Four-tile variants for 5-bit weights (W4A8 on x86): k per step 16, tiles [4, lanes, 4].
DOT_X4_INTRINSICS = {"avx512": ("agile_u8i8x4_avx512_16x16", 16), "avx2": ("agile_u8i8x4_avx2_8x16", 8)}

#: Nibble-packed W4A8 (4-bit weights read straight from memory): x86 only, k per step 16.
NIBBLE_INTRINSICS = {"avx512": ("agile_u4x4_avx512_16x16", 16), "avx2": ("agile_u4x4_avx2_8x16", 8)}

#: The nibble GEMV step with the activation zero point inside the dot (``zero_in_dot``: no stored row sums).
NIBBLE_ZP_INTRINSICS = {"avx512": ("agile_u4x4zp_avx512_16x16", 16), "avx2": ("agile_u4x4zp_avx2_8x16", 8)}

#: The x4 step times a per-lane integer scale (``int_scales.py``: weights on a power-of-two scale grid), k = 16.
INT_SCALE_INTRINSICS = {"avx512": ("agile_u8i8x4c_avx512_16x16", 16), "avx2": ("agile_u8i8x4c_avx2_8x16", 8)}

#: Signed activation bytes times int8 weights on x86 (W8A8 in int8 tiles, ``layout.signed_x86_w8``), k = 4.
SIGNED_X86_INTRINSICS = {"avx2": ("agile_s8s8_avx2_8x4", 8)}

#: (intrinsic name, lanes, k per step, activation dtype, weight dtype) per ISA and weight width.
DOT_INTRINSICS = {
    ("avx512", 8): ("agile_u8i8_avx512_16x4", 16, 4, "uint8", "int8"),
    ("avx2", 8): ("agile_u8i8_avx2_8x4", 8, 4, "uint8", "int8"),
    ("avx512", 16): ("agile_i16_avx512_16x2", 16, 2, "int16", "int16"),
    ("avx2", 16): ("agile_i16_avx2_8x2", 8, 2, "int16", "int16"),
    ("sdot", 8): ("agile_sdot_4x4", 4, 4, "int8", "int8"),
    ("neon", 8): ("agile_neon_smull_4x4", 4, 4, "int8", "int8"),
}


@functools.lru_cache(maxsize=None)
def register_all() -> None:
    """Register every agile_* intrinsic once per process (idempotent)."""
    impls = {
        "agile_u8i8_avx512_16x4": _pmaddubsw_impl(16),
        "agile_u8i8_avx2_8x4": _pmaddubsw_impl(8),
        "agile_i16_avx512_16x2": _pmaddwd_impl(16),
        "agile_i16_avx2_8x2": _pmaddwd_impl(8),
        "agile_sdot_4x4": _sdot_impl(),
        "agile_neon_smull_4x4": _neon_smull_impl(),
    }
    for name, lanes, kk, a_dt, b_dt in DOT_INTRINSICS.values():
        desc = _dot_desc(lanes, kk, a_dt, b_dt)
        TensorIntrin.register(name, desc, impls[name], override=True)
    for name, lanes in SIGNED_X86_INTRINSICS.values():
        TensorIntrin.register(name, _dot_desc(lanes, 4, "int8", "int8"), _psign_pmaddubsw_impl(lanes), override=True)
    for name, lanes in NIBBLE_INTRINSICS.values():
        TensorIntrin.register(name, _nibble_desc(lanes), _nibble_impl(lanes), override=True)
    for name, lanes in NIBBLE_ZP_INTRINSICS.values():
        TensorIntrin.register(name, _nibble_zp_desc(lanes), _nibble_zp_impl(lanes), override=True)
    for name, lanes in DOT_X4_INTRINSICS.values():
        TensorIntrin.register(name, _dot_desc_x4(lanes), _pmaddubsw_x4_impl(lanes), override=True)
    for name, lanes in INT_SCALE_INTRINSICS.values():
        TensorIntrin.register(name, _dot_desc_x4c(lanes), _pmaddubsw_x4c_impl(lanes), override=True)
