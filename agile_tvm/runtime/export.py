"""`agile-tvm export`: checkpoint -> Relax -> compiled `.so` + pre-packed weights + manifest, in one folder.

Layout of the output folder (everything written to temporary names first, then renamed into place):
    model.so               the compiled Relax VM executable (cross-linked with aarch64-linux-gnu-g++ for boards)
    weights.safetensors    every weight some function reads, in the order they take them, already in the kernels'
                           layout (`GraphBuilder.embed` for how the embedding is stored)
    manifest.json          target, architecture, config, compiled maximum length, weight order, token pruning
                           schedule ("pruning": the checkpoint's, or the --prune-beta override; null: none)
    tokenizer.json ...     the checkpoint's tokenizer files, so `agile-tvm run --prompt` needs nothing else
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from agile_tvm.errors import UserError
from agile_tvm.runtime import FORMAT, MANIFEST

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

#: x86 CPU flags a target's code may use; the runtime refuses to load the module on a CPU without them.
CPU_FLAGS = {"x86-avx512": ["avx512bw", "avx512f"], "x86-avx2": ["avx2"]}


def code_fingerprint(root: Path | None = None) -> str:
    """16 hex digits of a hash of the sources that decide what a module computes (`agile_tvm/kernels`,
    `agile_tvm/frontend`), written to the manifest as "code": a cached module (e.g. `scripts/bench_ppl.py`'s, next
    to its checkpoint) whose fingerprint differs was compiled from other kernels and must be exported again."""
    import hashlib

    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for sub in ("kernels", "frontend"):
        for f in sorted((root / sub).glob("*.py")):
            h.update(f"{sub}/{f.name}\0".encode() + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def module_is_current(out_dir) -> bool:
    """Whether `out_dir` holds a module exported from today's kernel and frontend sources (manifest "code"):
    scripts reuse a cached module only then."""
    manifest = Path(out_dir) / "manifest.json"
    try:
        return json.loads(manifest.read_text()).get("code") == code_fingerprint()
    except (OSError, ValueError):
        return False


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def export(ckpt_dir, target_name: str, out_dir, max_seq_len: int | None = None, tuned: bool = True,
           log=print, prune_beta: float | None = None, prune_start: int | None = None) -> dict:
    """Build, compile and write the module folder; returns the manifest. `prune_beta` (and `prune_start`, 0: half
    the depth) replace the checkpoint's token pruning schedule (0: no pruning)."""
    from safetensors.numpy import save_file

    from agile_tvm.frontend import build_module
    from agile_tvm.frontend.checkpoint import load_checkpoint
    from agile_tvm.frontend.compile import compile_relax
    from agile_tvm.targets import CROSS_COMPILERS, TARGETS, get_target

    target = get_target(target_name)
    triple = str(target.attrs.get("mtriple", ""))
    ckpt = load_checkpoint(ckpt_dir)
    t0 = time.perf_counter()
    mod, weights, meta = build_module(ckpt, max_seq_len=max_seq_len, target=target, prune_beta=prune_beta,
                                      prune_start=prune_start, tuned=tuned)
    log(f"relax module built in {time.perf_counter() - t0:.1f}s ({len(weights)} weight tensors)")
    t0 = time.perf_counter()
    ex, schedule_info = compile_relax(mod, target, target_name if tuned else None)
    log(f"compiled for {target_name} in {time.perf_counter() - t0:.1f}s ({schedule_info})")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fcompile = None
    if triple.startswith("aarch64"):
        from tvm.support import cc

        compiler = CROSS_COMPILERS.get(target_name, "aarch64-linux-gnu-g++")
        if shutil.which(compiler) is None:
            raise UserError(f"cross compiler {compiler} not found: install it (apt-get install g++-aarch64-linux-gnu)")
        fcompile = cc.cross_compiler(compiler)
    lib_tmp = out / f"model.so.tmp{os.getpid()}.so"
    ex.export_library(str(lib_tmp), fcompile=fcompile)
    os.replace(lib_tmp, out / "model.so")
    w_tmp = out / f"weights.safetensors.tmp{os.getpid()}"
    save_file({k: v for k, v in weights.items()}, str(w_tmp))
    os.replace(w_tmp, out / "weights.safetensors")
    for name in TOKENIZER_FILES:
        src = Path(ckpt_dir) / name
        if src.exists():
            tmp = out / f"{name}.tmp{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, out / name)
    manifest = {
        "format": FORMAT,
        "version": 1,
        "target": target_name if isinstance(target_name, str) else "custom",
        "target_dict": TARGETS.get(target_name) if isinstance(target_name, str) else None,
        "target_arch": "aarch64" if triple.startswith("aarch64") else "x86_64",
        "cpu_flags": CPU_FLAGS.get(target_name, []),
        "library": "model.so",
        "weights_file": "weights.safetensors",
        "schedules": schedule_info,
        "checkpoint": str(Path(ckpt_dir).resolve()),
        "model": ckpt.manifest.get("source_model") or Path(ckpt_dir).name,
        "config": ckpt.scheme,  # the quantization scheme name (what `agile-tvm eval` reports)
        "calib_corpus": (ckpt.manifest.get("calibration") or {}).get("corpus"),
        "hf_config": ckpt.config,
        "eos_token_id": ckpt.config.get("eos_token_id"),
        "code": code_fingerprint(),
        **{k: v for k, v in meta.items() if k != "weights"},
        "weights": list(weights),
    }
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    size = sum((out / f).stat().st_size for f in ("model.so", "weights.safetensors"))
    log(f"wrote {out}/ (model.so + weights.safetensors: {size / 1e6:.1f} MB)")
    return manifest
