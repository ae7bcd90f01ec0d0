"""End-to-end latency, Table-4 style: exported TVM modules and the peers (eager torch FP32, torch dynamic int8,
llama.cpp) timed in the same run, 2 threads, so ratios are meaningful on a shared, drifting machine.

Record per (engine, prompt length): {"target", "model", "impl", "config", "tokens", "prefill_ms", "decode_tok_s",
"size_mb"}. Prefill = a fresh KV cache and a prompt of `tokens` tokens up to the last token's logits (what
generation needs); decode = tokens/s of greedy steps after a 128-token prompt (listed with the 128 record).
Medians of `repeat` runs.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from agile_tvm.errors import UserError

THREADS = 2


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm-up (first call allocates workspaces)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _prompt(tokens: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (1, tokens)).astype(np.int64)


def bench_tvm_module(out_dir, tokens: list[int], decode_tokens: int, repeat: int) -> list[dict]:
    from agile_tvm.runtime import load_module

    lm = load_module(out_dir)
    man = lm.manifest
    size_mb = sum((Path(out_dir) / man[k]).stat().st_size for k in ("library", "weights_file")) / 1e6
    config = "fp32" if man.get("scheme") in ("fp", None) else man["scheme"]
    if man.get("pruning"):  # token pruning compiled in: e.g. agileq8@0.4
        config += f"@{man['pruning']['beta']}"
    base = {"target": man["target"], "model": man.get("source_model") or man["arch"], "impl": "tvm",
            "config": config, "size_mb": round(size_mb, 2), "module": str(out_dir)}
    fits = []
    for n in tokens:
        if n + (decode_tokens if n == min(tokens) else 0) > lm.max_seq_len:
            print(f"  tvm {config}: skip {n} tokens (compiled maximum {lm.max_seq_len})")
        else:
            fits.append(n)

    def prefill_ms(n):
        ids = _prompt(n, lm.vocab_size)
        return _median_ms(lambda: lm.step(ids, 0, lm.new_cache()), repeat)

    def decode_rate(n):
        return _median_rate(lambda: _tvm_decode_rate(lm, _prompt(n, lm.vocab_size), decode_tokens), repeat)

    return _records_per_length(f"tvm {config}", base, fits, prefill_ms, decode_rate)


def _median_rate(measure, repeat: int) -> float:
    """Median of `repeat` decode runs: one run of a few dozen steps varies by +-15% here (measured), like prefill."""
    return float(np.median([measure() for _ in range(max(1, repeat))]))


def _records_per_length(label: str, base: dict, tokens: list[int], prefill_ms, decode_rate) -> list[dict]:
    """One record per prompt length; the shortest length also carries the decode rate after that prompt."""
    records = []
    for n in tokens:
        ms = prefill_ms(n)
        rec = {**base, "tokens": n, "prefill_ms": round(ms, 2), "decode_tok_s": None}
        if n == min(tokens):
            rec["decode_tok_s"] = round(decode_rate(n), 2)
        records.append(rec)
        print(f"  {label} prefill {n}: {ms:.1f} ms" + (f", decode {rec['decode_tok_s']} tok/s"
                                                       if rec["decode_tok_s"] else ""))
    return records


def _tvm_decode_rate(lm, ids, steps: int) -> float:
    _, cache = lm.step(ids, 0, lm.new_cache())
    past = ids.shape[1]
    tok = np.array([[1]], np.int32)
    lm.step(tok, past, cache)  # warm-up of the decode function
    past += 1
    t0 = time.perf_counter()
    for i in range(steps):
        logits, cache = lm.step(tok, past + i, cache)
        tok = np.array([[int(np.argmax(logits))]], np.int32)
    return steps / (time.perf_counter() - t0)


def _torch_records(impl: str, model, tokens, decode_tokens, repeat, size_mb, model_name) -> list[dict]:
    import torch

    vocab = model.config.vocab_size
    base = {"target": "host", "model": model_name, "impl": impl, "config": "fp32" if impl == "torch" else "int8",
            "size_mb": round(size_mb, 2)}

    def prefill_ms(n):
        ids = torch.as_tensor(_prompt(n, vocab))
        with torch.no_grad():
            return _median_ms(lambda: model(ids, logits_to_keep=1, use_cache=True), repeat)

    def decode_rate(n):
        return _median_rate(lambda: _torch_decode_rate(model, torch.as_tensor(_prompt(n, vocab)), decode_tokens),
                            repeat)

    return _records_per_length(impl, base, list(tokens), prefill_ms, decode_rate)


def _torch_decode_rate(model, ids, steps: int) -> float:
    import torch

    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        out = model(tok, past_key_values=past, use_cache=True)  # warm-up
        past = out.past_key_values
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
        return steps / (time.perf_counter() - t0)


def _state_mb(model) -> float:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 1e6


def bench_torch(model_spec: str, tokens, decode_tokens, repeat, which: list[str]) -> list[dict]:
    import torch

    from agile_tvm.models import load_model

    torch.set_num_threads(THREADS)
    loaded = load_model(model_spec)
    model = loaded.model.eval()
    records = []
    if "torch" in which:
        records += _torch_records("torch", model, tokens, decode_tokens, repeat, _state_mb(model), loaded.name)
    if "torch-int8" in which:
        qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        records += _torch_records("torch-int8", qmodel, tokens, decode_tokens, repeat, _state_mb(qmodel), loaded.name)
    return records


def bench_llama_cpp(tokens, decode_tokens, repeat) -> list[dict]:
    """llama.cpp through llama-cpp-python on the shipped SmolLM2 Q4_1 GGUF; [] (with a note) if not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("  llama.cpp: llama-cpp-python is not installed; skipped")
        return []
    from agile_tvm.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    llm = Llama(model_path=str(path), n_ctx=max(tokens) + decode_tokens + 8, n_threads=THREADS,
                n_threads_batch=THREADS, n_batch=512, logits_all=False, verbose=False)
    size_mb = Path(path).stat().st_size / 1e6
    records = []
    for n in tokens:
        ids = _prompt(n, llm.n_vocab()).reshape(-1).tolist()

        def prefill():
            llm.reset()
            llm.eval(ids)

        ms = _median_ms(prefill, repeat)
        rec = {"target": "host", "model": "smollm2-135m", "impl": "llama.cpp", "config": "Q4_1", "tokens": n,
               "prefill_ms": round(ms, 2), "decode_tok_s": None, "size_mb": round(size_mb, 2)}
        if n == min(tokens):
            llm.reset()
            llm.eval(ids)
            t0 = time.perf_counter()
            for _ in range(decode_tokens):
                llm.eval([1])
            rec["decode_tok_s"] = round(decode_tokens / (time.perf_counter() - t0), 2)
        records.append(rec)
        print(f"  llama.cpp prefill {n}: {ms:.1f} ms" + (f", decode {rec['decode_tok_s']} tok/s"
                                                         if rec["decode_tok_s"] else ""))
    return records


def run_bench(modules, tokens, decode_tokens, peers, model_spec, repeat, output) -> list[dict]:
    if os.environ.get("TVM_NUM_THREADS") not in (None, str(THREADS)):
        print(f"note: TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']} (the table is meant for {THREADS})")
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
    unknown = set(peers) - {"torch", "torch-int8", "llama.cpp"}
    if unknown:
        raise UserError(f"unknown peer(s) {', '.join(sorted(unknown))}: choose from torch, torch-int8, llama.cpp")
    records: list[dict] = []
    # Peers first: once a TVM module has run, TVM's worker threads keep spinning for a while and would steal the
    # two cores from torch's / llama.cpp's threads in this process (measured: torch 5-10x slower after TVM).
    torch_peers = [p for p in peers if p.startswith("torch")]
    if torch_peers:
        print("torch peers")
        records += bench_torch(model_spec, tokens, decode_tokens, repeat, torch_peers)
    if "llama.cpp" in peers:
        print("llama.cpp peer")
        records += bench_llama_cpp(tokens, decode_tokens, repeat)
    for m in modules:
        print(f"TVM module {m}")
        records += bench_tvm_module(m, tokens, decode_tokens, repeat)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {len(records)} records to {out}")
    print(format_table(records))
    return records


def format_table(records: list[dict]) -> str:
    """A markdown table: one row per engine, prefill tok/s per length, decode tok/s, size, ratio to torch FP32."""
    engines: dict = {}
    lengths = sorted({r["tokens"] for r in records})
    for r in records:
        engines.setdefault((r["impl"], r["config"]), {})[r["tokens"]] = r
    ref = engines.get(("torch", "fp32"), {})
    head = "| engine | size MB | " + " | ".join(f"prefill {n} (ms, tok/s)" for n in lengths) + " | decode tok/s |"
    lines = [head, "|" + "---|" * (3 + len(lengths))]
    for (impl, cfg), by_n in engines.items():
        cells = []
        for n in lengths:
            r = by_n.get(n)
            if r is None:
                cells.append("-")
                continue
            ratio = ""
            if n in ref and impl != "torch":
                ratio = f", {ref[n]['prefill_ms'] / r['prefill_ms']:.2f}x torch"
            cells.append(f"{r['prefill_ms']:.0f} ms, {n / r['prefill_ms'] * 1e3:.0f}{ratio}")
        dec = next((r["decode_tok_s"] for r in by_n.values() if r["decode_tok_s"]), None)
        size = next(iter(by_n.values()))["size_mb"]
        lines.append(f"| {impl} {cfg} | {size:.0f} | " + " | ".join(cells) + f" | {dec if dec else '-'} |")
    return "\n".join(lines)
