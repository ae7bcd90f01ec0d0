"""Activation quantization kernels: float32 x [M, K] -> uint8 codes (docs/checkpoint.md).

v1, TRIP with a static per-tensor scale (``quantize_act_func``):
xq = clip(floor(x * (1/act_scale) * 2^-act_shift[k] + 0.5) + act_zero, 0, 2^bits - 1); the power-of-two factor
is applied as an exact float multiply, so the result matches the numpy reference bit for bit.

v2, dynamic per token (``quantize_act_token_func``): each row gets its own scale and zero point from its range,
and the kernel also writes the per-group sums of (xq - zp) that float weight offsets need. Bit-exact to
``reference.quantize_act_token``, including the float32 rounding of v * r before the + 0.5 (``no_contract``)."""

from __future__ import annotations

from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from agile_tvm.errors import UserError

from .layout import check_linear_shape
from .linear import _m_var, quantize_expr
from .schedule import mark_scheduled


def quantize_act_tensors(K, bits, m=None):
    if bits not in (4, 8):
        raise UserError(f"activation bits must be 4 or 8, got {bits}")
    M = _m_var(m)
    x = te.placeholder((M, K), "float32", name="x")
    act_scale = te.placeholder((), "float32", name="act_scale")
    act_zero = te.placeholder((), "int32", name="act_zero")
    act_shift = te.placeholder((K,), "uint8", name="act_shift")
    xq = te.compute(
        (M, K),
        lambda i, k: quantize_expr(
            x[i, k], tirx.const(1.0, "float32") / act_scale[()], act_zero[()], act_shift[k], bits
        ),
        name="xq",
    )
    return [x, act_scale, act_zero, act_shift, xq]


def quantize_act_func(K, bits, target, m=None):
    """Scheduled activation quantizer for ``target`` (rows in parallel, features vectorized)."""
    from agile_tvm.targets import get_target

    get_target(target)
    name = f"quantize_act_k{K}_b{bits}" + ("" if m is None else f"_m{m}")
    func = te.create_prim_func(quantize_act_tensors(K, bits, m)).with_attr("global_symbol", name)
    sch = s_tir.Schedule(func)
    i, k = sch.get_loops(sch.get_sblock("xq"))
    if m != 1:
        sch.parallel(i)
    if K % 8 == 0:
        _, kv = sch.split(k, [None, 8])
        sch.vectorize(kv)
    return mark_scheduled(sch.mod["main"])


def no_contract(e):
    """``e`` behind an LLVM arithmetic fence: the float product is rounded before the following add.

    TVM compiles with FP contraction on, so ``floor(v * r + 0.5)`` would become one FMA (a single rounding) and
    differ from the contract's float32 multiply-then-add wherever v * r lands near a half-integer."""
    return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", e)


def _lanes(n: int) -> int:
    """SIMD lanes for a loop of n floats/ints: 8 (one AVX2 register) when they divide n, else 4 (n % 4 == 0)."""
    return 8 if n % 8 == 0 else 4


def quantize_act_token_func(K, bits, target, *, group_size=None, m=None):
    """Scheduled v2 per-token quantizer for ``target`` (docs/checkpoint.md, "Version 2"):
    (x f32[M,K], act_shift u8[K], xq u8[M,K], act_scale f32[M], act_zero i32[M], xsum i32[M,G]),
    G = K // group_size (1 without groups).

    Rows in parallel; per row, three passes over its K values (in L1): vectorized running max of -v and v from 0
    (so lo = min(0, min v) and hi = max(0, max v) exactly, negation and max round nothing), the row's scale and
    zero point, the vectorized codes; then per group the sum of (xq - zp) = sum xq - gs * zp (exact int32)."""
    from agile_tvm.targets import get_target

    get_target(target)
    if bits not in (4, 8):
        raise UserError(f"activation bits must be 4 or 8, got {bits}")
    gs, G = check_linear_shape(1, K, group_size)
    L, LG = _lanes(K), _lanes(gs)
    top = float(2**bits - 1)
    rows = tirx.Var("M", "int64") if m is None else int(m)
    row_loop = T.serial if m == 1 else T.parallel

    @T.prim_func(s_tir=True)
    def quant(x_h: T.handle, shift_h: T.handle, xq_h: T.handle, s_h: T.handle, z_h: T.handle, xsum_h: T.handle):
        x = T.match_buffer(x_h, (rows, K), "float32")
        act_shift = T.match_buffer(shift_h, (K,), "uint8")
        xq = T.match_buffer(xq_h, (rows, K), "uint8")
        act_scale = T.match_buffer(s_h, (rows,), "float32")
        act_zero = T.match_buffer(z_h, (rows,), "int32")
        xsum = T.match_buffer(xsum_h, (rows, G), "int32")
        with T.sblock("root"):
            pow2 = T.alloc_buffer((K,), "float32")  # 2^-alpha, exact; once per call instead of a divide per value
            for k in range(K):
                pow2[k] = T.float32(1) / T.Cast("float32", T.shift_left(1, T.Cast("int32", act_shift[k])))
            for i in row_loop(rows):
                part = T.alloc_buffer((2, L), "float32")  # running max of -v (= -lo) and of v (= hi), from 0
                for l in T.vectorized(L):
                    part[0, l] = T.float32(0)
                    part[1, l] = T.float32(0)
                for kb in range(K // L):
                    for l in T.vectorized(L):
                        part[0, l] = T.max(part[0, l], -(x[i, kb * L + l] * pow2[kb * L + l]))
                        part[1, l] = T.max(part[1, l], x[i, kb * L + l] * pow2[kb * L + l])
                rng = T.alloc_buffer((3,), "float32")  # -lo, hi, r
                rng[0] = T.float32(0)
                rng[1] = T.float32(0)
                for l in range(L):
                    rng[0] = T.max(rng[0], part[0, l])
                    rng[1] = T.max(rng[1], part[1, l])
                # s = (hi - lo) / (2^b - 1), 1 for an all-zero row; hi - lo == hi + (-lo) exactly
                act_scale[i] = T.Select((rng[1] + rng[0]) / T.float32(top) == T.float32(0), T.float32(1),
                                        (rng[1] + rng[0]) / T.float32(top))
                rng[2] = T.float32(1) / act_scale[i]
                act_zero[i] = T.Cast("int32", T.max(T.min(T.floor(
                    no_contract(rng[0] * rng[2]) + T.float32(0.5)), T.float32(top)), T.float32(0)))
                for kb in range(K // L):
                    for l in T.vectorized(L):
                        xq[i, kb * L + l] = T.Cast("uint8", T.max(T.min(
                            T.floor(no_contract(x[i, kb * L + l] * pow2[kb * L + l] * rng[2]) + T.float32(0.5))
                            + T.Cast("float32", act_zero[i]), T.float32(top)), T.float32(0)))
                for g in range(G):
                    acc = T.alloc_buffer((LG,), "int32")
                    for l in T.vectorized(LG):
                        acc[l] = 0
                    for kb in range(gs // LG):
                        for l in T.vectorized(LG):
                            acc[l] = acc[l] + T.Cast("int32", xq[i, g * gs + kb * LG + l])
                    xsum[i, g] = -gs * act_zero[i]
                    for l in range(LG):
                        xsum[i, g] = xsum[i, g] + acc[l]

    name = f"quantize_act_token_k{K}_b{bits}" + ("" if G == 1 else f"_g{gs}") + ("" if m is None else f"_m{m}")
    return mark_scheduled(quant.with_attr("tirx.noalias", True).with_attr("global_symbol", name))
