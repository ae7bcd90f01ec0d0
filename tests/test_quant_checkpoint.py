"""quantize -> save -> load -> identical logits (tiny LLaMA/OPT/BLOOM); corrupt checkpoints give one-line errors."""

import json

import pytest
import torch

from agile_tvm.errors import UserError
from agile_tvm.models import tiny_model
from agile_tvm.quant.apply import quantize_model
from agile_tvm.quant.checkpoint import MANIFEST, TENSORS, load_quantized, save_quantized
from agile_tvm.quant.configs import get_config
from agile_tvm.quant.linear import QuantLinear
from agile_tvm.quant.qmodel import QuantizedCausalLM




@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "opt", "bloom"])
def test_fp_forward_equals_hugging_face(arch):
    lm = tiny_model(arch)
    ids = torch.randint(0, 256, (2, 33))
    logits, kept = QuantizedCausalLM(lm.model, arch, get_config("fp"))(ids)
    torch.testing.assert_close(logits, lm.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert kept.all()


@pytest.mark.parametrize("arch,config", [("llama", "agileq8"), ("opt", "agileq4"), ("bloom", "agileq8"),
                                         ("llama", "w4a16-gptq"), ("opt", "w8a8")])
def test_quantize_save_load_same_logits(tmp_path, calib, arch, config):
    lm = tiny_model(arch)
    cfg = get_config(config)
    cfg.pruning.beta = 0.3 if config == "agileq8" else 0.0
    cfg.pruning.start_layer = 1
    qm = quantize_model(lm, cfg, calib, calibration={"corpus": "random", "samples": 4, "seq_len": 48, "seed": 1})
    ids = torch.randint(0, 256, (2, 40))
    before, kept_before = qm.model(ids)
    save_quantized(qm, tmp_path / "ck")
    loaded = load_quantized(tmp_path / "ck")
    after, kept_after = loaded.model(ids)
    assert torch.equal(before, after)
    assert torch.equal(kept_before, kept_after)
    manifest = json.loads((tmp_path / "ck" / MANIFEST).read_text())
    assert manifest["format"] == "agile-tvm-qckpt" and manifest["arch"] == arch
    assert manifest["scheme"]["name"] == config
    n_linears = {"llama": 7, "opt": 6, "bloom": 4}[arch] * 2
    head = config in ("agileq8", "agileq4")  # an INT8 LM head (its own copy when tied to the embedding)
    assert len(manifest["linears"]) == n_linears + head
    assert ("lm_head" in manifest["linears"]) == head
    assert all(isinstance(m, QuantLinear) for n, m in loaded.model.hf.named_modules() if n in manifest["linears"])
    if config == "agileq8":
        assert manifest["pruning"]["layers"] == [1] and kept_before.sum() < kept_before.numel()
        assert len(manifest["attention"]) == 2
    # the quantized model is not the float one: the float model passed in is left untouched
    assert not isinstance(lm.model.get_submodule(next(iter(manifest["linears"]))), QuantLinear)


def test_checkpoint_tensors_follow_the_contract(tmp_path, calib):
    from safetensors.torch import load_file

    p = "model.layers.0.mlp.down_proj"
    # v1 tensors: the paper's static scheme
    save_quantized(quantize_model(tiny_model("llama"), get_config("agileq8-static"), calib), tmp_path / "v1")
    t = load_file(str(tmp_path / "v1" / TENSORS))
    assert t[f"{p}.qweight"].dtype == torch.uint8 and t[f"{p}.qweight"].shape == (64, 64)
    assert t[f"{p}.wscale"].dtype == torch.float32 and t[f"{p}.wzero"].dtype == torch.int8
    assert t[f"{p}.act_scale"].shape == () and t[f"{p}.act_zero"].dtype == torch.int32
    assert t[f"{p}.act_shift"].dtype == torch.uint8 and int(t[f"{p}.act_shift"].max()) <= 6
    assert f"{p}.wmin" not in t
    assert "model.layers.1.self_attn.q_scale" in t and "model.embed_tokens.weight" in t
    # v2: float offsets, per-token activations (no stored activation scale), no TRIP in the default config
    save_quantized(quantize_model(tiny_model("llama"), get_config("agileq8"), calib), tmp_path / "v2")
    t = load_file(str(tmp_path / "v2" / TENSORS))
    assert t[f"{p}.wmin"].dtype == torch.float32 and t[f"{p}.wmin"].shape == (64, 128 // 32)
    assert int(t[f"{p}.wzero"].abs().max()) == 0
    assert f"{p}.act_scale" not in t and f"{p}.act_zero" not in t and int(t[f"{p}.act_shift"].max()) == 0
    spec = json.loads((tmp_path / "v2" / MANIFEST).read_text())["linears"][p]
    assert spec["act"] == "token" and spec["w_zero"] == "float" and spec["group_size"] == 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory, calib):
    path = tmp_path_factory.mktemp("ckpt") / "ck"
    save_quantized(quantize_model(tiny_model("opt"), get_config("agileq8"), calib), path)
    return path


def _copy(saved, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_quantized(tmp_path / "nope")


def test_folder_without_manifest(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    (ck / MANIFEST).unlink()
    with pytest.raises(UserError, match="not a quantized checkpoint"):
        load_quantized(ck)


def test_truncated_tensors(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    data = (ck / TENSORS).read_bytes()
    (ck / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_quantized(ck)


def test_manifest_with_wrong_version_or_garbage(saved, tmp_path):
    ck = _copy(saved, tmp_path)
    m = json.loads((ck / MANIFEST).read_text())
    m["version"] = 99
    (ck / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UserError, match="re-quantize"):
        load_quantized(ck)
    (ck / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_quantized(ck)


def test_tensor_missing_from_file(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = _copy(saved, tmp_path)
    t = load_file(str(ck / TENSORS))
    del t["model.decoder.layers.0.fc1.wmin"]
    save_file(t, str(ck / TENSORS))
    with pytest.raises(UserError, match="missing"):
        load_quantized(ck)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, calib):
    (tmp_path / "precious.txt").write_text("keep me")
    qm = quantize_model(tiny_model("bloom"), get_config("w4a16-rtn"), calib)
    with pytest.raises(UserError, match="non-empty folder"):
        save_quantized(qm, tmp_path)


def test_is_current_tells_a_checkpoint_older_code_made(saved, tmp_path):
    """Scripts reuse a finished checkpoint only if today's `quantize --config NAME` would write the same: not one of
    another config, an older format version, or a missing/corrupt manifest. A scheme that lacks an option added since
    (its default, off) is still current: re-quantizing would change nothing."""
    from agile_tvm.quant.checkpoint import is_current

    assert is_current(saved, "agileq8") and not is_current(saved, "agileq4")
    ck = _copy(saved, tmp_path)
    manifest = json.loads((ck / MANIFEST).read_text())
    del manifest["scheme"]["act"]["smooth"]  # written by today's code; checkpoints from before lack it
    (ck / MANIFEST).write_text(json.dumps(manifest))
    assert is_current(ck, "agileq8")
    (ck / MANIFEST).write_text(json.dumps({**manifest, "version": manifest["version"] - 1}))
    assert not is_current(ck, "agileq8")
    (ck / MANIFEST).write_text("{not json")
    assert not is_current(ck, "agileq8") and not is_current(tmp_path / "nope", "agileq8")
