"""What gets tuned: named workloads (an *unscheduled* PrimFunc each) for a target.

Names:
  `w4a8_n{N}_k{K}_m{M}` / `w8a8_n{N}_k{K}_m{M}`  the kernels' quantized linear (agile_tvm.kernels.linear) with
                                                 static M (MetaSchedule needs static shapes: M=1 is decode,
                                                 M=128 a prefill chunk)
  `matmul_m{M}_n{N}_k{K}`                        a plain u8 x s8 -> s32 matmul (plumbing tests, no kernels needed)

A model's kernel set comes from its config (hidden, intermediate, heads): every distinct linear shape, at
M in {1, 128}. The tuned record of a workload applies to the same unscheduled function (see records.tuned_func).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from agile_tvm.errors import UserError

PREFILL_M = 128
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
_LINEAR = re.compile(r"^(w4a8|w8a8)_n(\d+)_k(\d+)_m(\d+)$")
_MATMUL = re.compile(r"^matmul_m(\d+)_n(\d+)_k(\d+)$")


@dataclass
class Workload:
    name: str
    func: object          # unscheduled tvm.tirx.PrimFunc, global_symbol "main"
    flops: float          # 2*M*N*K: what GFLOP/s is measured against


def plain_matmul(M: int, N: int, K: int):
    from tvm import te

    a = te.placeholder((M, K), "uint8", name="A")
    b = te.placeholder((N, K), "int8", name="B")
    k = te.reduce_axis((0, K), name="k")
    c = te.compute((M, N), lambda i, j: te.sum(a[i, k].astype("int32") * b[j, k].astype("int32"), axis=k),
                   name="C")
    return te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")


def linear_func(wbits: int, N: int, K: int, M: int, target_name: str):
    """The kernels' linear TE with static M, unscheduled (the hand schedule is what the kernels add on top)."""
    from tvm import te

    from agile_tvm.kernels import linear
    from agile_tvm.targets import isa_of
    from agile_tvm.tune.targets import tuning_target

    isa = isa_of(tuning_target(target_name))
    args, _ = linear.linear_tensors(N, K, isa, wbits, m=M)
    return te.create_prim_func(args).with_attr("global_symbol", "main")


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


def workload(name: str, target_name: str) -> Workload:
    m = _LINEAR.match(name)
    if m:
        kind, N, K, M = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        return Workload(name, linear_func(4 if kind == "w4a8" else 8, N, K, M, target_name), 2.0 * M * N * K)
    m = _MATMUL.match(name)
    if m:
        M, N, K = (int(g) for g in m.groups())
        return Workload(name, plain_matmul(M, N, K), 2.0 * M * N * K)
    raise UserError(f"unknown kernel {name!r}: use w4a8_n<N>_k<K>_m<M>, w8a8_n<N>_k<K>_m<M> or "
                    f"matmul_m<M>_n<N>_k<K> (e.g. w4a8_n576_k576_m128)")


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


def model_config(model: str) -> dict:
    """config.json of a model folder (HF or agile-tvm checkpoint), or the embedded SmolLM2 by name."""
    if model in ("smollm2-135m", "smollm2"):
        return dict(SMOLLM2_135M)
    path = Path(model) / "config.json"
    if not path.exists():
        raise UserError(f"no config.json in {model}: pass a Hugging Face model folder or an agile-tvm checkpoint")
    return json.loads(path.read_text())
