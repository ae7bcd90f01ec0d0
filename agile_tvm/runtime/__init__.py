"""Run an exported agile-tvm module (`agile-tvm export`) through the TVM runtime, locally or on an RPC board.

    from agile_tvm.runtime import load_module
    lm = load_module("out/")                       # or load_module("out/", remote=rpc_session)
    logits = lm.forward_logits(ids)                # ids [1, L] -> logits [1, L, V] (numpy)
    tokens, stats = lm.generate(prompt_ids, max_new_tokens=32)
    logits, kept = lm.forward_pruned(ids)          # with token pruning: kept [1, L] = tokens that reached the last
                                                   # layer; lm.last_token_sparsity = eq. 10 of that forward

Only `tvm.runtime` is imported (no compiler): this works in a process started with TVM_USE_RUNTIME_LIB=1 and on a
board that has just the runtime. Weights live beside the library in `weights.safetensors`, already in the kernels'
layout, and are uploaded to the device once.

Token pruning (manifest "pruning", see `agile_tvm.frontend.graph`): the runtime computes how many tokens each pruning
layer keeps (`agile_tvm.prune_schedule`, torch-free) and passes the counts to forward_all / prefill. A pruned
prefill leaves each layer's KV cache with the tokens that layer processed; decode appends every new token to every
layer (one token is never pruned), so generation attends to the kept prompt tokens plus all generated ones. BLOOM is
the exception (its ALiBi would need the cached keys' positions): a pruned BLOOM module does not generate.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from agile_tvm.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "agile-tvm-module"


def read_manifest(out_dir) -> dict:
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.exists():
        raise UserError(f"{out_dir} is not an exported agile-tvm module (no {MANIFEST}): run `agile-tvm export` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not an agile-tvm module manifest (format {manifest.get('format')!r})")
    return manifest


def _host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _host_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_runs_here(manifest: dict) -> None:
    """A clear error instead of a crash (SIGILL / load failure) when the module's target is not this CPU."""
    arch = manifest.get("target_arch", "")
    host = _host_arch()
    name = manifest.get("target", "?")
    if arch and arch != host:
        raise UserError(f"this module was built for target {name} ({arch}) and cannot run on this {host} host: "
                        f"export it with a target for this machine (e.g. --target x86-avx512) or run it on the "
                        f"board with --tracker HOST:PORT --key KEY")
    needed = set(manifest.get("cpu_flags", []))
    missing = needed - _host_flags() if needed and host == "x86_64" else set()
    if missing:
        raise UserError(f"this module was built for target {name}, which needs CPU features "
                        f"{', '.join(sorted(missing))} this CPU lacks: export it again with --target host")


class CompiledLM:
    """An exported module loaded into a TVM Relax VM, with its weights on the device and its tokenizer."""

    def __init__(self, out_dir, remote=None):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.out_dir = Path(out_dir)
        self.manifest = read_manifest(self.out_dir)
        self.max_seq_len = int(self.manifest["max_seq_len"])
        self.vocab_size = int(self.manifest["vocab_size"])
        lib_path = self.out_dir / self.manifest["library"]
        weights_path = self.out_dir / self.manifest["weights_file"]
        for path, what in ((lib_path, "compiled library"), (weights_path, "weight file")):
            if not path.exists():
                raise UserError(f"the {what} {path} is missing: export the module again with `agile-tvm export`")
        if remote is None:
            check_runs_here(self.manifest)
            lib = tvm.runtime.load_module(str(lib_path))
            self.device = tvm.cpu()
        else:
            remote.upload(str(lib_path))
            lib = remote.load_module(lib_path.name)
            self.device = remote.cpu()
        self.remote = remote
        self.vm = VirtualMachine(lib, self.device)
        self.weights = self._load_weights(weights_path)
        self._tokenizer = None
        self.pruning = self.manifest.get("pruning")  # None: the module does not prune tokens
        self.num_layers = int(self.manifest["num_layers"])
        self.last_token_sparsity = 0.0  # eq. 10 of the last forward_logits / forward_pruned / prefill
        self.last_kept = None  # bool [1, L]: the tokens of the last forward that reached the last layer

    @property
    def prunes(self) -> bool:
        return bool(self.pruning)

    def _load_weights(self, path: Path) -> list:
        import tvm
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file
            raise UserError(f"cannot read the weight file {path} ({err}): export the module again") from None
        missing = [n for n in self.manifest["weights"] if n not in arrays]
        if missing:
            raise UserError(f"the weight file {path} lacks {len(missing)} tensors (e.g. {missing[0]!r}): "
                            f"it does not belong to this module, export it again")
        specs = self.manifest.get("weight_specs")  # absent in modules exported before it existed
        for i, name in enumerate(self.manifest["weights"] if specs else []):
            shape, dtype = specs[i]
            if list(arrays[name].shape) != list(shape) or str(arrays[name].dtype) != dtype:
                raise UserError(f"the weight {name!r} in {path} is {arrays[name].dtype} {list(arrays[name].shape)}, "
                                f"but the module was compiled for {dtype} {list(shape)}: the weight file belongs to "
                                f"another export; export the module again")
        return [tvm.runtime.tensor(arrays[n], self.device) for n in self.manifest["weights"]]

    # ---- inputs ---------------------------------------------------------------------------------------------
    def _ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids.cpu().numpy() if hasattr(ids, "cpu") else ids).astype(np.int32)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise UserError(f"token ids must have shape [1, L], got {list(ids.shape)}")
        if ids.shape[1] == 0:
            raise UserError("the prompt is empty: give at least one token")
        if ids.shape[1] > self.max_seq_len:
            raise UserError(f"the sequence has {ids.shape[1]} tokens, more than this module's compiled maximum "
                            f"{self.max_seq_len}: shorten the prompt or export with a larger --max-seq-len")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise UserError(f"token ids must lie in [0, {self.vocab_size}): got {ids.min()}..{ids.max()}")
        return ids

    def _t(self, arr: np.ndarray):
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(arr), self.device)

    def _item(self, result, i: int):
        """Item i of a tuple a VM function returned; over RPC the tuple stays on the board (an opaque handle)."""
        if self.remote is None:
            return result[i]
        return self.remote.get_function("ffi.ArrayGetItem")(result, i)

    def _prune_counts(self, n: int) -> list:
        """[] without pruning; else the prune_counts input (tokens kept by each pruning layer), and the
        bookkeeping of eq. 10 for this forward."""
        from agile_tvm.prune_schedule import schedule_counts, token_sparsity

        if not self.prunes:
            self.last_token_sparsity = 0.0
            return []
        layers = [int(layer) for layer in self.pruning["layers"]]
        counts = schedule_counts(n, self.num_layers, layers, float(self.pruning["gamma"]))
        self.last_token_sparsity = token_sparsity(counts, n)
        return [self._t(np.array([counts[layer] for layer in layers], np.int64))]

    # ---- entry points -------------------------------------------------------------------------------------
    def forward_logits(self, ids) -> np.ndarray:
        """Logits [1, L, V] for every position (no cache): the forward_fn of perplexity evaluation. With token
        pruning a pruned token's logits come from its last hidden state (see `forward_pruned` for the kept mask)."""
        return self.forward_pruned(ids)[0]

    def forward_pruned(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(logits [1, L, V], kept [1, L] bool): kept marks the tokens that reached the last layer (all True
        without pruning), the mask the paper's perplexity protocol drops the other labels with. Also sets
        `last_kept` and `last_token_sparsity`."""
        ids = self._ids(ids)
        n = ids.shape[1]
        pos = np.arange(n, dtype=np.int32)
        counts = self._prune_counts(n)
        out = self.vm["forward_all"](self._t(ids), self._t(pos), *counts, *self.weights)
        kept = np.ones((1, n), dtype=bool)
        if counts:
            logits = self._item(out, 0).numpy()
            kept[:] = False
            kept[0, self._item(out, 1).numpy()] = True
        else:
            logits = out.numpy()
        self.last_kept = kept
        return logits, kept

    def new_cache(self):
        return self.vm["create_kv_cache"]()

    def step(self, ids, past: int, cache):
        """Run `ids` [1, n] at positions past..past+n-1 through the cached forward: (last logits [V], cache)."""
        ids = self._ids(ids)
        if past + ids.shape[1] > self.max_seq_len:
            raise UserError(f"prompt plus generated tokens would reach {past + ids.shape[1]} tokens, more than this "
                            f"module's compiled maximum {self.max_seq_len}: ask for fewer tokens or export with a "
                            f"larger --max-seq-len")
        pos = np.arange(past, past + ids.shape[1], dtype=np.int32)
        fn = "decode" if ids.shape[1] == 1 else "prefill"
        counts = []
        if self.prunes:
            self._check_pruned_step(ids.shape[1], past)
            if fn == "prefill":
                counts = self._prune_counts(ids.shape[1])
        logits = self.vm[fn](self._t(ids), self._t(pos), cache, *counts, *self.weights)
        return logits.numpy().reshape(-1), cache

    def _check_pruned_step(self, n: int, past: int) -> None:
        """What a module with token pruning can run on a cache: one pruned prefill from position 0, then decode."""
        if past > 0 and self.manifest.get("arch") == "bloom":
            raise UserError("this BLOOM module prunes tokens, and BLOOM cannot continue from a pruned KV cache (its "
                            "ALiBi needs the pruned keys' positions): export it without --prune-beta to generate")
        if past > 0 and n > 1:
            raise UserError("this module prunes tokens: it prefills the prompt once (from position 0), then decodes "
                            "one token at a time; give the whole prompt in one step")

    def generate(self, prompt_ids, max_new_tokens: int = 32, eos_token_id: int | None = None):
        """Greedy generation; returns (new token ids, stats with prefill_ms and decode_tok_s)."""
        ids = self._ids(prompt_ids)
        if ids.shape[1] + max_new_tokens > self.max_seq_len:
            raise UserError(f"prompt ({ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds this "
                            f"module's compiled maximum {self.max_seq_len}: shorten the prompt, ask for fewer tokens "
                            f"or export with a larger --max-seq-len")
        if self.prunes and max_new_tokens > 1:
            self._check_pruned_step(1, ids.shape[1])
        cache = self.new_cache()
        t0 = time.perf_counter()
        logits, cache = self.step(ids, 0, cache)
        prefill_s = time.perf_counter() - t0
        past = ids.shape[1]
        out: list[int] = []
        t1 = time.perf_counter()
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits))
            out.append(tok)
            if eos_token_id is not None and tok == eos_token_id:
                break
            if len(out) == max_new_tokens:
                break
            logits, cache = self.step(np.array([[tok]], np.int32), past, cache)
            past += 1
        decode_s = time.perf_counter() - t1
        steps = max(len(out) - 1, 0)
        stats = {"prompt_tokens": int(ids.shape[1]), "new_tokens": len(out), "prefill_ms": prefill_s * 1e3,
                 "decode_tok_s": steps / decode_s if steps and decode_s > 0 else None}
        return out, stats

    # ---- tokenizer ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The `tokenizers` tokenizer exported with the module (None for models without one)."""
        if self._tokenizer is None:
            path = self.out_dir / "tokenizer.json"
            if not path.exists():
                return None
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer


def load_module(out_dir, remote=None) -> CompiledLM:
    """Load an exported module for local use, or on `remote` (an RPC session) when given."""
    return CompiledLM(out_dir, remote=remote)
