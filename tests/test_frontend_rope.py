"""The frontend's RoPE and residual-add + RMSNorm kernels (`tir_ops.rope`, `tir_ops.add_rms_norm`, what compiled
LLaMA models run) equal, bit for bit, the Relax ops they replaced, compiled as the frontend compiles them (legalized
ops + hand schedule): one ulp of a rotated Q/K or of a normed activation can flip a code downstream and, in this
model, a greedy token. RoPE is also checked against numpy's rotate_half formula (float32 products and sum)."""

from __future__ import annotations

import numpy as np
import pytest


def _tir(func, arrays, out_shapes):
    import tvm

    from agile_tvm.targets import get_target

    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target("host"))
    dev = tvm.cpu()
    outs = [tvm.runtime.tensor(np.zeros(s, "float32"), dev) for s in out_shapes]
    ex.mod["main"](*[tvm.runtime.tensor(a, dev) for a in arrays], *outs)
    return [o.numpy() for o in outs]


def _relax(build, params):
    """Compile and run the Relax function `build(bb, *vars)` emits, as the frontend compiles models."""
    import tvm
    from tvm import relax

    from agile_tvm.frontend.compile import compile_relax
    from agile_tvm.targets import get_target

    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    vars_ = [relax.Var(name, relax.TensorType([n if d == "n" else d for d in shape], dtype))
             for name, shape, dtype, _ in params]
    with bb.function("main", vars_):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *vars_))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(compile_relax(bb.get(), get_target("host"), None)[0], tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for *_, a in params])


@pytest.mark.parametrize("n,heads,head_dim,max_len", [(37, 9, 64, 64), (5, 3, 64, 2048), (3, 2, 16, 8)])
@pytest.mark.parametrize("parallel", [True, False])  # False: the decode function's serial row kernel
def test_rope_equals_relax_ops(n, heads, head_dim, max_len, parallel):
    from agile_tvm.frontend import tir_ops
    from agile_tvm.frontend.graph import R
    from agile_tvm.frontend.llama import rope_tables

    rng = np.random.RandomState(n)
    x = (rng.randn(n, heads * head_dim) * 3).astype("float32")
    x[0, :4] = 0.0  # zeros: their sign must survive too
    cos, sin = rope_tables(head_dim, 10000.0, max_len)
    pos = rng.randint(0, max_len, n).astype("int32")
    half = head_dim // 2

    def relax_rope(bb, xv, cv, sv, pv):  # graph.GraphBuilder.rope before the kernel, with its table lookups
        c = bb.emit(R.reshape(R.take(cv, pv, axis=0), [xv.ty.shape[0], 1, head_dim]))
        s = bb.emit(R.reshape(R.take(sv, pv, axis=0), [xv.ty.shape[0], 1, head_dim]))
        x3 = bb.emit(R.reshape(xv, [xv.ty.shape[0], heads, head_dim]))
        x1 = bb.emit(R.strided_slice(x3, axes=[2], begin=[0], end=[half]))
        x2 = bb.emit(R.strided_slice(x3, axes=[2], begin=[half], end=[head_dim]))
        rot = bb.emit(R.concat([R.negative(x2), x1], axis=2))
        return R.add(R.multiply(x3, c), R.multiply(rot, s))

    want = _relax(relax_rope, [("x", ["n", heads * head_dim], "float32", x), ("c", [max_len, head_dim], "float32", cos),
                               ("s", [max_len, head_dim], "float32", sin), ("p", ["n"], "int32", pos)]).numpy()
    (got,) = _tir(tir_ops.rope(heads, head_dim, max_len, parallel=parallel), (x, cos, sin, pos),
                  [(n, heads, head_dim)])
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    x3 = x.reshape(n, heads, head_dim)
    rot = np.concatenate([-x3[..., half:], x3[..., :half]], axis=-1)
    ref = x3 * cos[pos][:, None] + rot * sin[pos][:, None]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows,width,eps", [(1, 576, 1e-5), (37, 576, 1e-5), (6, 64, 1e-6)])
@pytest.mark.parametrize("parallel", [True, False])
def test_add_rms_norm_equals_add_then_norm(rows, width, eps, parallel):
    from agile_tvm.frontend import tir_ops
    from agile_tvm.frontend.graph import R

    rng = np.random.RandomState(rows + width)
    x = (rng.randn(rows, width) * 2).astype("float32")
    y = rng.randn(rows, width).astype("float32")
    w = (rng.rand(width) + 0.5).astype("float32")
    total, normed = _tir(tir_ops.add_rms_norm(width, eps, parallel=parallel), (x, y, w), [(rows, width)] * 2)
    want_total = _relax(lambda bb, xv, yv: R.add(xv, yv), [("x", ["n", width], "float32", x),
                                                          ("y", ["n", width], "float32", y)]).numpy()
    np.testing.assert_array_equal(total.view(np.int32), want_total.view(np.int32))
    (want_normed,) = _tir(tir_ops.rms_norm(width, eps), (want_total, w), [(rows, width)])
    np.testing.assert_array_equal(normed.view(np.int32), want_normed.view(np.int32))
    assert not np.array_equal(normed, total)  # the norm was applied
