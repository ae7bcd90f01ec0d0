"""`quantize_model(loaded, config, calib_ids)`: the one entry point, in the spirit of torchao's `quantize_`.

Layer by layer, like the reference GPTQ: the calibration batch is embedded once, then decoder layer i runs on the
hidden states produced by the already-quantized layers < i, with its linears replaced by `CalibratingLinear`s
(which quantize themselves when their inputs arrive, see calibrate.py) and its attention in calibration mode
(which sets the Q/K/V INT8 scales from the batch). Token pruning, when configured, is active during calibration,
so TRIP sees the pruned activations X^P as in the paper. The float model passed in is not modified (deep copy).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from agile_tvm.errors import UserError
from agile_tvm.quant.calibrate import CalibratingLinear
from agile_tvm.quant.configs import QuantConfig
from agile_tvm.quant.qmodel import QuantizedCausalLM, decoder_layers, layers_path, linear_paths

SUPPORTED_ARCHS = ("llama", "opt", "bloom")


@dataclass
class QuantizedModel:
    """Like models.LoadedModel, for a quantized model: `model(ids)` -> (logits, kept_mask)."""

    model: QuantizedCausalLM
    tokenizer: Any
    arch: str
    name: str
    source: str
    manifest: dict = field(default_factory=dict)
    report: list = field(default_factory=list)


def quantize_model(loaded, config: QuantConfig, calib_ids: torch.Tensor | None = None,
                   progress: bool = False, calibration: dict | None = None) -> QuantizedModel:
    """Quantize `loaded` (a models.LoadedModel) by `config`, calibrating on `calib_ids` [N, L]."""
    config.validate()
    if loaded.arch not in SUPPORTED_ARCHS:
        raise UserError(f"unsupported architecture '{loaded.arch}': use a LLaMA, OPT or BLOOM model")
    if config.act is not None and config.weight is None:
        raise UserError("activation quantization needs weight quantization in this engine: add a weight scheme")
    hf = copy.deepcopy(loaded.model).eval()
    qm = QuantizedCausalLM(hf, loaded.arch, config)
    manifest = {"calibration": calibration or {}}
    out = QuantizedModel(qm, loaded.tokenizer, loaded.arch, loaded.name, loaded.source, manifest)
    if config.weight is None and config.attention is None:
        return out
    if calib_ids is None or calib_ids.numel() == 0:
        raise UserError(f"config '{config.name}' needs calibration samples: give --calib-samples >= 1")
    max_pos = _max_positions(hf.config)
    if max_pos and calib_ids.shape[1] > max_pos:
        raise UserError(f"calibration seq len {calib_ids.shape[1]} exceeds the model maximum {max_pos}: "
                        "lower --calib-seq-len")
    paths = linear_paths(hf, loaded.arch)
    prefix = layers_path(loaded.arch)
    t0 = time.time()
    qm.ctx.calibrating = True
    try:
        with torch.no_grad():
            st = qm.embed(calib_ids)
            layers = range(qm.num_layers)
            if progress:
                from tqdm import tqdm

                layers = tqdm(layers, desc=f"quantize {config.name}", unit="layer")
            for i in layers:
                shared: dict = {}
                if config.weight is not None:
                    for path, role in paths.items():
                        if path.startswith(f"{prefix}.{i}."):
                            parent_path, attr = path.rsplit(".", 1)
                            parent = hf.get_submodule(parent_path)
                            setattr(parent, attr, CalibratingLinear(getattr(parent, attr), path, role, config,
                                                                    parent, attr, shared, out.report))
                st = qm.run_layer(i, st)
                shared.clear()
    finally:
        qm.ctx.calibrating = False
    if config.head_bits:
        quantize_head(hf, config)
    leftover = [n for n, m in decoder_layers(hf, loaded.arch).named_modules() if isinstance(m, CalibratingLinear)]
    if leftover:
        raise RuntimeError(f"linears never called during calibration: {leftover[:3]}")
    manifest["calibration"]["seconds"] = round(time.time() - t0, 1)
    return out


def quantize_head(hf, config: QuantConfig) -> None:
    """Swap the LM head for an INT8 QuantLinear (RTN, symmetric, groups of 32, per-token INT8 inputs).

    RTN, not GPTQ: 8-bit RTN in groups of 32 already reproduces a Q8_0 head exactly and loses ~nothing otherwise.
    A tied head gets its own quantized copy; the embedding stays float (it is a lookup, not a matmul)."""
    from agile_tvm.quant.linear import QuantLinear
    from agile_tvm.quant.quantizers import ActParams, rtn_quantize

    head = hf.lm_head
    w = head.weight.detach().float()
    g = 32 if w.shape[1] % 32 == 0 else -1
    codes = rtn_quantize(w, 8, g, symmetric=True)
    act = ActParams(None, None, torch.zeros(w.shape[1], dtype=torch.uint8), 8, "token")
    bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
    hf.lm_head = QuantLinear.from_codes(codes, 8, bias, act)


def _max_positions(cfg) -> int | None:
    return getattr(cfg, "max_position_embeddings", None)
