"""The frontend's RMSNorm kernel (`tir_ops.rms_norm`, what compiled LLaMA models run) equals Relax's legalized
R.nn.rms_norm (what they ran before) bit for bit, and both are within float32 rounding of the exact value.

Bit for bit, because a one-ulp change of a norm output can flip an activation code downstream (a reordered sum of
squares moved SmolLM2 agileq8's logits by up to 7). Bound against numpy in float64 (relative, per element):
(0.5 (width + 1) + 5) u, u = 2^-24: the sum of `width` non-negative squares is within (width - 1) u of exact, the
mean, + eps, rsqrt and two products add a few u (1.8e-5 at width 576; observed ~7e-7). A wrong formula (eps left
out, sum for mean, no weight) misses it by orders of magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest


def _tir(func, arrays, out_shape):
    import tvm

    from agile_tvm.targets import get_target

    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target("host"))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)]
    ex.mod["main"](*args)
    return args[-1].numpy()


def _relax_rms_norm(x, w, eps):
    """R.nn.rms_norm compiled as the frontend compiled it before (legalized op + hand schedule)."""
    import tvm
    from tvm import relax

    from agile_tvm.frontend.compile import compile_relax
    from agile_tvm.targets import get_target

    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    xv = relax.Var("x", relax.TensorType([n, x.shape[1]], "float32"))
    wv = relax.Var("w", relax.TensorType([x.shape[1]], "float32"))
    with bb.function("main", [xv, wv]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.rms_norm(xv, wv, axes=[-1], epsilon=eps))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(compile_relax(bb.get(), get_target("host"), None)[0], tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()


@pytest.mark.parametrize("rows,width,eps,spread", [(1, 576, 1e-5, 3.0), (37, 576, 1e-5, 1.0), (6, 64, 1e-6, 1.0),
                                                   (5, 8, 1e-5, 1e-3)])
@pytest.mark.parametrize("parallel", [True, False])  # False: the decode function's serial row kernel
def test_rms_norm_equals_relax_op_and_exact_within_bound(rows, width, eps, spread, parallel):
    from agile_tvm.frontend import tir_ops

    rng = np.random.RandomState(rows * 100 + width)
    x = (rng.randn(rows, width) * spread).astype("float32")  # spread 1e-3: eps matters (mean square ~ eps)
    w = (rng.rand(width) + 0.5).astype("float32")
    got = _tir(tir_ops.rms_norm(width, eps, parallel=parallel), (x, w), x.shape)
    np.testing.assert_array_equal(got, _relax_rms_norm(x, w, eps))
    x64 = x.astype(np.float64)
    exact = x64 * w / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    bound = (0.5 * (width + 1) + 5) * 2.0**-24
    assert np.all(np.abs(got - exact) <= bound * np.abs(exact))
