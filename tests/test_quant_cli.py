"""`agile-tvm quantize` bad inputs: one-line errors naming the problem and the fix, exit code 2, no traceback."""

import json

import pytest

from agile_tvm.cli import main


def _run(capsys, *argv):
    code = main(["quantize", *argv])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv,needle", [
    (["--config", "agileq8", "--w-bits", "3"], "weight bits must be 4 or 8"),
    (["--config", "agileq8", "--a-bits", "2"], "activation bits must be 4 or 8"),
    (["--config", "w4a16-gptq", "--a-bits", "4"], "float activations"),
    (["--config", "w9a9"], "unknown quantization config 'w9a9'"),
    (["--config", "agileq8", "--prune-beta", "1.5"], "prune beta must be in [0, 1)"),
    (["--config", "w8a8", "--smooth", "1.2"], "smoothing quantile must be in [0, 1)"),
    (["--config", "agileq8", "--smooth", "0.9", "--act-granularity", "tensor"], "smoothing is for per-token"),
    (["--config", "agileq8-static", "--scale-grid", "pow2"], "pow2 scale grid needs float weight offsets"),
    (["--config", "fp", "--scale-grid", "pow2"], "float weights"),
])
def test_bad_config_arguments(tmp_path, capsys, argv, needle):
    code, err = _run(capsys, *argv, "--out", str(tmp_path / "o"))
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_smoothing_flags_resolve():
    from agile_tvm.cli import build_parser
    from agile_tvm.commands.quantize import resolve_config

    def cfg(*argv):
        return resolve_config(build_parser().parse_args(["quantize", *argv, "--out", "o"]))

    assert cfg("--config", "w8a8").act.smooth == 0.99
    capped = cfg("--config", "w8a8", "--trip-k", "3").act
    assert (capped.smooth, capped.trip_k, capped.trip) == (0.99, 3, False)
    assert cfg("--config", "w8a8", "--smooth", "0").act.smooth == 0.0
    assert cfg("--config", "agileq8", "--scale-grid", "pow2").weight.scale_grid == "pow2"


def test_missing_model_path(tmp_path, capsys):
    code, err = _run(capsys, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "not found" in err


def test_unsupported_architecture(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (folder / "model.safetensors").write_bytes(b"")
    code, err = _run(capsys, "--model", str(folder), "--out", str(tmp_path / "o"))
    assert code == 2 and "unsupported architecture 'gpt2'" in err


def test_group_size_must_divide():
    from agile_tvm.errors import UserError
    from agile_tvm.quant.quantizers import resolve_group_size

    assert resolve_group_size(-1, 576) == 576
    assert resolve_group_size(64, 576) == 64
    with pytest.raises(UserError, match="does not divide"):
        resolve_group_size(100, 576)
