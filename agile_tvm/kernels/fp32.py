"""FP32 linear with the same scheduling effort as the integer kernels: the benchmark's "TVM FP32" baseline and a
fast path for the linears that stay float (e.g. the LM head).

y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W packed as ``[N/nb, K, nb]`` (nb = two SIMD registers of floats) so the
inner loop is a broadcast of x[m, k] and nb/8 FMAs over contiguous weights.
"""

from __future__ import annotations

import numpy as np
from tvm import s_tir, te

from .linear import _m_var
from .schedule import mark_scheduled


def fp32_lanes(isa: str) -> int:
    return {"avx512": 32, "avx2": 16, "generic": 16}.get(isa, 8)


def pack_fp32_weights(weight, target) -> np.ndarray:
    """float32 W [N, K] -> [N_pad/nb, K, nb] (zero-padded rows)."""
    from .layout import _isa

    w = np.asarray(weight, dtype=np.float32)
    nb = fp32_lanes(_isa(target))
    N, K = w.shape
    n_pad = -(-N // nb) * nb
    wp = np.zeros((n_pad, K), np.float32)
    wp[:N] = w
    return np.ascontiguousarray(wp.reshape(n_pad // nb, nb, K).transpose(0, 2, 1))


def fp32_linear_func(N, K, target, *, has_bias=False, m=None):
    from agile_tvm.targets import get_target, isa_of

    from .schedule import _pick_nt

    isa = isa_of(get_target(target))
    nb = fp32_lanes(isa)
    n_pad = -(-N // nb) * nb
    M = _m_var(m)
    x = te.placeholder((M, K), "float32", name="x")
    w = te.placeholder((n_pad // nb, K, nb), "float32", name="w")
    k = te.reduce_axis((0, K), name="k")
    dot = te.compute((M, n_pad), lambda i, n: te.sum(x[i, k] * w[n // nb, k, n % nb], axis=k), name="dot")
    args = [x, w]
    if has_bias:
        bias = te.placeholder((N,), "float32", name="bias")
        args.append(bias)
        y = te.compute((M, N), lambda i, n: dot[i, n] + bias[n], name="y")
    else:
        y = te.compute((M, N), lambda i, n: dot[i, n], name="y")
    args.append(y)
    name = f"fp32_linear_n{N}_k{K}" + ("_bias" if has_bias else "") + ("" if m is None else f"_m{m}")
    func = te.create_prim_func(args).with_attr("global_symbol", name)

    nt = _pick_nt(n_pad // nb, 4 if m == 1 else 3)
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock("dot")
    i, n, kk = sch.get_loops(blk)
    no, noi, ni = sch.split(n, [None, nt, nb])
    sch.reorder(no, i, kk, noi, ni)
    sch.parallel(no)
    sch.reverse_compute_at(sch.get_sblock("y"), i)
    sch.unroll(noi)
    sch.vectorize(ni)
    init = sch.decompose_reduction(blk, kk)
    sch.vectorize(sch.get_loops(init)[-1])
    return mark_scheduled(sch.mod["main"])
