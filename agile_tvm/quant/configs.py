"""Named quantization schemes, one dataclass per knob group (the style of MLC-LLM's quantization configs).

A `QuantConfig` says everything `quantize_model` needs; `get_config(name)` returns a fresh copy of a named one:

| name           | weights                                   | linear inputs                 | attention              |
|----------------|-------------------------------------------|-------------------------------|------------------------|
| fp             | float                                     | float                         | float                  |
| w4a16-rtn      | 4-bit RTN, groups of 32, float offsets    | float                         | float                  |
| w4a16-gptq     | 4-bit GPTQ, act order, g32, float offsets | float                         | float                  |
| w8a8           | 8-bit GPTQ, g32, float offsets            | INT8 per token, pow2 smoothing | float                 |
| agileq8        | 4-bit GPTQ, act order, g32, float offsets on the pow2 grid | INT8 per token | INT8 Q.K, log2 4-bit, INT8 V |
| agileq4        | as agileq8                                | as agileq8, INT4 per token for the attention output projection | as agileq8 |
| agileq8-static | 4-bit GPTQ, act order, g32, int zero      | INT8 static layer-wise + TRIP (the paper; checkpoint v1) | as agileq8 |

Why per-token activations and float weight offsets (checkpoint v2), measured on SmolLM2 (fake quantization of
every linear, handbook, 4 windows of 512 tokens, calibration 16 x 512 Austen tokens, fp 18.92): static layer-wise
INT8 with TRIP 24.94, per-token asymmetric INT8 19.14 (symmetric 19.51; per-token after TRIP's 2^-alpha 19.29);
4-bit RTN g32 with an integer zero point 23.42, with a float offset 18.92 (exact: the model ships as Q4_1 blocks of
32, `d * u + m`). TRIP folding scales weight columns by 2^alpha, which breaks that block grid: float offsets + TRIP
+ per-token 26.56. So the default configs use per-token INT8 without TRIP; TRIP stays the heart of
`agileq8-static`, the paper's static scheme, and is available to any config (`ActQuant.trip`).
The LM head (agileq8/agileq4 `head_bits=8`): decode reads every head weight per token (SmolLM2: 113 MB in FP32,
more than all its layers at 4 bits), so the head is INT8 in groups of 32 (symmetric) with per-token INT8 inputs:
28 MB. SmolLM2's embedding ships as Q8_0 (symmetric blocks of 32), which this grid reproduces exactly.
Attention quantization alone (same windows): 19.32 (INT8 Q/K/V alone 18.97, log2 4-bit softmax alone 19.10).

Why agileq8/agileq4 put the group scales and offsets on a per-row power-of-two grid (`scale_grid="pow2"`: 2^e_n times
an integer, 8-bit scale codes, 12-bit offset codes, docs/checkpoint.md): the x86 prefill GEMM then sums a row's
groups in integers instead of converting and scaling every group (kernels/int_scales.py, 1.19-1.25x the GEMM on
SmolLM2's shapes), and it costs no accuracy measured: SmolLM2 agileq8, handbook 10 x 2048, PyTorch reference 23.927
on the grid against 23.985 with free float scales (session 9). w4a16 configs keep free scales (their float linears
gain nothing, and free scales reproduce the shipped Q4_1 blocks exactly).

Why groups of 32 for 4-bit weights: measured on SmolLM2 (handbook, one 512-token window, fp 11.21, 2k Austen
calibration tokens): RTN per output channel 23.2, RTN in groups of 32 16.2; GPTQ per channel (no act order) 50.9,
i.e. GPTQ with this little out-of-domain calibration overfits (see the report). The embedded model was itself shipped as Q4_1 (blocks of 32), so per-channel 4-bit cannot follow
its per-block scales. Per-channel remains available (`group_size=-1`, `--group-size -1`).

Why agileq4 makes exactly the attention output projection INT4 (per token): the paper allows INT4 "for some activations
after self-attention"; of the linear inputs that come after attention, the o_proj input (the AttnV output) has no
outlier channels (it is a convex mix of V rows), while the MLP inputs carry the largest outliers of the model
(down_proj: 400x the median channel on SmolLM2). Caveat: this choice rests on that argument; it was NOT measured
against the alternatives (time ran out). `a_bits_by_role` lets users try other splits.

Linear roles (one name per place in a block, across architectures): `qkv` (q/k/v projections, BLOOM's fused
query_key_value), `o` (attention output), `up` (gate/up, fc1, dense_h_to_4h), `down` (down_proj, fc2, dense_4h_to_h).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

from agile_tvm.errors import UserError
from agile_tvm.prune_schedule import prune_gamma, prune_layers
from agile_tvm.quant.quantizers import check_bits

ROLES = ("qkv", "o", "up", "down")


@dataclass
class WeightQuant:
    bits: int = 4
    method: str = "gptq"  # gptq | rtn
    group_size: int = -1  # -1: per output channel
    symmetric: bool = False
    act_order: bool = True
    percdamp: float = 0.01
    zero: str = "int"  # int: integer zero point (v1); float: a float offset per group (v2 `wmin`)
    # float: any float32 group scales/offsets; pow2: on each row's power-of-two grid (2^e * integer codes, needs
    # zero "float"), which lets the x86 GEMM sum a row's groups in integers (kernels/int_scales.py)
    scale_grid: str = "float"


@dataclass
class ActQuant:
    bits: int = 8
    trip: bool = True
    trip_k: int = 6  # alpha_c in {0..trip_k}
    a_bits_by_role: dict = field(default_factory=dict)  # e.g. {"o": 4}
    margin: float = 1.0  # range headroom beyond the calibration extremes (scale *= margin)
    granularity: str = "tensor"  # tensor: static layer-wise scale (v1, the paper); token: dynamic per row (v2)
    # Power-of-two smoothing (w8a8): channels whose calibration max exceeds this quantile of all channels' maxima
    # are divided by 2^floor(log2(max / quantile)) (at most 2^trip_k), folded into the weights like TRIP's factors;
    # 0: off. Unlike TRIP's L2 search (made for one layer-wise scale), it only tames outlier channels.
    smooth: float = 0.0


@dataclass
class AttnQuant:
    qk_bits: int = 8
    softmax: str = "log2"
    softmax_bits: int = 4
    v_bits: int = 8


@dataclass
class Pruning:
    """Token pruning (paper eq. 9): keep (1-gamma) of the tokens before each layer from start_layer on."""

    beta: float = 0.0  # fraction of tokens pruned by the last pruning layer
    start_layer: int = 0  # 0: half the depth (see prune_schedule.prune_layers)
    end_layer: int = -1  # -1: up to the last layer

    def layers(self, num_layers: int) -> list[int]:
        return prune_layers(self.beta, self.start_layer, self.end_layer, num_layers)

    def gamma(self, num_layers: int) -> float:
        return prune_gamma(self.beta, len(self.layers(num_layers)))


@dataclass
class QuantConfig:
    name: str = "fp"
    weight: WeightQuant | None = None  # None: float weights
    act: ActQuant | None = None  # None: float linear inputs
    attention: AttnQuant | None = None  # None: float attention
    pruning: Pruning = field(default_factory=Pruning)
    head_bits: int = 0  # 0: float LM head; 8: INT8 weights in groups of 32 (symmetric) with per-token INT8 inputs

    def a_bits(self, role: str) -> int:
        if self.act is None:
            return 0
        return int(self.act.a_bits_by_role.get(role, self.act.bits))

    def validate(self) -> "QuantConfig":
        if self.weight is not None:
            check_bits(self.weight.bits, "weight")
            if self.weight.method not in ("gptq", "rtn"):
                raise UserError(f"unknown weight method '{self.weight.method}': use gptq or rtn")
            if self.weight.zero not in ("int", "float"):
                raise UserError(f"unknown weight zero point '{self.weight.zero}': use int or float")
            if self.weight.scale_grid not in ("float", "pow2"):
                raise UserError(f"unknown weight scale grid '{self.weight.scale_grid}': use float or pow2")
            if self.weight.scale_grid == "pow2" and self.weight.zero != "float":
                raise UserError('the pow2 scale grid needs float weight offsets: set the weight zero to "float"')
        if self.act is not None:
            check_bits(self.act.bits, "activation")
            for role, bits in self.act.a_bits_by_role.items():
                if role not in ROLES:
                    raise UserError(f"unknown linear role '{role}': use one of {', '.join(ROLES)}")
                check_bits(int(bits), f"activation ({role})")
            if self.act.granularity not in ("tensor", "token"):
                raise UserError(f"unknown activation granularity '{self.act.granularity}': use tensor or token")
            if self.act.trip_k < 0 or self.act.trip_k > 7:
                raise UserError(f"TRIP K must be in 0..7, got {self.act.trip_k}")
            if not 0.0 <= self.act.smooth < 1.0:
                raise UserError(f"smoothing quantile must be in [0, 1) (0: off), got {self.act.smooth}")
            if self.act.smooth and self.act.granularity != "token":
                raise UserError("power-of-two smoothing is for per-token activations: use act granularity token")
            if self.act.smooth and self.act.trip:
                raise UserError("TRIP and power-of-two smoothing both set the channel factors: turn one off")
        if self.attention is not None:
            if self.attention.softmax != "log2" or self.attention.softmax_bits not in (3, 4, 5):
                raise UserError("softmax quantization must be log2 with 3-5 bits")
            if self.attention.qk_bits != 8 or self.attention.v_bits != 8:
                raise UserError("attention Q/K/V quantization is INT8 only (qk_bits = v_bits = 8)")
        if self.head_bits not in (0, 8):
            raise UserError(f"LM head bits must be 0 (float) or 8, got {self.head_bits}")
        if self.head_bits and self.weight is None:
            raise UserError("a quantized LM head needs a quantized config (weights quantized too)")
        if not 0.0 <= self.pruning.beta < 1.0:
            raise UserError(f"prune beta must be in [0, 1), got {self.pruning.beta}")
        if self.pruning.start_layer < 0:
            raise UserError(f"prune start layer must be >= 0, got {self.pruning.start_layer}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "QuantConfig":
        return QuantConfig(
            name=d["name"],
            weight=WeightQuant(**d["weight"]) if d.get("weight") else None,
            act=ActQuant(**d["act"]) if d.get("act") else None,
            attention=AttnQuant(**d["attention"]) if d.get("attention") else None,
            pruning=Pruning(**d.get("pruning", {})),
            head_bits=int(d.get("head_bits", 0)),
        )


G4 = 32  # 4-bit weight group size (see the module docstring)


def _w4(method: str, scale_grid: str = "float") -> WeightQuant:
    return WeightQuant(4, method, G4, act_order=(method == "gptq"), zero="float", scale_grid=scale_grid)


def _a(bits: int = 8, **kw) -> ActQuant:
    return ActQuant(bits, trip=False, granularity="token", **kw)


CONFIGS: dict[str, QuantConfig] = {
    "fp": QuantConfig("fp"),
    "w4a16-rtn": QuantConfig("w4a16-rtn", _w4("rtn")),
    "w4a16-gptq": QuantConfig("w4a16-gptq", _w4("gptq")),
    "w8a8": QuantConfig("w8a8", WeightQuant(8, "gptq", G4, zero="float"), _a(smooth=0.99, trip_k=7)),
    "agileq8": QuantConfig("agileq8", _w4("gptq", "pow2"), _a(), AttnQuant(), head_bits=8),
    "agileq4": QuantConfig("agileq4", _w4("gptq", "pow2"), _a(a_bits_by_role={"o": 4}), AttnQuant(), head_bits=8),
    # The paper as written (and checkpoint v1): static layer-wise INT8 with TRIP, integer weight zero points.
    "agileq8-static": QuantConfig("agileq8-static", WeightQuant(4, "gptq", G4), ActQuant(8), AttnQuant()),
}


def get_config(name: str) -> QuantConfig:
    if name not in CONFIGS:
        raise UserError(f"unknown quantization config '{name}': choose one of {', '.join(CONFIGS)}")
    return copy.deepcopy(CONFIGS[name])
