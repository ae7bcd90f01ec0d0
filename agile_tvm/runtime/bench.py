"""End-to-end latency, Table-4 style: exported TVM modules and the peers (eager torch FP32, torch dynamic int8,
llama.cpp's llama-bench on the shipped GGUF and its re-quantizations) timed in the same run, 2 threads.

Interleaved rounds: every round times each engine once at each prompt length, then its decode rate, so this
machine's drift over minutes (+-30% seen between engines timed one after the other) hits all engines alike; the
record holds the median over rounds (and the per-round values). Record per (engine, prompt length):
{"target", "model", "impl", "config", "tokens", "prefill_ms", "decode_tok_s", "size_mb"} + "prefill_ms_rounds"
(and for agile-tvm modules "decode_weight_mb", the weight bytes one decode step reads in full, and
"decode_weight_gb_s", those bytes times the decode rate: how close decode gets to the memory bandwidth).
Prefill = a fresh KV cache and a prompt of `tokens` tokens up to the last token's logits (what generation needs);
decode = tokens/s of greedy steps after a 128-token prompt (`decode_depth`, --decode-depth; listed with the shortest
prompt's record; llama.cpp: `llama-bench -n N -d <depth>`, the same depth).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from agile_tvm.errors import UserError

THREADS = 2
LLAMA_CPP_QUANTS = ("F32", "Q8_0", "Q4_1")


def _prompt(tokens: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (1, tokens)).astype(np.int64)


@dataclass
class Engine:
    """One thing to time: `prefill(n)` -> ms for an n-token prompt, `decode()` -> tok/s after DECODE_DEPTH tokens."""
    label: str
    base: dict                         # the record fields besides tokens / prefill_ms / decode_tok_s
    prefill: Callable[[int], float]
    decode: Callable[[], float]
    tokens: list[int] = field(default_factory=list)  # the prompt lengths it can take


DECODE_DEPTH = 128


def tvm_engine(out_dir, tokens: list[int], decode_tokens: int, depth: int = DECODE_DEPTH) -> Engine:
    from agile_tvm.runtime import load_module

    lm = load_module(out_dir)
    man = lm.manifest
    size_mb = sum((Path(out_dir) / man[k]).stat().st_size for k in ("library", "weights_file")) / 1e6
    config = "fp32" if man.get("scheme") in ("fp", None) else man["scheme"]
    if man.get("pruning"):  # token pruning compiled in: e.g. agileq8@0.4
        config += f"@{man['pruning']['beta']}"
    base = {"target": man["target"], "model": man.get("source_model") or man["arch"], "impl": "tvm",
            "config": config, "size_mb": round(size_mb, 2), "module": str(out_dir)}
    if man.get("decode_weight_bytes"):  # modules exported since session 10
        base["decode_weight_mb"] = round(man["decode_weight_bytes"] / 1e6, 2)
    fits = [n for n in tokens if n <= lm.max_seq_len]
    for n in sorted(set(tokens) - set(fits)):
        print(f"  tvm {config}: skip {n} tokens (compiled maximum {lm.max_seq_len})")
    if depth + decode_tokens + 1 > lm.max_seq_len:
        raise UserError(f"{out_dir}: compiled for {lm.max_seq_len} tokens, decode timing at depth {depth} needs "
                        f"{depth + decode_tokens + 1}: re-export with a larger --max-seq-len or lower --decode-depth")

    def prefill(n):
        ids = _prompt(n, lm.vocab_size)
        t0 = time.perf_counter()
        lm.step(ids, 0, lm.new_cache())
        return (time.perf_counter() - t0) * 1e3

    return Engine(f"tvm {config}", base, prefill,
                  lambda: tvm_decode_rate(lm, _prompt(depth, lm.vocab_size), decode_tokens), fits)


def tvm_decode_rate(lm, ids, steps: int) -> float:
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


def torch_engine(impl: str, model, tokens, decode_tokens, size_mb, model_name, depth: int = DECODE_DEPTH) -> Engine:
    import torch

    vocab = model.config.vocab_size
    base = {"target": "host", "model": model_name, "impl": impl, "config": "fp32" if impl == "torch" else "int8",
            "size_mb": round(size_mb, 2)}

    def prefill(n):
        ids = torch.as_tensor(_prompt(n, vocab))
        with torch.no_grad():
            t0 = time.perf_counter()
            model(ids, logits_to_keep=1, use_cache=True)
            return (time.perf_counter() - t0) * 1e3

    return Engine(impl, base, prefill,
                  lambda: _torch_decode_rate(model, torch.as_tensor(_prompt(depth, vocab)), decode_tokens),
                  list(tokens))


def _torch_decode_rate(model, ids, steps: int) -> float:
    import torch

    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        out = model(tok, past_key_values=past, use_cache=True)  # warm-up
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
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


def torch_engines(model_spec: str, tokens, decode_tokens, which: list[str], depth: int = DECODE_DEPTH) -> list[Engine]:
    import torch

    from agile_tvm.models import load_model

    torch.set_num_threads(THREADS)
    loaded = load_model(model_spec)
    model = loaded.model.eval()
    engines = []
    if "torch" in which:
        engines.append(torch_engine("torch", model, tokens, decode_tokens, _state_mb(model), loaded.name, depth))
    if "torch-int8" in which:
        qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        engines.append(torch_engine("torch-int8", qmodel, tokens, decode_tokens, _state_mb(qmodel), loaded.name,
                                    depth))
    return engines


def llama_cpp_engines(tokens, decode_tokens, quants=LLAMA_CPP_QUANTS, depth: int = DECODE_DEPTH) -> list[Engine]:
    """llama.cpp's own benchmark tool on the shipped SmolLM2 Q4_1 GGUF and its re-quantizations (F32 and Q8_0 from
    the Q4_1 weights: the same compute as a real F32/Q8_0 model); [] with a note when llama.cpp is not built
    (`scripts/setup-llamacpp`)."""
    from agile_tvm.runtime import llama_cpp

    binaries = llama_cpp.find_binaries()
    if binaries is None:
        print("  llama.cpp: not built (run scripts/setup-llamacpp); skipped")
        return []
    engines = []
    for quant in quants:
        gguf = llama_cpp.gguf_for(quant, binaries)
        base = {"target": "host", "model": "smollm2-135m", "impl": "llama.cpp", "config": quant,
                "size_mb": round(gguf.stat().st_size / 1e6, 2)}
        engines.append(Engine(f"llama.cpp {quant}", base,
                              lambda n, g=gguf: llama_cpp.prefill_ms(binaries, g, n, THREADS),
                              lambda g=gguf: llama_cpp.decode_tok_s(binaries, g, decode_tokens, depth, THREADS),
                              list(tokens)))
    return engines


def run_rounds(engines: list[Engine], rounds: int, warmup: bool = True) -> list[dict]:
    """Time every engine once per round (each prompt length, then decode); records of the medians over rounds."""
    if warmup:
        for e in engines:  # first calls allocate workspaces / page weights in
            for n in e.tokens[:1]:
                e.prefill(n)
    raw = {id(e): {"prefill": {n: [] for n in e.tokens}, "decode": []} for e in engines}
    for r in range(rounds):
        for e in engines:
            for n in e.tokens:
                raw[id(e)]["prefill"][n].append(e.prefill(n))
                time.sleep(0.2)  # let the previous engine's worker threads (TVM, OpenMP) go idle
            raw[id(e)]["decode"].append(e.decode())
            time.sleep(0.2)
        print(f"round {r + 1}/{rounds}: " + "; ".join(
            f"{e.label} " + " ".join(f"{raw[id(e)]['prefill'][n][-1]:.0f}" for n in e.tokens) + " ms, "
            f"{raw[id(e)]['decode'][-1]:.1f} tok/s" for e in engines), flush=True)
    records = []
    for e in engines:
        for n in e.tokens:
            times = raw[id(e)]["prefill"][n]
            rec = {**e.base, "tokens": n, "prefill_ms": round(statistics.median(times), 2), "decode_tok_s": None,
                   "prefill_ms_rounds": [round(t, 2) for t in times]}
            if n == min(e.tokens):
                rec["decode_tok_s"] = round(statistics.median(raw[id(e)]["decode"]), 2)
                rec["decode_tok_s_rounds"] = [round(x, 2) for x in raw[id(e)]["decode"]]
                if rec.get("decode_weight_mb"):  # weight bytes a step reads x steps/s (the KV cache comes on top)
                    rec["decode_weight_gb_s"] = round(rec["decode_weight_mb"] * rec["decode_tok_s"] / 1e3, 2)
            records.append(rec)
    return records


def run_bench(modules, tokens, decode_tokens, peers, model_spec, rounds, output,
              decode_depth: int = DECODE_DEPTH) -> list[dict]:
    if os.environ.get("TVM_NUM_THREADS") not in (None, str(THREADS)):
        print(f"note: TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']} (the table is meant for {THREADS})")
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
    unknown = set(peers) - {"torch", "torch-int8", "llama.cpp"}
    if unknown:
        raise UserError(f"unknown peer(s) {', '.join(sorted(unknown))}: choose from torch, torch-int8, llama.cpp")
    if decode_depth < 1:
        raise UserError(f"--decode-depth must be at least 1 (tokens in the cache before decode is timed), got "
                        f"{decode_depth}")
    engines = torch_engines(model_spec, tokens, decode_tokens, [p for p in peers if p.startswith("torch")],
                            decode_depth)
    if "llama.cpp" in peers:
        engines += llama_cpp_engines(tokens, decode_tokens, depth=decode_depth)
    tvms = [tvm_engine(m, tokens, decode_tokens, decode_depth) for m in modules]
    for e in tvms:  # two modules of one scheme (e.g. another scale grid): tell them apart by their folder
        if sum(o.label == e.label for o in tvms) > 1:
            e.base["config"] += f" ({Path(e.base['module']).name})"
    for e in tvms:
        e.label = f"tvm {e.base['config']}"
    engines += tvms
    for e in engines:
        e.base["decode_depth"] = decode_depth
    print(f"{len(engines)} engines, {rounds} interleaved rounds: " + ", ".join(e.label for e in engines), flush=True)
    records = run_rounds(engines, rounds)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {len(records)} records to {out}")
    print(format_table(records))
    print("\n".join(round_ratios(records)))
    return records


def round_ratios(records: list[dict]) -> list[str]:
    """Per agile-tvm engine, its ratios to eager torch FP32 and to the fastest peer (prefill), and to the fastest
    decoding peer and llama.cpp Q4_1 (decode), computed round by round (each round timed every engine back to back)
    as 'median (min-max)': steadier than a ratio of medians when the machine's speed drifts between rounds."""
    def spread(xs):
        return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"

    def unique(rs):
        return list({(r["impl"], r["config"]): r for r in rs}.values())

    peers = [r for r in records if r["impl"] != "tvm"]
    lines = []
    for rec in (r for r in records if r["impl"] == "tvm"):
        n, label, mine = rec["tokens"], f"tvm {rec['config']}", rec["prefill_ms_rounds"]
        at_n = [p for p in peers if p["tokens"] == n and len(p.get("prefill_ms_rounds", [])) == len(mine)]
        refs = unique([p for p in at_n if (p["impl"], p["config"]) == ("torch", "fp32")]
                      + ([min(at_n, key=lambda p: p["prefill_ms"])] if at_n else []))
        if refs:
            lines.append(f"{label} prefill {n}, per round: " + ", ".join(
                f"{spread([a / b for a, b in zip(p['prefill_ms_rounds'], mine)])} {p['impl']} {p['config']}"
                for p in refs))
        mine = rec.get("decode_tok_s_rounds")
        decoding = [p for p in peers if mine and len(p.get("decode_tok_s_rounds") or []) == len(mine)]
        if decoding:
            refs = unique([max(decoding, key=lambda p: p["decode_tok_s"])]
                          + [p for p in decoding if (p["impl"], p["config"]) == ("llama.cpp", "Q4_1")])
            lines.append(f"{label} decode, per round: " + ", ".join(
                f"{spread([a / b for a, b in zip(mine, p['decode_tok_s_rounds'])])} {p['impl']} {p['config']}"
                for p in refs))
        if rec.get("decode_weight_gb_s"):
            lines.append(f"{label} decode reads {rec['decode_weight_mb']:.1f} MB of weights a step: "
                         f"{rec['decode_weight_gb_s']:.1f} GB/s at the median rate (plus the KV cache)")
    return lines


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
