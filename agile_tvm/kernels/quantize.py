"""TRIP activation quantization kernel: float32 x [M, K] -> uint8 xq [M, K] (docs/checkpoint.md).

xq = clip(floor(x * (1/act_scale) * 2^-act_shift[k] + 0.5) + act_zero, 0, 2^bits - 1); the power-of-two factor
is applied as an exact float multiply, so the result matches the numpy reference bit for bit.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from agile_tvm.errors import UserError

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
