"""Calibration of one linear at the moment its inputs arrive: TRIP activation params, folding, GPTQ/RTN.

`CalibratingLinear` stands in for a float `nn.Linear` while its decoder layer runs on the whole calibration batch.
When called it sees every calibration input of that linear, as produced by the already-quantized layers and
sublayers before it (GPTQ's sequential, "true sequential" order comes for free from the single pass), and:
1. searches the static activation quantization (TRIP: layer-wise scale/zero point + alpha_c) on those inputs
   (per-token granularity keeps only the TRIP exponents, or none without TRIP: scales are found at run time);
2. folds 2^alpha_c into the weight columns (exact in float: powers of two);
3. builds the GPTQ Hessian from the inputs *as the integer linear sees them* (quantized, divided by 2^alpha_c);
4. quantizes the folded weights (GPTQ or RTN), swaps a `QuantLinear` into its parent, and returns its output,
   so later sublayers calibrate on quantized outputs.
Linears that share an input (q/k/v, gate/up) share the TRIP search and the Hessian through `shared`.
"""

from __future__ import annotations

import torch
from torch import nn

from agile_tvm.quant.configs import QuantConfig
from agile_tvm.quant.gptq import HessianAccumulator, gptq_quantize
from agile_tvm.quant.linear import QuantLinear
from agile_tvm.quant.quantizers import ActParams, fake_quant_act, rtn_quantize, smooth_shifts, trip_search


def fold_shift(weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """W[n, c] * 2^alpha_c: the TRIP factors moved from the activations into the weights (exact)."""
    return weight * torch.exp2(shift.to(weight.dtype))[None, :]


def seen_input(x: torch.Tensor, act: ActParams | None) -> torch.Tensor:
    """The input the integer linear effectively multiplies: (xq - zp) * s, i.e. x * 2^-alpha after quantization."""
    if act is None:
        return x
    return fake_quant_act(x, act) * torch.exp2(-act.shift.to(torch.float32))


def activation_params(x: torch.Tensor, a_bits: int, cfg: QuantConfig) -> ActParams:
    """Static: TRIP search (scale, zero point, exponents). Per token: only the TRIP exponents (all 0 without TRIP);
    a row's scale and zero point come from the row itself at run time."""
    k_max = cfg.act.trip_k if cfg.act.trip else 0
    if cfg.act.granularity == "token":
        if cfg.act.smooth:
            shift = smooth_shifts(x, cfg.act.smooth, cfg.act.trip_k)
        elif k_max:
            shift = trip_search(x, a_bits, k_max).shift
        else:
            shift = torch.zeros(x.shape[-1], dtype=torch.uint8)
        return ActParams(None, None, shift, a_bits, "token")
    return trip_search(x, a_bits, k_max, margin=cfg.act.margin)


class CalibratingLinear(nn.Module):
    def __init__(self, linear: nn.Linear, path: str, role: str, config: QuantConfig, parent: nn.Module,
                 attr: str, shared: dict, report: list):
        super().__init__()
        self.linear, self.path, self.role, self.config = linear, path, role, config
        self.parent, self.attr, self.shared, self.report = [parent], attr, shared, report

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        a_bits = cfg.a_bits(self.role)
        # Same input tensor -> same key. The tensor is kept alive in `shared` until the layer is done, so its
        # address cannot be reused by a later input of the same shape (which would silently share stale stats).
        key = (x.data_ptr(), tuple(x.shape), a_bits)
        held = self.shared.setdefault(("x", key), x)
        if held is not x:
            raise RuntimeError("calibration cache collision: two live inputs share one address")
        act = None
        if a_bits:
            if ("act", key) not in self.shared:
                self.shared[("act", key)] = activation_params(x, a_bits, cfg)
            act = self.shared[("act", key)]
        weight = self.linear.weight.detach().to(torch.float64)
        if act is not None:
            weight = fold_shift(weight, act.shift)
        wq = cfg.weight
        float_zero = wq.zero == "float"
        if wq.method == "gptq":
            if ("h", key) not in self.shared:
                acc = HessianAccumulator(x.shape[-1])
                for chunk in x.reshape(-1, x.shape[-1]).split(16384):
                    acc.add(seen_input(chunk, act))
                self.shared[("h", key)] = acc.h
            codes = gptq_quantize(weight, self.shared[("h", key)], wq.bits, wq.group_size, wq.symmetric,
                                  wq.act_order, wq.percdamp, float_zero=float_zero, scale_grid=wq.scale_grid)
        else:
            codes = rtn_quantize(weight, wq.bits, wq.group_size, wq.symmetric, float_zero=float_zero,
                                 scale_grid=wq.scale_grid)
        bias = self.linear.bias.detach() if self.linear.bias is not None else None
        q = QuantLinear.from_codes(codes, wq.bits, bias, act, float_zero=float_zero)
        setattr(self.parent[0], self.attr, q)
        y = q(x)
        with torch.no_grad():  # the linear's own relative output error, on the first rows (for reports)
            rows = x.reshape(-1, x.shape[-1])[:2048]
            ref, got = self.linear(rows), y.reshape(-1, y.shape[-1])[:2048]
            err = ((got - ref) ** 2).mean().item() / max((ref**2).mean().item(), 1e-30)
        self.report.append({"linear": self.path, "role": self.role, "a_bits": a_bits,
                            "rel_mse": err, "max_shift": int(act.shift.max()) if act is not None else 0})
        return y
