"""Compiled TVM modules of tiny LLaMA/OPT/BLOOM checkpoints compute what the PyTorch reference of the same
quantized checkpoint computes; the KV-cache path equals the uncached one; bad input gives one-line errors.

The cases cover checkpoint contract v2 (per-token activations, float weight offsets, 4-bit activation codes, 8-bit
weights) and v1 (a static-scale checkpoint whose manifest is rewritten exactly as v1 wrote it).

Tolerance (logits, |ref| ~ 1): atol 2e-4 + rtol 1e-4, and the same argmax everywhere. Why this is tight and safe:
the integer parts (activation codes, W4A8 accumulators, INT8 Q.K, log2 codes) are computed by the same formulas in
float32 on both sides, so they agree exactly unless a value lands within float32 rounding of a .5 code boundary;
the float parts (norms, RoPE, softmax, epilogue scales, the AttnV sum) differ only by summation order, ~1e-7
relative per op, which after a few layers stays below 1e-5 (measured: <= 4e-7). A single flipped code moves a
logit by ~1e-3..1e-2 and would fail this test, on purpose: the kernels must reproduce the quantizer's codes.

Teacher forcing at the activation quantizers. With v2's per-token scales a flip is no longer rare: a row's scale
comes from its extremes, and the attention output feeding o_proj lies on a lattice (v_scale * pmax * integer /
2^14), so its codes often sit exactly on a .5 boundary that an ulp of difference in the attention output (torch's
exp and summation order vs the kernel's) decides. Measured: tiny LLaMA agileq8 and OPT agileq4 each had one row of
one o_proj input with a different scale (inputs equal to 6e-8), moving logits by 5e-3; the kernels given the same
input matched the reference to 4e-7. So the reference runs with every quantized linear (and LLaMA's attention) fed
the compiled graph's own input (tapped from forward_all), after checking that input against its own to 1e-5 of its
largest value (so a wrong graph still fails), and the logits must then meet the tight tolerance above. The exported
module's logits equal the tapped build's bit for bit (same kernels, same graph).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from agile_tvm.errors import UserError

CASES = {  # arch[-variant] -> (scheme, weight method): every architecture, activation width and weight path
    "llama": ("agileq8", "gptq"),
    "opt": ("agileq4", "rtn"),
    "bloom": ("w8a8", "rtn"),
    "llama-fp": ("fp", None),
    "llama-v1": ("agileq8-static", "gptq"),
    "opt-w4a16": ("w4a16-rtn", "rtn"),
    "llama-fgrid": ("agileq8", "gptq"),  # free float scales (not the pow2 grid): prefill on the float-epilogue GEMM
}
# case -> (manifest version, {(act, w_zero, a_bits) of its linears}): what each case exercises in the frontend
# (("token", "int", 8): agileq8/agileq4's INT8 LM head, 8-bit symmetric weights)
EXPECTED_LINEARS = {
    "llama": (2, {("token", "float", 8), ("token", "int", 8)}),
    "opt": (2, {("token", "float", 8), ("token", "float", 4), ("token", "int", 8)}),
    "bloom": (2, {("token", "float", 8)}),
    "llama-fp": (2, set()),
    "llama-v1": (1, {("tensor", "int", 8)}),
    "opt-w4a16": (2, {("tensor", "float", 0)}),
    "llama-fgrid": (2, {("token", "float", 8), ("token", "int", 8)}),
}
MAX_LEN = 64
# case -> how its module stores the embedding (`GraphBuilder.embed`); the table is prepared so before quantizing
EMBEDDING_STORAGE = {
    "llama": "head codes",  # a tied table already on the INT8 head's grid, as SmolLM2's Q8_0 embedding
    "llama-fgrid": "bfloat16",  # a table saved from bfloat16 weights
    "opt": "float32",  # random float32
}


def _prepare_embedding(weight, storage: str) -> None:
    """Put the (tied) embedding table on the grid `storage` names, in place."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if storage == "head codes":  # Q8_0: symmetric blocks of 32, float16 scales, one code at +-127 per block
            v, k = weight.shape
            q = torch.randint(-127, 128, (v, k // 32, 32), generator=g).float()
            q[..., 0] = 127.0 * torch.sign(q[..., 0] + 0.5)
            d = (torch.rand(v, k // 32, 1, generator=g) * 4e-4 + 1e-4).half().float()
            weight.copy_((q * d).reshape(v, k))
        elif storage == "bfloat16":
            weight.copy_(weight.bfloat16().float())


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
    if arch_case.endswith("-fgrid"):
        cfg.weight.scale_grid = "float"
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    loaded = tiny_model(arch)
    if arch_case in EMBEDDING_STORAGE:
        _prepare_embedding(loaded.model.get_input_embeddings().weight, EMBEDDING_STORAGE[arch_case])
    qm = quantize_model(loaded, cfg, calib)
    save_quantized(qm, out_dir)
    if arch_case.endswith("-v1"):
        _rewrite_as_v1(out_dir)
    return out_dir


def _rewrite_as_v1(ckpt_dir):
    """Turn a checkpoint with only v1 options (static per-tensor activations, integer zero points) into exactly what
    the v1 quantizer wrote: version 1, no per-linear `act` / `w_zero` keys."""
    path = ckpt_dir / "agile_quant.json"
    manifest = json.loads(path.read_text())
    for info in manifest["linears"].values():
        assert (info.pop("act", "tensor"), info.pop("w_zero", "int")) == ("tensor", "int")
    manifest["version"] = 1
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(checkpoint dir, exported module dir) per case, compiled for this CPU."""
    from agile_tvm.runtime.export import export

    base = tmp_path_factory.mktemp(request.param)
    ckpt = _quantize(request.param, base / "ckpt")
    out = base / "module"
    export(ckpt, "host", out, max_seq_len=MAX_LEN, log=lambda *a: None)
    return ckpt, out


def tapped_forward(ckpt, max_len: int, **build_options):
    """forward_all of `ckpt` built in process with taps: ids -> (logits, {name: tapped value}), e.g. "P:in" (input of
    integer linear P) and, for LLaMA, "model.layers.i:q" / ":k" / ":v" (attention inputs after RoPE). With token
    pruning (`build_options` prune_beta / prune_start, or the checkpoint's schedule) the taps also hold "kept" (the
    positions that reached the last layer), "layer<l>:kept" and "<attention>:first_probs"."""
    import tvm
    from tvm import relax

    from agile_tvm.frontend import build_module
    from agile_tvm.frontend.compile import compile_relax
    from agile_tvm.targets import get_target

    target = get_target("host")
    from agile_tvm.prune_schedule import schedule_counts

    mod, weights, meta = build_module(ckpt, max_seq_len=max_len, target=target, taps=True, **build_options)
    pruning = meta["pruning"]
    vm = relax.VirtualMachine(compile_relax(mod, target, "host")[0], tvm.cpu())
    params = [tvm.runtime.tensor(w) for w in weights.values()]

    def run(ids):
        ids = np.asarray(ids, np.int32)
        counts = []
        if pruning:
            per_layer = schedule_counts(ids.shape[1], meta["num_layers"], pruning["layers"], pruning["gamma"])
            counts = [tvm.runtime.tensor(np.array([per_layer[i] for i in pruning["layers"]], np.int64))]
        out = vm["forward_all"](tvm.runtime.tensor(ids), tvm.runtime.tensor(np.arange(ids.shape[1], dtype=np.int32)),
                                *counts, *params)
        arrays = [t.numpy() for t in out] if meta["taps"] or pruning else [out.numpy()]
        names = (["kept"] if pruning else []) + meta["taps"]
        return arrays[0], dict(zip(names, arrays[1:]))

    return run


@pytest.fixture(scope="module")
def tapped(exported):
    return tapped_forward(exported[0], MAX_LEN)


FORCED_SUFFIXES = (":in", ":q", ":k", ":v")  # quantization points the reference can be fed: linear and attention inputs


def _close_to(own: np.ndarray, want: np.ndarray, key: str) -> None:
    assert np.abs(own - want).max() <= 1e-5 * np.abs(want).max(), (key, np.abs(own - want).max())


def _reference_logits(ckpt, ids, forced: dict | None = None):
    """The PyTorch reference's logits. With `forced` (taps of the compiled forward_all), every quantization point it
    names gets the compiled graph's value instead of its own, after checking the two agree to 1e-5 of the value's
    largest entry: each quantized linear's input ("P:in") and, for LLaMA, the attention's Q, K, V after RoPE."""
    from agile_tvm.quant.checkpoint import load_quantized

    logits, kept, _ = reference_forward(load_quantized(ckpt).model, ids, forced)
    assert bool(kept.all())
    return logits


def reference_forward(model, ids, forced: dict | None = None):
    """(logits, kept mask, pruning scores: one [n] array per attention call) of a QuantizedCausalLM, with the
    quantization points `forced` names fed the compiled graph's values (see `_reference_logits`)."""
    import agile_tvm.quant.attention as qattn
    from agile_tvm.quant.linear import QuantLinear

    forced = {k: v for k, v in (forced or {}).items() if k.endswith(FORCED_SUFFIXES)}
    used, scores, hooks = [], [], []
    for name, mod in model.named_modules():
        key = next((k for k in forced if k.endswith(":in") and (name == k[:-3] or name.endswith("." + k[:-3]))), None)
        if not isinstance(mod, QuantLinear) or not mod.a_bits or key is None:
            continue

        def force(_, args, key=key):
            want = forced[key]
            _close_to(args[0].detach().reshape(want.shape).numpy(), want, key)
            used.append(key)
            return (torch.from_numpy(want).reshape(args[0].shape),)

        hooks.append(mod.register_forward_pre_hook(force))

    core = qattn.attention_core

    def forced_core(attn, q, k, v, *args, **kwargs):
        """q [1, H, n, D], k/v [1, H, n, D] with KV heads repeated; taps are [n, H or KVH, D]."""
        prefix = f"model.layers.{attn.layer_idx}:"
        if prefix + "q" in forced:
            new = []
            for name, x in (("q", q), ("k", k), ("v", v)):
                want = forced[prefix + name].transpose(1, 0, 2)
                want = np.repeat(want, x.shape[1] // want.shape[0], axis=0)[None]
                _close_to(x.detach().numpy(), want, prefix + name)
                used.append(prefix + name)
                new.append(torch.from_numpy(np.ascontiguousarray(want)))
            q, k, v = new
        out, score = core(attn, q, k, v, *args, **kwargs)
        scores.append(score[0].numpy())
        return out, score

    qattn.attention_core = forced_core
    try:
        with torch.no_grad():
            logits, kept = model(torch.as_tensor(ids, dtype=torch.long))
    finally:
        qattn.attention_core = core
        for hook in hooks:
            hook.remove()
    assert sorted(used) == sorted(forced)  # every tapped quantization point was compared and forced once
    return logits.numpy(), kept.numpy(), scores


def test_case_exercises_its_checkpoint_options(exported, request):
    """Each case reads the contract options it is named for (so a changed config cannot silently drop coverage)."""
    ckpt, _ = exported
    version, options = EXPECTED_LINEARS[request.node.callspec.params["exported"]]
    manifest = json.loads((ckpt / "agile_quant.json").read_text())
    found = {(i.get("act", "tensor"), i.get("w_zero", "int"), i["a_bits"]) for i in manifest["linears"].values()}
    assert (manifest["version"], found) == (version, options)


def test_compiled_logits_equal_reference(exported, tapped):
    from agile_tvm.runtime import load_module

    ckpt, out = exported
    ids = np.random.RandomState(1).randint(0, 256, (1, 40))
    got = load_module(out).forward_logits(ids)
    logits, taps = tapped(ids)
    np.testing.assert_array_equal(got, logits)
    ref = _reference_logits(ckpt, ids, forced=taps)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("exported", list(EMBEDDING_STORAGE), indirect=True)
def test_embedding_is_stored_once_and_no_wider_than_exact(exported, request):
    """The module stores the embedding as `EMBEDDING_STORAGE` says (the logits test above shows its rows are
    right): no float table when the INT8 head's codes reproduce it, 16 bits when exact, else float32."""
    case = request.node.callspec.params["exported"]
    _, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    specs = dict(zip(manifest["weights"], manifest["weight_specs"]))
    tables = {name: dtype for name, (_, dtype) in specs.items() if "embed_tokens" in name}
    expected = {"head codes": {},
                "bfloat16": {"model.embed_tokens.weight.bfloat16": "uint16"},
                "float32": {"model.decoder.embed_tokens.weight": "float32"}}[EMBEDDING_STORAGE[case]]
    assert tables == expected
    if not expected:
        assert "lm_head.wpack" in specs  # the codes it reads instead


@pytest.mark.parametrize("exported", ["llama", "opt"], indirect=True)
def test_manifest_counts_the_weight_bytes_a_decode_step_reads(exported):
    """decode_weight_bytes (what `agile-tvm bench` turns into GB/s) is every stored weight except the tables
    decode only gathers rows from (RoPE, a float embedding) and the integer-scale GEMM's chunk sums, which only
    prefill reads (its grid codes c8/dt/srow serve the decode GEMV too, which then reads no float scale tables:
    they are not stored)."""
    _, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    names = set(manifest["weights"])
    expected = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                   for name, (shape, dtype) in zip(manifest["weights"], manifest["weight_specs"])
                   if not name.startswith("rope.") and "embed_" not in name and not name.endswith(".zc"))
    grid = [name[:-len(".c8")] for name in names if name.endswith(".c8")]
    assert grid  # the exclusion above is exercised
    assert not [name for name in names if name.startswith(tuple(g + ".wscale" for g in grid))]
    assert manifest["decode_weight_bytes"] == expected


def _attention_rows(func) -> list:
    """The query rows of every attention kernel call in a Relax function, in order (ints when static)."""
    from tvm import relax

    rows = []
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op.name == "relax.call_tir" and v.args[0].name_hint.startswith(
                    "attention"):
                ty = b.var.ty
                ty = ty.fields[0] if isinstance(ty, relax.TupleType) else ty
                rows.append(ty.shape[0])
    return rows


@pytest.mark.parametrize("case", ["llama", "opt", "bloom"])
def test_prefill_runs_its_last_layer_on_the_last_row(case, tmp_path):
    """prefill returns the last token's logits only, so its last decoder layer keeps only the last query (all keys
    still go to the cache): 1 query row there, every row in the layers before; forward_all keeps every row."""
    from tvm.tirx import IntImm

    from agile_tvm.frontend import build_module

    mod, _, meta = build_module(_quantize(case, tmp_path / "ckpt"), max_seq_len=MAX_LEN)
    rows = _attention_rows(mod["prefill"])
    assert len(rows) == meta["num_layers"]
    assert [isinstance(r, IntImm) and int(r) == 1 for r in rows] == [False] * (len(rows) - 1) + [True]
    assert not any(isinstance(r, IntImm) for r in _attention_rows(mod["forward_all"]))


@pytest.mark.parametrize("case,used", [("llama", True), ("opt", True), ("llama-fgrid", False)])
def test_integer_scale_gemm_runs_where_the_scales_are_on_the_grid(case, used, tmp_path):
    """A checkpoint quantized with scale_grid "pow2" (agileq8/agileq4) runs its prefill linears on the integer-scale
    GEMM (kernels/int_scales.py); one with free float scales keeps the float-epilogue GEMM. Decode keeps its GEMV."""
    from tvm import relax

    from agile_tvm.frontend import build_module

    mod, _, _ = build_module(_quantize(case, tmp_path / "ckpt"), max_seq_len=MAX_LEN)
    calls = {fn: {b.value.args[0].name_hint for block in mod[fn].body.blocks for b in block.bindings
                  if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"}
             for fn in ("prefill", "decode")}
    assert any("intscale" in n for n in calls["prefill"]) == used
    assert not any("intscale" in n for n in calls["decode"])


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


def test_weight_file_of_another_export(llama_module, tmp_path):
    """The compiled functions do not check their weights at each call (`num_input`): the runtime checks them once at
    load against the manifest, so a weight file with a tensor of another shape is refused by name."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from agile_tvm.runtime import load_module

    copy = tmp_path / "module"
    shutil.copytree(llama_module[1], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    name = manifest["weights"][0]
    arrays = load_file(str(copy / "weights.safetensors"))
    arrays[name] = np.concatenate([arrays[name], arrays[name]])
    save_file(arrays, str(copy / "weights.safetensors"))
    with pytest.raises(UserError, match=f"weight '{re.escape(name)}' .* belongs to another export"):
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


def test_unknown_version_or_linear_option_is_a_clear_error(llama_module, tmp_path):
    import shutil

    from agile_tvm.frontend.checkpoint import linear_spec, load_checkpoint

    copy = tmp_path / "ckpt"
    shutil.copytree(llama_module[0], copy)
    path = copy / "agile_quant.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "version": 3}))
    with pytest.raises(UserError, match="v3; this frontend reads agile-tvm-qckpt v1 and v2"):
        load_checkpoint(copy)
    path.write_text(json.dumps({**manifest, "linears": {"lin": {"act": "channel", "w_zero": "int"}}}))
    with pytest.raises(UserError, match="linear lin has act 'channel'"):
        linear_spec(load_checkpoint(copy), "lin")


def test_export_rejects_a_non_checkpoint(tmp_path):
    from agile_tvm.cli import main

    assert main(["export", "--model", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
