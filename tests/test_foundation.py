"""Model loading, corpora, the calibration/evaluation split, perplexity and the CLI's error handling."""

import json
import math
import subprocess
import sys

import pytest
import torch

from agile_tvm import corpus, models
from agile_tvm.errors import UserError
from agile_tvm.eval import hf_forward_fn, perplexity


def test_eval_windows_never_reach_the_calibration_region():
    tokens = torch.arange(10_000)
    windows = corpus.eval_windows(tokens, 100, exclude_calibration=True)
    calib_start = corpus.calibration_start(len(tokens))
    assert windows.max().item() < calib_start
    assert windows.shape == (calib_start // 100, 100)
    # without the exclusion every whole window is used
    assert corpus.eval_windows(tokens, 100).shape == (100, 100)
    assert corpus.eval_windows(tokens, 100, max_windows=7).shape == (7, 100)


def test_eval_window_errors():
    tokens = torch.arange(50)
    with pytest.raises(UserError, match="fewer than one window"):
        corpus.eval_windows(tokens, 2048)
    with pytest.raises(UserError, match="too short"):
        corpus.eval_windows(tokens, 1)


def test_text_file_corpus_and_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        corpus.load_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        corpus.load_text(str(empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc\xff")
    with pytest.raises(UserError, match="UTF-8"):
        corpus.load_text(str(binary))


def test_model_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        models.load_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        models.load_model(str(tmp_path))
    pickled = tmp_path / "pickled"
    models.tiny_model("opt").model.config.save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="pickled"):
        models.load_model(str(pickled))


def test_hf_folder_roundtrip_for_each_arch(tmp_path):
    for arch in models.SUPPORTED_ARCHS:
        tiny = models.tiny_model(arch, seed=1)
        folder = tmp_path / arch
        tiny.model.save_pretrained(folder)
        loaded = models.load_model(str(folder))
        assert loaded.arch == arch
        ids = torch.randint(0, 256, (1, 9))
        with torch.no_grad():
            assert torch.equal(tiny.model(ids).logits, loaded.model(ids).logits)


def test_perplexity_of_a_known_distribution():
    vocab = 8

    def uniform(ids):
        return torch.zeros(1, ids.shape[1], vocab)

    windows = torch.randint(0, vocab, (3, 17))
    result = perplexity(uniform, windows, progress=False)
    assert math.isclose(result["ppl"], vocab, rel_tol=1e-6)  # float32 cross entropy
    assert result["tokens"] == 3 * 16

    def pruned(ids):  # a mask drops half the labels; the logits for those are made bad
        logits = torch.zeros(1, ids.shape[1], vocab)
        kept = torch.ones(1, ids.shape[1], dtype=torch.bool)
        kept[0, ::2] = False
        logits[0, ::2, 0] = -30.0  # token 0 made unlikely where pruned
        return logits, kept

    res = perplexity(pruned, windows, progress=False)
    assert math.isclose(res["ppl_pruned_labels_dropped"], vocab, rel_tol=1e-6)  # float32 cross entropy
    assert res["tokens_scored_pruned_protocol"] == 3 * 8

    def confident_on_odd_labels(ids):  # a reference that is right exactly where the pruned run kept the label
        logits = torch.zeros(1, ids.shape[1], vocab)
        logits[0, 1::2].scatter_(1, ids[0, 2::2].unsqueeze(1)[: logits[0, 1::2].shape[0]], 30.0)
        return logits

    fair = perplexity(pruned, windows, progress=False, reference_fn=confident_on_odd_labels)
    assert math.isclose(fair["ppl_reference_on_kept"], 1.0, rel_tol=1e-6)  # scored only on the kept labels
    assert "ppl_reference_on_kept" not in res


def test_rdata_reads_austen_and_handbook_is_prose():
    austen = corpus.load_text("austen")
    assert austen.startswith("SENSE AND SENSIBILITY")
    assert "Persuasion" in austen[-2_000_000:] or "PERSUASION" in austen
    assert len(austen.split()) > 600_000
    handbook = corpus.load_text("handbook")
    assert "Debian" in handbook and "<div" not in handbook
    assert len(handbook.split()) > 100_000


def test_smollm2_loads_and_predicts_the_handbook():
    lm = models.load_model("smollm2-135m")
    assert lm.arch == "llama" and lm.model.config.num_hidden_layers == 30
    tokens = corpus.token_stream(lm.tokenizer, "handbook")
    assert 200_000 < len(tokens) < 220_000
    windows = corpus.eval_windows(tokens, 256, max_windows=2)
    result = perplexity(hf_forward_fn(lm.model), windows, progress=False)
    assert 5 < result["ppl"] < 60  # a real LM on English prose; a broken load gives thousands


def test_calibration_samples_are_reproducible_and_disjoint_from_eval():
    lm = models.load_model("smollm2-135m")
    a = corpus.calibration_samples(lm.tokenizer, 3, 512, seed=5)
    b = corpus.calibration_samples(lm.tokenizer, 3, 512, seed=5)
    assert torch.equal(a, b) and a.shape == (3, 512)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "agile_tvm.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    out = _cli("eval", "--model", str(tmp_path / "missing"), "--max-windows", "1")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "not found" in out.stderr.strip().splitlines()[-1]
    out = _cli("eval", "--model", "smollm2-135m", "--seq-len", "100000", "--max-windows", "1")
    assert out.returncode == 2 and "exceeds the model's maximum of 8192" in out.stderr
