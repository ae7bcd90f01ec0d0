"""Compiled TVM modules of tiny LLaMA/OPT/BLOOM checkpoints compute what the PyTorch reference of the same
quantized checkpoint computes; the KV-cache path equals the uncached one; bad input gives one-line errors.

Tolerance (logits, |ref| ~ 1): atol 2e-4 + rtol 1e-4, and the same argmax everywhere. Why this is tight and safe:
the integer parts (activation codes, W4A8 accumulators, INT8 Q.K, log2 codes) are computed by the same formulas in
float32 on both sides, so they agree exactly unless a value lands within float32 rounding of a .5 code boundary;
the float parts (norms, RoPE, softmax, epilogue scales, the AttnV sum) differ only by summation order, ~1e-7
relative per op, which after a few layers stays below 1e-5 (measured: <= 4e-7). A single flipped code moves a
logit by ~1e-3..1e-2 and would fail this test, on purpose: the kernels must reproduce the quantizer's codes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from agile_tvm.errors import UserError

CASES = {  # arch -> (scheme, weight method): every architecture, every activation width and weight path
    "llama": ("agileq8", "gptq"),
    "opt": ("agileq4", "rtn"),
    "bloom": ("w8a8", "rtn"),
    "llama-fp": ("fp", None),
}
MAX_LEN = 64


def _quantize(arch_case: str, out_dir):
    from agile_tvm.models import tiny_model
    from agile_tvm.quant.apply import quantize_model
    from agile_tvm.quant.checkpoint import save_quantized
    from agile_tvm.quant.configs import get_config

    arch = arch_case.split("-")[0]
    scheme, method = CASES[arch_case]
    cfg = get_config(scheme)
    if method and cfg.weight is not None:
        cfg.weight.method = method
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    qm = quantize_model(tiny_model(arch), cfg, calib)
    save_quantized(qm, out_dir)
    return out_dir


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(checkpoint dir, exported module dir) per case, compiled for this CPU."""
    from agile_tvm.runtime.export import export

    base = tmp_path_factory.mktemp(request.param)
    ckpt = _quantize(request.param, base / "ckpt")
    out = base / "module"
    export(ckpt, "host", out, max_seq_len=MAX_LEN, log=lambda *a: None)
    return ckpt, out


def _reference_logits(ckpt, ids):
    from agile_tvm.quant.checkpoint import load_quantized

    with torch.no_grad():
        logits, kept = load_quantized(ckpt).model(torch.as_tensor(ids, dtype=torch.long))
    assert bool(kept.all())
    return logits.numpy()


def test_compiled_logits_equal_reference(exported):
    from agile_tvm.runtime import load_module

    ckpt, out = exported
    ids = np.random.RandomState(1).randint(0, 256, (1, 40))
    ref = _reference_logits(ckpt, ids)
    got = load_module(out).forward_logits(ids)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_kv_cache_prefill_decode_equals_full_forward(exported):
    from agile_tvm.runtime import load_module

    _, out = exported
    lm = load_module(out)
    ids = np.random.RandomState(2).randint(0, 256, (1, 20))
    full = lm.forward_logits(ids)[0]
    cache = lm.new_cache()
    last, cache = lm.step(ids[:, :12], 0, cache)
    np.testing.assert_allclose(last, full[11], atol=1e-5, rtol=1e-5)
    for t in range(12, 20):
        last, cache = lm.step(ids[:, t:t + 1], t, cache)
        np.testing.assert_allclose(last, full[t], atol=1e-5, rtol=1e-5)
    tokens, stats = lm.generate(ids[:, :8], max_new_tokens=5)
    assert len(tokens) == 5 and stats["prefill_ms"] > 0


def test_runtime_only_process_loads_module(exported):
    """A fresh process with only libtvm_runtime (TVM_USE_RUNTIME_LIB=1) runs the module: same logits."""
    from agile_tvm.runtime import load_module

    _, out = exported
    ids = np.arange(10)[None] % 256
    want = load_module(out).forward_logits(ids)
    code = ("import sys, numpy as np; from agile_tvm.runtime import load_module; "
            "import tvm.runtime; assert 'tvm.relax' not in sys.modules; "
            f"np.save(sys.argv[1], load_module({str(out)!r}).forward_logits(np.arange(10)[None] % 256))")
    path = out / "rt_logits.npy"
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env, timeout=120)
    np.testing.assert_array_equal(np.load(path), want)


@pytest.fixture(scope="module")
def llama_module(tmp_path_factory):
    from agile_tvm.runtime.export import export

    base = tmp_path_factory.mktemp("errors")
    ckpt = _quantize("llama-fp", base / "ckpt")
    out = base / "module"
    export(ckpt, "host", out, max_seq_len=MAX_LEN, log=lambda *a: None)
    return ckpt, out


def test_prompt_longer_than_compiled_maximum(llama_module):
    from agile_tvm.runtime import load_module

    lm = load_module(llama_module[1])
    with pytest.raises(UserError, match="compiled maximum 64"):
        lm.forward_logits(np.zeros((1, MAX_LEN + 1), np.int64))
    with pytest.raises(UserError, match="compiled maximum 64"):
        lm.generate(np.zeros((1, 60), np.int64), max_new_tokens=10)


def test_missing_weight_file(llama_module, tmp_path):
    import shutil

    from agile_tvm.runtime import load_module

    copy = tmp_path / "module"
    shutil.copytree(llama_module[1], copy)
    (copy / "weights.safetensors").unlink()
    with pytest.raises(UserError, match="weight file .* is missing"):
        load_module(copy)


def test_module_built_for_another_target(llama_module, tmp_path):
    """An aarch64 (Raspberry Pi 4) module refuses to load on this x86 host, naming the target and the fix."""
    import shutil

    from agile_tvm.runtime import load_module
    from agile_tvm.runtime.export import export

    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler (scripts/setup-boards installs it)")
    out = tmp_path / "pi4"
    export(llama_module[0], "pi4", out, max_seq_len=MAX_LEN, log=lambda *a: None)
    assert (out / "model.so").read_bytes()[18] == 0xB7  # ELF e_machine = EM_AARCH64
    with pytest.raises(UserError, match="built for target pi4"):
        load_module(out)


def test_cli_run_with_prompt_ids(llama_module, capsys):
    from agile_tvm.cli import main

    assert main(["run", "--module", str(llama_module[1]), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "4 new tokens" in out
    assert main(["run", "--module", str(llama_module[1]), "--prompt", "hi"]) == 2  # no tokenizer: clear error


def test_export_rejects_a_non_checkpoint(tmp_path):
    from agile_tvm.cli import main

    assert main(["export", "--model", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
