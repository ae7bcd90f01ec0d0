"""What gets tuned: named workloads (an *unscheduled* PrimFunc each) for a target.

Names:
  `w4a8_n{N}_k{K}_m{M}` / `w8a8_n{N}_k{K}_m{M}`  the kernels' quantized linear (agile_tvm.kernels.linear) with
                                                 static M (MetaSchedule needs static shapes: M=1 is decode,
                                                 M=128 a prefill chunk)
  `matmul_m{M}_n{N}_k{K}`                        a plain u8 x s8 -> s32 matmul (plumbing tests, no kernels needed)
  `w4a8_linear_n576_k576_g32_tok_wmin_m1_u4_tt_xf8_c16` ...
                                                 a kernel the frontend emits for a checkpoint, named as
                                                 `kernels.linear._linear_func` names it (`frontend_kernels`)

`agile-tvm tune --model CKPT` tunes what the model really runs: the static-shape (decode, m=1) linear kernels the
frontend emits for that checkpoint (v2: per-token activations quantized inside the GEMV, fused q/k/v and
gate/up, the INT8 LM head) and a static proxy (M = `PREFILL_PROXY_M`) of each symbolic-M prefill kernel, collected
by a dry run of the frontend (`frontend_kernels`). Their options are kept in `kernels.json` next to the tuning
database, so export and the benchmark rebuild the same functions by name. MetaSchedule needs static shapes; a
proxy's trace replays on the symbolic-M kernel at compile time (`records.replayed_func`).
Without a checkpoint (`--model` of a Hugging Face config), the kernel set is the v1 one from the config: every
distinct linear shape at M in {1, 128}. A tuned record applies to the same unscheduled function
(records.tuned_func), whatever its name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from agile_tvm.errors import UserError

PREFILL_M = 128
#: The static M a symbolic-M (prefill) kernel is tuned at; its trace then replays on any M (`records.replayed_func`).
#: 512 is the prompt length of the prefill benchmark's headline.
PREFILL_PROXY_M = 512
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
_LINEAR = re.compile(r"^(w4a8|w8a8)_n(\d+)_k(\d+)_m(\d+)$")
_MATMUL = re.compile(r"^matmul_m(\d+)_n(\d+)_k(\d+)$")


@dataclass
class Workload:
    name: str
    func: object          # unscheduled tvm.tirx.PrimFunc, global_symbol "main"
    flops: float          # 2*M*N*K: what GFLOP/s is measured against
    info: dict | None = None  # a kernel's schedule parameters (`kernels.linear.linear_tensors`); None: a matmul


def plain_matmul(M: int, N: int, K: int):
    from tvm import te

    a = te.placeholder((M, K), "uint8", name="A")
    b = te.placeholder((N, K), "int8", name="B")
    k = te.reduce_axis((0, K), name="k")
    c = te.compute((M, N), lambda i, j: te.sum(a[i, k].astype("int32") * b[j, k].astype("int32"), axis=k),
                   name="C")
    return te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")


def linear_func(wbits: int, N: int, K: int, M: int, target_name: str, with_info: bool = False):
    """The kernels' linear TE with static M, unscheduled (the hand schedule is what the kernels add on top);
    `with_info`: (func, the kernel's schedule parameters)."""
    from tvm import te

    from agile_tvm.kernels import linear
    from agile_tvm.targets import isa_of
    from agile_tvm.tune.targets import tuning_target

    isa = isa_of(tuning_target(target_name))
    args, info = linear.linear_tensors(N, K, isa, wbits, m=M)
    func = te.create_prim_func(args).with_attr("global_symbol", "main")
    return (func, info) if with_info else func


def hand_scheduled_func(wbits: int, N: int, K: int, M: int, target_name: str):
    """The kernels' own (hand) schedule of the same workload, for the benchmark's comparison."""
    from agile_tvm.kernels import linear
    from agile_tvm.kernels.schedule import schedule_linear
    from agile_tvm.targets import isa_of
    from agile_tvm.tune.targets import tuning_target
    from tvm import te

    isa = isa_of(tuning_target(target_name))
    args, info = linear.linear_tensors(N, K, isa, wbits, m=M)
    func = te.create_prim_func(args).with_attr("global_symbol", "main")
    return schedule_linear(func, info)


def parse_linear_name(name: str) -> tuple[int, int, int, int] | None:
    """'w4a8_n576_k576_m128' -> (wbits 4, N 576, K 576, M 128); None for other workloads."""
    m = _LINEAR.match(name)
    if not m:
        return None
    return (4 if m.group(1) == "w4a8" else 8), int(m.group(2)), int(m.group(3)), int(m.group(4))


KERNELS_FILE = "kernels.json"


def frontend_kernels(ckpt_dir, target_name: str) -> dict[str, dict]:
    """{kernel name: {"wbits", "N", "K", "options"}} of every static-shape linear kernel the frontend emits for the
    checkpoint on `target_name`, and the static proxy of each symbolic-M one (a dry run of the graph builder: the
    module is built and dropped, ~20 s)."""
    from agile_tvm.frontend import model_class
    from agile_tvm.frontend.checkpoint import load_checkpoint
    from agile_tvm.frontend.graph import GraphBuilder

    ckpt = load_checkpoint(ckpt_dir)
    g = GraphBuilder(ckpt, max_seq_len=64, target=target_name)
    g.kernel_specs = {}
    g._schedule_records = None  # collect only: no lookups in schedules/
    g.build(model_class(ckpt.arch)(ckpt.config))
    if not g.kernel_specs:
        raise UserError(f"{ckpt_dir}: the frontend emits no integer linear kernels for this checkpoint (a float or "
                        f"W4A16 model?): nothing to tune")
    return {name: json.loads(json.dumps(spec)) for name, spec in sorted(g.kernel_specs.items())}


def _spec_options(spec: dict) -> dict:
    options = dict(spec["options"])
    if options.get("outs"):
        options["outs"] = tuple(tuple(int(v) for v in o) for o in options["outs"])
    return options


def kernel_func(spec: dict, target_name: str, schedule: bool = False):
    """The kernel of a `frontend_kernels` spec, unscheduled (what records are keyed by) or hand-scheduled."""
    from agile_tvm.kernels.linear import _linear_func
    from agile_tvm.tune.targets import tuning_target

    func = _linear_func(int(spec["wbits"]), int(spec["N"]), int(spec["K"]), tuning_target(target_name),
                        schedule=schedule, **_spec_options(spec))
    return func.with_attr("global_symbol", "main")


def kernel_info(spec: dict, target_name: str) -> dict:
    """The schedule parameters (`kernels.linear.linear_tensors` info) of a `frontend_kernels` spec's kernel."""
    from agile_tvm.kernels.linear import linear_te
    from agile_tvm.tune.targets import tuning_target

    return linear_te(int(spec["wbits"]), int(spec["N"]), int(spec["K"]), tuning_target(target_name),
                     **_spec_options(spec))[1]


def kernel_flops(spec: dict) -> float:
    """2*M*N*K of a kernel (its N includes the padding between fused outputs: what the GEMV computes)."""
    return 2.0 * int(spec["options"].get("m") or 1) * int(spec["N"]) * int(spec["K"])


def read_kernel_specs(work_dir) -> dict[str, dict]:
    path = Path(work_dir) / KERNELS_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"corrupt {path} ({exc.msg}): it was left untouched: move it aside and rerun "
                        f"`agile-tvm tune --model CKPT` to rewrite it") from None


def write_kernel_specs(work_dir, specs: dict[str, dict]) -> None:
    """Merge `specs` into work_dir/kernels.json (atomically: a resumed run keeps earlier kernels)."""
    import os

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    merged = {**read_kernel_specs(work_dir), **specs}
    tmp = work_dir / (KERNELS_FILE + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, work_dir / KERNELS_FILE)


def hand_func(name: str, target_name: str, specs: dict | None = None):
    """The hand-scheduled twin of workload `name` (global_symbol "main"), or None for plain matmuls."""
    parsed = parse_linear_name(name)
    if parsed is not None:
        return hand_scheduled_func(*parsed, target_name).with_attr("global_symbol", "main")
    if specs and name in specs:
        return kernel_func(specs[name], target_name, schedule=True)
    return None


def workload(name: str, target_name: str, specs: dict | None = None) -> Workload:
    """Workload `name`: a v1 linear or plain matmul by its name, or a frontend kernel found in `specs`."""
    if specs and name in specs:
        return Workload(name, kernel_func(specs[name], target_name), kernel_flops(specs[name]),
                        kernel_info(specs[name], target_name))
    m = _LINEAR.match(name)
    if m:
        kind, N, K, M = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        func, info = linear_func(4 if kind == "w4a8" else 8, N, K, M, target_name, with_info=True)
        return Workload(name, func, 2.0 * M * N * K, info)
    m = _MATMUL.match(name)
    if m:
        M, N, K = (int(g) for g in m.groups())
        return Workload(name, plain_matmul(M, N, K), 2.0 * M * N * K)
    raise UserError(f"unknown kernel {name!r}: use w4a8_n<N>_k<K>_m<M>, w8a8_n<N>_k<K>_m<M> or "
                    f"matmul_m<M>_n<N>_k<K> (e.g. w4a8_n576_k576_m128), or --model CKPT for a checkpoint's kernels")


def model_kernel_names(config: dict, ms=(1, PREFILL_M), kinds=("w4a8",)) -> list[str]:
    """Every distinct linear shape of a decoder block (q, k/v, o, gate/up, down) at each M."""
    try:
        h = int(config["hidden_size"])
        inter = int(config.get("intermediate_size") or config.get("ffn_dim") or 4 * h)
        heads = int(config.get("num_attention_heads", 1))
        kv = int(config.get("num_key_value_heads") or heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"model config lacks {exc}: expected a Hugging Face config.json with hidden_size") from None
    head_dim = h // heads
    shapes = sorted({(h, h), (kv * head_dim, h), (inter, h), (h, inter)})  # (N, K)
    return [f"{kind}_n{N}_k{K}_m{M}" for kind in kinds for M in ms for N, K in shapes]


def find_checkpoint(model: str) -> Path | None:
    """The agile-tvm checkpoint `model` names: a folder with agile_quant.json, or for "smollm2-135m" the newest
    per-token (agileq8) SmolLM2 checkpoint under out/ckpt/ (None: no such checkpoint, use the config's v1 set)."""
    path = Path(model)
    if (path / "agile_quant.json").exists():
        return path
    if model in ("smollm2-135m", "smollm2"):
        from agile_tvm.tune.records import REPO_ROOT

        found = [p for p in (REPO_ROOT / "out" / "ckpt").glob("smollm2-135m-agileq8-*")
                 if (p / "agile_quant.json").exists() and "-static-" not in p.name]
        return max(found, key=lambda p: (p / "agile_quant.json").stat().st_mtime) if found else None
    return None


def model_config(model: str) -> dict:
    """config.json of a model folder (HF or agile-tvm checkpoint), or the embedded SmolLM2 by name."""
    if model in ("smollm2-135m", "smollm2"):
        return dict(SMOLLM2_135M)
    path = Path(model) / "config.json"
    if not path.exists():
        raise UserError(f"no config.json in {model}: pass a Hugging Face model folder or an agile-tvm checkpoint")
    return json.loads(path.read_text())
