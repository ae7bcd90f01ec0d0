"""llama.cpp as a same-run peer: its own `llama-bench` tool, built by `scripts/setup-llamacpp`.

Why the binary and not llama-cpp-python: `llama-bench` is how llama.cpp reports its own speed (peers.md's figures),
it separates prompt processing from generation, and it needs no Python build. Each call is one repetition (`-r 1`,
after llama-bench's own warm-up run), so the caller can interleave it with the other engines.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from agile_tvm.errors import UserError
from agile_tvm.models import cache_dir


def llama_cpp_dir() -> Path:
    return cache_dir() / "llama.cpp"


def find_binaries() -> dict | None:
    """{"bench": path, "quantize": path} of the built tools, or None when `scripts/setup-llamacpp` has not run."""
    bin_dir = llama_cpp_dir() / "bin"
    tools = {"bench": bin_dir / "llama-bench", "quantize": bin_dir / "llama-quantize"}
    return tools if all(os.access(p, os.X_OK) for p in tools.values()) else None


def gguf_for(quant: str, binaries: dict) -> Path:
    """The SmolLM2 GGUF in `quant`: the shipped Q4_1 file, or a re-quantization of it made once and cached."""
    from agile_tvm.models import smollm2_gguf_path

    shipped = smollm2_gguf_path()
    if quant == "Q4_1":
        return shipped
    dest = llama_cpp_dir() / f"smollm2-135m-{quant}.gguf"
    if not dest.is_file():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        run = subprocess.run([str(binaries["quantize"]), "--allow-requantize", str(shipped), str(tmp), quant],
                             capture_output=True, text=True)
        if run.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            raise UserError(f"llama-quantize could not make {quant} from {shipped}: {run.stderr.strip()[-300:]}")
        os.replace(tmp, dest)
    return dest


def _bench(binaries: dict, gguf: Path, threads: int, *args: str) -> dict:
    cmd = [str(binaries["bench"]), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json", *args]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise UserError(f"llama-bench failed ({' '.join(cmd)}): {run.stderr.strip()[-300:]}")
    rows = json.loads(run.stdout)
    if len(rows) != 1:
        raise UserError(f"llama-bench gave {len(rows)} results for {' '.join(cmd)}, expected 1")
    return rows[0]


def prefill_ms(binaries: dict, gguf: Path, tokens: int, threads: int) -> float:
    """Milliseconds to process a `tokens`-token prompt (llama-bench's pp test, its default batch sizes)."""
    row = _bench(binaries, gguf, threads, "-p", str(tokens), "-n", "0")
    return row["avg_ns"] / 1e6


def decode_tok_s(binaries: dict, gguf: Path, steps: int, depth: int, threads: int) -> float:
    """Generated tokens/s for `steps` tokens after a `depth`-token context (llama-bench's tg test at depth)."""
    row = _bench(binaries, gguf, threads, "-p", "0", "-n", str(steps), "-d", str(depth))
    return row["avg_ts"]
