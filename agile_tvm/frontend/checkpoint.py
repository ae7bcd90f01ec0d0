"""Read a quantized checkpoint (docs/checkpoint.md, format `agile-tvm-qckpt` v1 or v2) into plain numpy arrays.

The frontend reads the files directly rather than through the PyTorch reference model: the contract is the files,
and this keeps export free of torch. `linear_spec` turns one `linears[P]` entry into the facts the graph builder
needs, with v2's per-linear options (`act`, `w_zero`) resolved to their v1 defaults when absent;
`prune_schedule` resolves the token pruning schedule (the manifest's, or an override given at export).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agile_tvm.errors import UserError
from agile_tvm.prune_schedule import prune_gamma, prune_layers

FORMAT = "agile-tvm-qckpt"
VERSIONS = (1, 2)  # a v1 checkpoint is a v2 checkpoint with both per-linear options off
ACT_GRANULARITIES = ("tensor", "token")
WEIGHT_ZEROS = ("int", "float")


@dataclass
class Checkpoint:
    """A quantized checkpoint: manifest, HF config and every tensor as numpy."""

    path: Path
    manifest: dict
    config: dict
    tensors: dict[str, np.ndarray] = field(repr=False)

    @property
    def arch(self) -> str:
        return self.manifest["arch"]

    @property
    def scheme(self) -> str:
        return self.manifest.get("scheme", {}).get("name", "fp")

    @property
    def linears(self) -> dict:
        return self.manifest.get("linears", {}) or {}

    @property
    def attention(self) -> dict:
        return self.manifest.get("attention", {}) or {}

    def tensor(self, name: str) -> np.ndarray:
        try:
            return self.tensors[name]
        except KeyError:
            raise UserError(
                f"checkpoint {self.path} has no tensor {name!r}: re-run `agile-tvm quantize` to rewrite it"
            ) from None


def load_checkpoint(path) -> Checkpoint:
    """Load DIR/agile_quant.json, DIR/config.json and DIR/model.safetensors; a clear error for anything missing."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint folder {path} does not exist: pass the output folder of `agile-tvm quantize`")
    manifest_path = path / "agile_quant.json"
    if not manifest_path.exists():
        raise UserError(
            f"{path} is not an agile-tvm checkpoint (no agile_quant.json): quantize it first with `agile-tvm quantize`"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") not in VERSIONS:
        raise UserError(f"{manifest_path} has format {manifest.get('format')!r} v{manifest.get('version')}; "
                        f"this frontend reads {FORMAT} v{' and v'.join(map(str, VERSIONS))}: re-run "
                        f"`agile-tvm quantize` with this version of agile-tvm")
    config_path = path / "config.json"
    if not config_path.exists():
        raise UserError(f"{path} has no config.json: the checkpoint is incomplete, re-run `agile-tvm quantize`")
    config = json.loads(config_path.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no model.safetensors: the checkpoint is incomplete, re-run `agile-tvm quantize`")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return Checkpoint(path=path, manifest=manifest, config=config, tensors=tensors)


@dataclass(frozen=True)
class LinearSpec:
    """One quantized linear `P` as the kernels see it (docs/checkpoint.md, `linears[P]` and "Version 2").

    `act` "tensor": static layer-wise `P.act_scale`/`P.act_zero`; "token": per-row scale and zero point computed at
    run time. `float_zero`: the weights carry the float group offset `P.wmin` (v2 `"w_zero": "float"`).
    """

    prefix: str
    w_bits: int
    a_bits: int  # 0: the input stays float (w4a16)
    groups: int  # G = K / group size
    act: str
    float_zero: bool
    has_bias: bool


def linear_spec(ckpt: Checkpoint, prefix: str) -> LinearSpec | None:
    """The spec of linear `prefix`, None when it is not quantized (not listed in `linears`)."""
    info = ckpt.linears.get(prefix)
    if info is None:
        return None
    act = info.get("act", "tensor")
    w_zero = info.get("w_zero", "int")
    if act not in ACT_GRANULARITIES or w_zero not in WEIGHT_ZEROS:
        raise UserError(f"{ckpt.path}: linear {prefix} has act {act!r} / w_zero {w_zero!r}; this frontend knows act "
                        f"{' or '.join(ACT_GRANULARITIES)} and w_zero {' or '.join(WEIGHT_ZEROS)}: re-run "
                        f"`agile-tvm quantize` with this version of agile-tvm")
    return LinearSpec(
        prefix=prefix,
        w_bits=int(info.get("w_bits", 4)),
        a_bits=int(info.get("a_bits", 8)),
        groups=int(ckpt.tensor(prefix + ".wscale").shape[1]),
        act=act,
        float_zero=w_zero == "float",
        has_bias=bool(info.get("bias")) or prefix + ".bias" in ckpt.tensors,
    )


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] nibbles (low nibble = even k) -> int8 [N, K] signed codes in [-8, 7]."""
    lo = (packed & 0xF).astype(np.int16)
    hi = (packed >> 4).astype(np.int16)
    lo = np.where(lo >= 8, lo - 16, lo)
    hi = np.where(hi >= 8, hi - 16, hi)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int8)
    out[:, 0::2] = lo
    out[:, 1::2] = hi
    return out


def weight_codes(ckpt: Checkpoint, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """The signed weight codes q [N, K] (int8) and zero points wzero [N, G] of a quantized linear."""
    info = ckpt.linears[prefix]
    qweight = ckpt.tensor(prefix + ".qweight")
    q = unpack_int4(qweight) if int(info.get("w_bits", 4)) == 4 else qweight.astype(np.int8)
    q = q[:, : int(info["in"])] if q.shape[1] > int(info["in"]) else q
    return q, ckpt.tensor(prefix + ".wzero").astype(np.int8)


def dequantized_weight(ckpt: Checkpoint, prefix: str) -> np.ndarray:
    """W = wscale * (q - wzero) (+ wmin with v2 float offsets), float32 [N, K] (w4a16 linears: the input stays
    float)."""
    q, wzero = weight_codes(ckpt, prefix)
    wscale = ckpt.tensor(prefix + ".wscale").astype(np.float32)
    groups = wscale.shape[1]
    g = q.shape[1] // groups
    zq = q.astype(np.float32) - np.repeat(wzero.astype(np.float32), g, axis=1)
    w = np.repeat(wscale, g, axis=1) * zq
    if linear_spec(ckpt, prefix).float_zero:
        w = w + np.repeat(ckpt.tensor(prefix + ".wmin").astype(np.float32), g, axis=1)
    return w.astype(np.float32)


@dataclass(frozen=True)
class PruneSchedule:
    """Token pruning (docs/checkpoint.md, "Token pruning"): before each layer of `layers`, keep
    `prune_schedule.keep_count(n, gamma)` of the n tokens still processed."""

    beta: float
    start_layer: int  # as given (0: half the depth)
    end_layer: int  # as given (-1: the last layer)
    layers: tuple[int, ...]
    gamma: float

    def to_dict(self) -> dict:
        return {"beta": self.beta, "start_layer": self.start_layer, "end_layer": self.end_layer,
                "layers": list(self.layers), "gamma": self.gamma}


def prune_schedule(ckpt: Checkpoint, num_layers: int, beta: float | None = None,
                   start_layer: int | None = None) -> PruneSchedule | None:
    """The checkpoint's pruning schedule, or the one `beta` (and `start_layer`) give instead; None without pruning.

    The layers and gamma come from `agile_tvm.prune_schedule`, as the reference's `quant.configs.Pruning` (torch-free,
    so export stays free of torch)."""
    stored = ckpt.manifest.get("pruning") or {}
    if beta is None:
        beta = float(stored.get("beta", 0.0))
        start_layer = int(stored.get("start_layer", 0)) if start_layer is None else start_layer
    start_layer = 0 if start_layer is None else int(start_layer)
    end_layer = int(stored.get("end_layer", -1))
    if not 0.0 <= beta < 1.0:
        raise UserError(f"token pruning ratio beta {beta} must lie in [0, 1): e.g. --prune-beta 0.4")
    if start_layer < 0:
        raise UserError(f"the first pruning layer {start_layer} must be >= 0 (0: half the depth)")
    if beta <= 0:
        return None
    layers = tuple(prune_layers(beta, start_layer, end_layer, num_layers))
    if not layers:
        return None
    gamma = prune_gamma(beta, len(layers))
    return PruneSchedule(beta=beta, start_layer=start_layer, end_layer=end_layer, layers=layers, gamma=gamma)
