"""The end-to-end benchmark: the record schema the issue fixes, interleaved rounds, and the llama.cpp peer's
llama-bench output parsed (with a stand-in binary: the real one is built by scripts/setup-llamacpp)."""

import json
import os
import stat

import pytest

from agile_tvm.errors import UserError
from agile_tvm.models import tiny_model
from agile_tvm.runtime import bench, llama_cpp

FIELDS = {"target", "model", "impl", "config", "tokens", "prefill_ms", "decode_tok_s", "size_mb"}


def test_torch_peer_records_have_the_schema_and_decode_on_the_shortest_prompt():
    model = tiny_model("llama").model
    engine = bench.torch_engine("torch", model, [16, 8], 3, 1.5, "tiny-llama")
    records = bench.run_rounds([engine], rounds=3)
    assert [r["tokens"] for r in records] == [16, 8]
    for r in records:
        assert FIELDS <= set(r) and r["impl"] == "torch" and r["config"] == "fp32" and r["prefill_ms"] > 0
        assert len(r["prefill_ms_rounds"]) == 3
    by_len = {r["tokens"]: r for r in records}
    assert by_len[8]["decode_tok_s"] > 0 and by_len[16]["decode_tok_s"] is None


def test_rounds_interleave_engines_and_report_medians():
    calls = []

    def engine(name, ms):
        it = iter(ms)
        return bench.Engine(name, {"impl": name}, lambda n: (calls.append((name, n)), next(it))[1],
                            lambda: (calls.append((name, "decode")), 10.0)[1], [4])

    records = bench.run_rounds([engine("a", [5.0, 1.0, 9.0]), engine("b", [2.0, 3.0, 4.0])], rounds=3,
                               warmup=False)
    assert calls[:4] == [("a", 4), ("a", "decode"), ("b", 4), ("b", "decode")]  # one of each per round
    assert [r["prefill_ms"] for r in records] == [5.0, 3.0]
    assert records[0]["prefill_ms_rounds"] == [5.0, 1.0, 9.0]


def test_round_ratios_pair_the_rounds():
    # torch is 2x slower than tvm in every round although both drift: the per-round ratio stays 2.0, while the
    # fastest peer (torch-int8 by median) and the fastest decoder (Q8_0) and Q4_1 are named
    def rec(impl, config, prefill, decode=None):
        return {"impl": impl, "config": config, "tokens": 8, "size_mb": 1.0, "prefill_ms": sorted(prefill)[1],
                "prefill_ms_rounds": prefill, "decode_tok_s": decode and sorted(decode)[1],
                "decode_tok_s_rounds": decode}

    records = [rec("torch", "fp32", [20.0, 40.0, 80.0]), rec("torch-int8", "int8", [15.0, 30.0, 45.0]),
               rec("llama.cpp", "Q8_0", [50.0, 50.0, 50.0], [100.0, 100.0, 100.0]),
               rec("llama.cpp", "Q4_1", [90.0, 90.0, 90.0], [50.0, 80.0, 100.0]),
               rec("tvm", "agileq8", [10.0, 20.0, 40.0], [100.0, 120.0, 150.0])]
    table = bench.format_table(records).splitlines()
    assert table[0].startswith("| engine |") and len(table) == 2 + len(records)
    assert "| tvm agileq8 |" in table[-1] and "2.00x torch" in table[-1]
    lines = bench.round_ratios(records)
    assert lines[0] == ("tvm agileq8 prefill 8, per round: 2.00x (2.00-2.00) torch fp32, "
                        "1.50x (1.12-1.50) torch-int8 int8")
    assert lines[1] == ("tvm agileq8 decode, per round: 1.20x (1.00-1.50) llama.cpp Q8_0, "
                        "1.50x (1.50-2.00) llama.cpp Q4_1")


@pytest.fixture
def fake_llama_bench(tmp_path, monkeypatch):
    """A llama-bench stand-in that prints one JSON result the way the real one does (`-o json`)."""
    monkeypatch.setenv("AGILE_TVM_CACHE", str(tmp_path))
    bin_dir = tmp_path / "llama.cpp" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "llama-bench"
    script.write_text("#!/usr/bin/env python3\nimport json, sys\na = sys.argv\n"
                      "p, n = int(a[a.index('-p') + 1]), int(a[a.index('-n') + 1])\n"
                      "ns = 250e6 if p else 500e6\n"
                      "print(json.dumps([{'n_prompt': p, 'n_gen': n, 'avg_ns': ns, 'avg_ts': (p or n) / ns * 1e9}]))\n")
    (bin_dir / "llama-quantize").write_text("#!/bin/sh\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return llama_cpp.find_binaries()


def test_llama_bench_output_is_parsed(fake_llama_bench, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert llama_cpp.prefill_ms(fake_llama_bench, gguf, 512, 2) == pytest.approx(250.0)
    assert llama_cpp.decode_tok_s(fake_llama_bench, gguf, 32, 128, 2) == pytest.approx(64.0)


def test_llama_cpp_failures_name_the_tool(fake_llama_bench, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="llama-quantize could not make Q8_0"):
        llama_cpp.gguf_for("Q8_0", fake_llama_bench)
    assert not list((tmp_path / "llama.cpp").glob("*.tmp*"))  # nothing half-written left behind
    monkeypatch.setenv("AGILE_TVM_CACHE", str(tmp_path / "empty"))
    assert llama_cpp.find_binaries() is None and bench.llama_cpp_engines([8], 4) == []


def test_code_fingerprint_follows_the_kernel_sources(tmp_path):
    # bench_ppl.py re-exports a cached module whose manifest "code" differs: the fingerprint must change when a
    # kernel or frontend source changes, and only then
    import shutil
    from pathlib import Path

    from agile_tvm.runtime.export import code_fingerprint

    src = Path(__file__).resolve().parents[1] / "agile_tvm"
    for sub in ("kernels", "frontend"):
        shutil.copytree(src / sub, tmp_path / sub, ignore=shutil.ignore_patterns("__pycache__"))
    first = code_fingerprint(tmp_path)
    assert first == code_fingerprint(tmp_path) == code_fingerprint()
    (tmp_path / "README.txt").write_text("not a source")
    assert code_fingerprint(tmp_path) == first
    f = tmp_path / "kernels" / "linear.py"
    f.write_text(f.read_text() + "\n# changed\n")
    assert code_fingerprint(tmp_path) != first


def test_module_is_current_reads_the_manifest_code(tmp_path):
    # scripts/quickstart and bench_ppl.py reuse a module folder only when its manifest's "code" is today's
    from agile_tvm.runtime.export import code_fingerprint, module_is_current

    assert not module_is_current(tmp_path / "none")
    (tmp_path / "manifest.json").write_text(json.dumps({"code": code_fingerprint()}))
    assert module_is_current(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"code": "0123456789abcdef"}))
    assert not module_is_current(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"library": "model.so"}))  # exported before "code" existed
    assert not module_is_current(tmp_path)
    (tmp_path / "manifest.json").write_text("{cut")
    assert not module_is_current(tmp_path)


def test_decode_depth_reaches_every_engine(fake_llama_bench, monkeypatch):
    """--decode-depth: torch prefills that many tokens before timing decode, llama-bench gets it as -d, and a
    depth below 1 is refused before anything loads."""
    seen = []
    monkeypatch.setattr(bench, "_torch_decode_rate",
                        lambda model, ids, steps: seen.append(("torch", ids.shape[1])) or 1.0)
    monkeypatch.setattr(llama_cpp, "decode_tok_s",
                        lambda b, g, n, depth, threads: seen.append(("llama.cpp", depth)) or 1.0)
    bench.torch_engine("torch", tiny_model("llama").model, [8], 3, 1.0, "tiny-llama", depth=5).decode()
    engines = bench.llama_cpp_engines([8], 4, quants=("Q4_1",), depth=7)
    assert len(engines) == 1
    engines[0].decode()
    assert seen == [("torch", 5), ("llama.cpp", 7)]
    with pytest.raises(UserError, match="--decode-depth must be at least 1"):
        bench.run_bench([], [8], 4, ["torch"], "smollm2-135m", 1, "unused.json", decode_depth=0)
