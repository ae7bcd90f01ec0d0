"""Save and load the quantized checkpoint (`agile-tvm-qckpt` v2, docs/checkpoint.md): safetensors + JSON, no pickle.

Layout: `agile_quant.json` (manifest), `config.json` (Hugging Face config), `model.safetensors` (every tensor under
its Hugging Face module path: `P.qweight`, `P.wscale`, `P.wzero`, `P.bias`, `P.act_scale`, `P.act_zero`,
`P.act_shift`, and with v2 options `P.wmin`, for each quantized linear P; `L.q_scale`, `L.k_scale`, `L.v_scale` for each quantized attention L;
float tensors under their usual names), and the tokenizer files.
Decisions where the contract is silent:
- a tied LM head (`tie_word_embeddings`) is not stored twice: `lm_head.weight` is absent and re-tied on load;
- every file is written to a temporary name in DIR and renamed into place; the manifest goes last, so a directory
  without `agile_quant.json` is never taken for a checkpoint;
- the manifest also records the pruning `end_layer` and the calibration time, extra keys readers may ignore.
Loading checks the format/version, the presence of every tensor the manifest implies, and the integer dtypes, and
says which file is missing or corrupt in one line (`UserError`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from agile_tvm.errors import UserError
from agile_tvm.quant.apply import QuantizedModel
from agile_tvm.quant.configs import QuantConfig
from agile_tvm.quant.linear import QuantLinear
from agile_tvm.quant.qmodel import QuantizedCausalLM, attention_paths

FORMAT, VERSION = "agile-tvm-qckpt", 2
READABLE_VERSIONS = (1, 2)  # v1 = v2 with every linear at act "tensor" and w_zero "int"
MANIFEST = "agile_quant.json"
TENSORS = "model.safetensors"
_INT_DTYPES = {"wzero": torch.int8, "act_zero": torch.int32, "act_shift": torch.uint8}


def build_manifest(qm: QuantizedModel) -> dict:
    model = qm.model
    cfg = model.qconfig
    scheme = cfg.to_dict()
    pruning = scheme.pop("pruning")
    hf = model.hf
    linears, attention = {}, {}
    for path, mod in hf.named_modules():
        if isinstance(mod, QuantLinear):
            linears[path] = {"in": mod.in_features, "out": mod.out_features, "w_bits": mod.w_bits,
                             "a_bits": mod.a_bits, "group_size": mod.group_size, "bias": mod.bias is not None,
                             "act": mod.act_granularity, "w_zero": mod.w_zero}
    if cfg.attention is not None:
        for path in attention_paths(hf, model.arch):
            attention[path] = {"qk_bits": cfg.attention.qk_bits, "softmax_bits": cfg.attention.softmax_bits,
                               "v_bits": cfg.attention.v_bits}
    return {
        "format": FORMAT, "version": VERSION, "arch": model.arch, "source_model": qm.name,
        "scheme": scheme,
        "pruning": {**pruning, "layers": model.prune_layers, "gamma": model.gamma},
        "calibration": qm.manifest.get("calibration", {}),
        "linears": linears, "attention": attention,
    }


def is_current(ckpt_dir, config_name: str) -> bool:
    """Whether `ckpt_dir` holds what `agile-tvm quantize --config NAME` writes with today's code: this format version
    and this scheme. Scripts reuse a finished checkpoint only then; one quantized by older code (an earlier format or
    scheme of the same config name) is quantized again."""
    from agile_tvm.quant.configs import get_config

    try:
        manifest = json.loads((Path(ckpt_dir) / MANIFEST).read_text())
        if (manifest.get("format"), manifest.get("version")) != (FORMAT, VERSION):
            return False
        stored = QuantConfig.from_dict(manifest["scheme"]).to_dict()  # options added since default to their "off"
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return False
    want = get_config(config_name).to_dict()
    stored.pop("pruning", None)
    want.pop("pruning", None)
    return stored == want


def save_quantized(qm: QuantizedModel, out_dir) -> Path:
    """Write `qm` to `out_dir` (created if needed; an existing non-checkpoint, non-empty folder is refused)."""
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UserError(f"--out {out} is a non-empty folder that is not a quantized checkpoint: give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(qm)
    hf = qm.model.hf
    state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    if getattr(hf.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is not a checkpoint until the new manifest lands
    _atomic(out / TENSORS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    _atomic(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2, default=str)))
    if qm.tokenizer is not None:
        with tempfile.TemporaryDirectory(dir=out, prefix=".tok-") as tmp:
            qm.tokenizer.save_pretrained(tmp)
            for f in Path(tmp).iterdir():
                os.replace(f, out / f.name)
    _atomic(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    return out


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_manifest(ckpt: Path) -> dict:
    path = ckpt / MANIFEST
    if not ckpt.is_dir():
        raise UserError(f"checkpoint folder {ckpt} not found: run `agile-tvm quantize --out {ckpt}` first")
    if not path.is_file():
        raise UserError(f"{ckpt} has no {MANIFEST}: not a quantized checkpoint (or an interrupted save); re-run quantize")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt ({err}): re-run quantize") from err
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise UserError(f"{path}: format {manifest.get('format')} v{manifest.get('version')} is not "
                        f"{FORMAT} v{'/'.join(map(str, READABLE_VERSIONS))}: re-quantize with this agile-tvm")
    for key in ("arch", "scheme", "pruning", "linears", "attention"):
        if key not in manifest:
            raise UserError(f"{path} lacks '{key}': the manifest is corrupt, re-run quantize")
    return manifest


def load_quantized(ckpt_dir) -> QuantizedModel:
    """Rebuild the quantized model from a checkpoint folder; logits equal the saved model's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(ckpt_dir).expanduser()
    manifest = read_manifest(ckpt)
    for name in ("config.json", TENSORS):
        if not (ckpt / name).is_file():
            raise UserError(f"{ckpt} lacks {name}: the checkpoint is incomplete, re-run quantize")
    try:
        config = AutoConfig.from_pretrained(ckpt)
    except (OSError, ValueError) as err:
        raise UserError(f"{ckpt / 'config.json'} is corrupt ({err}): re-run quantize") from err
    try:
        state = load_file(str(ckpt / TENSORS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{ckpt / TENSORS} is corrupt ({err}): re-run quantize") from err
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for path, spec in manifest["linears"].items():
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = hf.get_submodule(parent_path)
        except AttributeError as err:
            raise UserError(f"{MANIFEST} names linear {path}, which this architecture lacks: corrupt manifest") from err
        act, w_zero = spec.get("act", "tensor"), spec.get("w_zero", "int")
        if act not in ("tensor", "token") or w_zero not in ("int", "float"):
            raise UserError(f"{MANIFEST}: linear {path} has act={act!r} w_zero={w_zero!r}; expected act tensor|token "
                            "and w_zero int|float: corrupt manifest, re-run quantize")
        setattr(parent, attr, QuantLinear(spec["in"], spec["out"], spec["w_bits"], spec["a_bits"],
                                          spec["group_size"], spec["bias"], act, w_zero))
    for path in manifest["attention"]:
        attn = hf.get_submodule(path)
        for name in ("q_scale", "k_scale", "v_scale"):
            attn.register_buffer(name, torch.tensor(1.0))
    expected = hf.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in expected if k not in state and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{ckpt / TENSORS} does not match {MANIFEST} ({what}): corrupt checkpoint, re-run quantize")
    for key, tensor in state.items():
        leaf = key.rsplit(".", 1)[-1]
        want = _INT_DTYPES.get(leaf) or (expected[key].dtype if leaf == "qweight" else None)
        if want is not None and tensor.dtype != want:
            raise UserError(f"{key} has dtype {tensor.dtype}, expected {want}: corrupt checkpoint, re-run quantize")
    try:
        hf.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"{ckpt / TENSORS} has tensors of the wrong shape ({str(err)[:200]}): re-run quantize") from err
    if tied and "lm_head" not in manifest["linears"]:
        hf.tie_weights()
    qcfg = QuantConfig.from_dict({**manifest["scheme"], "pruning": {
        k: manifest["pruning"][k] for k in ("beta", "start_layer", "end_layer") if k in manifest["pruning"]}})
    model = QuantizedCausalLM(hf, manifest["arch"], qcfg)
    tokenizer = None
    if (ckpt / "tokenizer.json").is_file() or (ckpt / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    return QuantizedModel(model, tokenizer, manifest["arch"], manifest.get("source_model", ckpt.name), str(ckpt),
                          manifest)

