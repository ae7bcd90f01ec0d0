"""The elementary quantizers: uniform weights, uniform/TRIP activations, log2 softmax, symmetric attention tensors.

Everything here is plain tensor math on float tensors and integer codes, written to the rounding rules of
docs/checkpoint.md, so the TVM kernels can be checked against it:

- weights: signed codes, `W = scale * (q - zero) + offset` (offset = v2's float `wmin`, else 0); 4-bit codes in [-8, 7], 8-bit in [-127, 127]; zero points live
  in the same signed domain (0 when symmetric); granularity per tensor, per output channel, or per group of g inputs.
  Weight rounding is round-half-to-even (`torch.round`), as GPTQ does; only the stored codes matter downstream.
- activations: unsigned codes, `xq = clip(floor(x * r * 2^-alpha_c + 0.5) + zp, 0, 2^b - 1)` with `r = 1/scale`
  in float32 and a per-channel power-of-two exponent alpha_c (TRIP; all 0 for plain per-tensor quantization);
  v2's per-token granularity computes r and zp per row at run time (`token_params`).
- log2 softmax (paper eq. 3 as the contract fixes it): per query row, `c = clip(floor(-log2(p / pmax) + 0.5), 0,
  2^b - 1)`, the top code meaning "dropped" (0), dequantized `pmax * 2^-c`.
- symmetric per-tensor INT8 for Q, K, V: `clip(floor(x / s + 0.5), -127, 127)`.

TRIP search (paper eq. 5-8): one layer-wise scale/zero point shared by all channels plus alpha_c in {0..K} per
channel. The paper leaves the search open; here: candidate shared ranges are the calibration range divided by 2^t
(t in quarter steps up to K); for each, every channel takes the alpha that just fits its calibration range, or the
next one, whichever has the lower L2 error; the candidate with the lowest total L2 error wins. Calibration
extremes are never clipped (measured: clipping them, L2-optimal on the calibration set, doubled W8A8 perplexity on
SmolLM2), and an optional `margin` widens the final range for inputs beyond the calibration extremes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from agile_tvm.errors import UserError

SUPPORTED_BITS = (4, 8)


def check_bits(bits: int, what: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise UserError(f"{what} bits must be 4 or 8, got {bits}: choose --w-bits/--a-bits 4 or 8")


# ----------------------------------------------------------------------------------------------- weights
def weight_qrange(bits: int) -> tuple[int, int]:
    """Signed code range of a `bits`-bit weight: 4 -> [-8, 7]; 8 -> [-127, 127] (keeps -x representable)."""
    return (-8, 7) if bits == 4 else (-127, 127)


class WeightCodes(NamedTuple):
    """A quantized weight: `W = scale * (codes - zero) + offset`, params per row (or per [row, group])."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor  # integer zero point in the signed code domain (0 when symmetric or float_zero)
    offset: torch.Tensor  # float offset (v2 `wmin`; 0 unless float_zero)


def weight_params(w: torch.Tensor, bits: int, symmetric: bool, float_zero: bool = False):
    """(scale, zero, offset) for each row of `w` [R, C].

    Integer zero point (v1): min/max with the range always containing 0, `zero` rounded to an integer code.
    Float zero (v2, `float_zero`): the grid spans exactly [min, max] of the row, `offset` = the value of code 0
    (`min - qmin * scale`). On a model shipped in a block format such as Q4_1 (`d * u + m` per block of 32) this
    grid reproduces the block exactly, which an integer zero point cannot.
    """
    qmin, qmax = weight_qrange(bits)
    w = w.float()
    if float_zero:
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-10)
        return scale, torch.zeros_like(scale), lo - qmin * scale
    if symmetric:
        amax = w.abs().amax(dim=1).clamp(min=1e-8)
        scale = amax / qmax
        zero = torch.zeros_like(scale)
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        span = (hi - lo).clamp(min=1e-8)
        scale = span / (qmax - qmin)
        zero = (torch.round(-lo / scale) + qmin).clamp(qmin, qmax)
    return scale, zero, torch.zeros_like(scale)


#: The power-of-two scale grid (``WeightQuant.scale_grid="pow2"``): per row n, every group scale is 2^e_n * c with an
#: integer c in [1, GRID_C_MAX] and every float offset 2^e_n * d with an integer |d| <= GRID_D_MAX. The kernels then
#: sum a row's groups in integers (``agile_tvm.kernels.int_scales``, whose C_MAX / D_MAX these equal).
GRID_C_MAX, GRID_D_MAX = 255, 2047


def pow2_grid_exponent(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """e [R] per row of scale/offset [R, G]: the smallest power of two for which every scale code fits GRID_C_MAX
    and every offset code GRID_D_MAX after rounding (so the largest scale keeps 7-8 significant bits)."""
    need = torch.maximum(scale.double().abs().amax(dim=1) / (GRID_C_MAX - 0.5),
                         offset.double().abs().amax(dim=1) / (GRID_D_MAX - 0.5)).clamp(min=2.0**-140)
    return torch.ceil(torch.log2(need)).to(torch.int64)


def snap_to_pow2_grid(scale: torch.Tensor, offset: torch.Tensor, e: torch.Tensor | None = None):
    """(scale, offset) [R, G] rounded to the row grid 2^e * integer (``pow2_grid_exponent`` unless `e` is given),
    as exact float32 values; a scale never rounds to 0 (code >= 1)."""
    e = pow2_grid_exponent(scale, offset) if e is None else e
    unit = torch.pow(torch.tensor(2.0, dtype=torch.float64), e.double())[:, None]
    c = torch.round(scale.double() / unit).clamp(1, GRID_C_MAX)
    d = torch.round(offset.double() / unit).clamp(-GRID_D_MAX, GRID_D_MAX)
    return (c * unit).to(scale.dtype), (d * unit).to(offset.dtype)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    offset: torch.Tensor | None = None) -> torch.Tensor:
    """Signed codes of `w` [R, C] with per-row `scale`, `zero` (float tensor holding integers), `offset` [R]."""
    qmin, qmax = weight_qrange(bits)
    if offset is not None:
        w = w - offset[:, None]
    return (torch.round(w / scale[:, None]) + zero[:, None]).clamp(qmin, qmax)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                      offset: torch.Tensor | None = None) -> torch.Tensor:
    """`W[n, k] = scale[n, k // g] * (q[n, k] - zero[n, k // g]) + offset[n, k // g]` (the contract's rule)."""
    s = scale.repeat_interleave(group_size, dim=1)
    z = zero.to(torch.float32).repeat_interleave(group_size, dim=1)
    w = s * (q.to(torch.float32) - z)
    if offset is not None:
        w = w + offset.to(torch.float32).repeat_interleave(group_size, dim=1)
    return w


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 float_zero: bool = False, scale_grid: str = "float") -> WeightCodes:
    """Round-to-nearest: codes [N, K] and scale/zero/offset [N, G] for groups of `group_size` inputs
    (``scale_grid="pow2"``: scales and float offsets on each row's power-of-two grid, ``snap_to_pow2_grid``)."""
    n, k = w.shape
    g = resolve_group_size(group_size, k)
    wg = w.float().reshape(n, k // g, g).reshape(-1, g)
    scale, zero, offset = weight_params(wg, bits, symmetric, float_zero)
    if scale_grid == "pow2":
        sc, of = snap_to_pow2_grid(scale.reshape(n, k // g), offset.reshape(n, k // g))
        scale, offset = sc.reshape(-1), of.reshape(-1)
    q = quantize_weight(wg, scale, zero, bits, offset).reshape(n, k)
    shape = (n, k // g)
    return WeightCodes(q, scale.reshape(shape), zero.reshape(shape), offset.reshape(shape))


def resolve_group_size(group_size: int, k: int) -> int:
    """-1 (or 0) means one group per output channel; otherwise g must divide K."""
    g = k if group_size in (-1, 0) or group_size >= k else group_size
    if k % g:
        raise UserError(f"group size {group_size} does not divide the input size {k}: use a divisor of {k} or -1")
    return g


# ------------------------------------------------------------------------------------------- activations
@dataclass
class ActParams:
    """Activation quantization of one linear input.

    granularity "tensor" (v1, static): layer-wise `scale`/`zero` from calibration plus TRIP exponents `shift`.
    granularity "token" (v2, dynamic): `scale`/`zero` are None; each row gets its own at run time
    (`token_params`); `shift` still divides channels by 2^alpha first (all 0 without TRIP).
    """

    scale: torch.Tensor | None  # float32 []
    zero: torch.Tensor | None  # int32 []
    shift: torch.Tensor  # uint8 [K]
    bits: int
    granularity: str = "tensor"


def token_params(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale [..., 1], zero point [..., 1]) of `v` (x already divided by 2^alpha), contract v2, float32:
    s = (max(0, max v) - min(0, min v)) / (2^b - 1), 1 for an all-zero row; zp = clip(floor(-lo * (1/s) + 0.5))."""
    levels = float(2**bits - 1)
    lo = v.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = v.amax(dim=-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / torch.tensor(levels, dtype=torch.float32)
    s = torch.where(s == 0, torch.ones_like(s), s)
    r = torch.tensor(1.0, dtype=torch.float32) / s
    zp = torch.floor(-lo * r + 0.5).clamp(0, levels)
    return s, zp


def quantize_act_rows(x: torch.Tensor, p: ActParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [..., K], scale [..., 1], zero [..., 1]) as float32 exact integers/values, for either granularity."""
    x = x.to(torch.float32)
    inv_pow = torch.exp2(-p.shift.to(torch.float32))
    if p.granularity == "token":
        v = x * inv_pow
        s, zp = token_params(v, p.bits)
        r = torch.tensor(1.0, dtype=torch.float32) / s
        return (torch.floor(v * r + 0.5) + zp).clamp(0, 2**p.bits - 1), s, zp
    r = torch.tensor(1.0, dtype=torch.float32) / p.scale.to(torch.float32)
    v = torch.floor(x * r * inv_pow + 0.5) + p.zero.to(torch.float32)
    s = p.scale.to(torch.float32).reshape([1] * x.dim())
    return v.clamp(0, 2**p.bits - 1), s, p.zero.to(torch.float32).reshape([1] * x.dim())


def quantize_act(x: torch.Tensor, p: ActParams) -> torch.Tensor:
    """Unsigned codes of `x` [..., K] as float32 (exact integers), by the contract's float32 rounding rule."""
    return quantize_act_rows(x, p)[0]


def fake_quant_act(x: torch.Tensor, p: ActParams) -> torch.Tensor:
    """What the integer linear sees of `x`, in the input's units (TRIP factors undone): for error measurement."""
    xq, s, zp = quantize_act_rows(x, p)
    return (xq - zp) * s * torch.exp2(p.shift.to(torch.float32))


def _uniform_codes_error(x, lo: float, hi: float, bits: int, shifts: torch.Tensor):
    """Per-channel L2 error of quantizing x [M, K] with range [lo, hi] and channel exponents `shifts` [K],
    by exactly the rounding rule of `quantize_act` (float32 scale, r = 1/scale)."""
    levels = 2**bits - 1
    scale = torch.tensor((hi - lo) / levels, dtype=torch.float32)
    zero = torch.tensor(min(max(math.floor(-lo / float(scale) + 0.5), 0), levels), dtype=torch.int32)
    p = ActParams(scale, zero, shifts.to(torch.uint8), bits)
    xd = fake_quant_act(x, p)
    return ((xd - x) ** 2).sum(dim=0), scale, zero


def trip_search(x: torch.Tensor, bits: int, k_max: int, max_rows: int = 1024, seed: int = 0,
                margin: float = 1.0) -> ActParams:
    """TRIP: layer-wise scale/zero point plus per-channel power-of-two exponents in {0..k_max}, by L2 error.

    `x` [M, K] are calibration inputs of one linear. With k_max = 0 this is plain per-tensor min/max-searched
    uniform quantization (the baseline TRIP has to beat). The error is measured on at most `max_rows` rows: the
    64 rows with the largest magnitude (token outliers such as the first token) plus a random sample.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    if x.shape[0] > max_rows:
        g = torch.Generator().manual_seed(seed)
        top = torch.topk(x.abs().amax(dim=1), 64).indices
        rest = torch.randperm(x.shape[0], generator=g)[: max_rows - 64]
        xs = x[torch.unique(torch.cat([top, rest]))]
    else:
        xs = x
    ch_lo = x.amin(dim=0).clamp(max=0)
    ch_hi = x.amax(dim=0).clamp(min=0)
    k = x.shape[1]
    # Candidate shared ranges: the global range divided by 2^t, t in quarter steps up to k_max (the largest
    # outlier channel just fits at alpha = ceil(t)). No candidate clips: measured on SmolLM2, clipping the rare
    # extreme values of calibration inputs (L2-optimal on the calibration set) doubled W8A8 perplexity, because
    # those values are the massive activations later layers depend on.
    gl, gh = ch_lo.min().item(), ch_hi.max().item()
    cands = [(gl / 2**t, gh / 2**t) for t in [i / 4 for i in range(4 * k_max + 1)]]
    best = None
    for lo, hi in cands:
        if hi - lo <= 1e-12:
            continue
        # per channel, the alpha with the lowest L2 error among the one that just fits the channel's range into
        # [lo, hi] and the next (rounding can push the extreme code past the range)
        need = torch.maximum(ch_hi / max(hi, 1e-30), ch_lo / min(lo, -1e-30))
        fit = torch.ceil(torch.log2(need.clamp(min=1e-30))).clamp(0, k_max)
        errs, shifts = [], []
        for d in (0, 1):  # never below the fit: clipping calibration extremes (rare, large) hurts perplexity
            a = (fit + d).clamp(0, k_max)
            e, scale, zero = _uniform_codes_error(xs, lo, hi, bits, a)
            errs.append(e)
            shifts.append(a)
        ch_err, pick = torch.stack(errs).min(dim=0)
        shift = torch.stack(shifts).gather(0, pick[None])[0]
        total = ch_err.sum().item()
        if best is None or total < best[0]:
            best = (total, scale, zero, shift)
    if best is None:  # an all-zero input: any scale works
        return ActParams(torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), torch.zeros(k, dtype=torch.uint8), bits)
    _, scale, zero, shift = best
    # Headroom for inputs beyond the calibration extremes: the range grows by `margin` around the same zero point
    # (static scales meet unseen text; a clipped massive activation costs more than a coarser step).
    scale = (scale * margin).to(torch.float32)
    return ActParams(scale, zero.to(torch.int32), shift.to(torch.uint8), bits)


# -------------------------------------------------------------------------------------------- log2 softmax
def smooth_shifts(x: torch.Tensor, quantile: float, k_max: int) -> torch.Tensor:
    """Power-of-two smoothing exponents alpha_c [K] (uint8): floor(log2(max|x_c| / t)) clipped to 0..k_max, where t
    is the `quantile` of the channel maxima. Dividing the outlier channels by 2^alpha_c (and folding 2^alpha_c into
    the weights, exactly) narrows every token's range, so per-token INT8 codes resolve the ordinary channels better;
    SmoothQuant's idea restricted to powers of two, so the kernels' shift form of the contract carries it."""
    amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
    t = torch.quantile(amax, quantile).clamp(min=1e-12)
    alpha = torch.floor(torch.log2((amax / t).clamp(min=1.0)))
    return alpha.clamp(0, k_max).to(torch.uint8)


def log2_codes(p: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log2 codes of probabilities `p` [..., J] per row (last axis) and the row max: (codes, pmax[..., 1])."""
    pmax = p.amax(dim=-1, keepdim=True)
    top = 2**bits - 1
    with torch.no_grad():
        ratio = p / pmax.clamp(min=torch.finfo(p.dtype).tiny)
        c = torch.floor(-torch.log2(ratio) + 0.5)
        c = torch.nan_to_num(c, nan=top, posinf=top).clamp(0, top)
    return c, pmax


def log2_dequant(c: torch.Tensor, pmax: torch.Tensor, bits: int) -> torch.Tensor:
    """`pmax * 2^-c`, 0 for the top code (the probability is dropped)."""
    top = 2**bits - 1
    return torch.where(c >= top, torch.zeros_like(c), pmax * torch.exp2(-c))


# ------------------------------------------------------------------------------- symmetric tensor (Q, K, V)
def quantize_sym8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`clip(floor(x / s + 0.5), -127, 127)` as float32 exact integers."""
    return torch.clamp(torch.floor(x / scale + 0.5), -127, 127)


def search_sym8_scale(x: torch.Tensor, max_elems: int = 1_000_000, seed: int = 0) -> torch.Tensor:
    """Per-tensor symmetric INT8 scale minimising the L2 error over a grid of clipping ratios of max|x|."""
    x = x.reshape(-1).float()
    if x.numel() > max_elems:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randint(0, x.numel(), (max_elems,), generator=g)]
    amax = x.abs().max().clamp(min=1e-8)
    best = None
    for ratio in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4):
        s = amax * ratio / 127
        err = ((quantize_sym8(x, s) * s - x) ** 2).sum().item()
        if best is None or err < best[0]:
            best = (err, s)
    return torch.tensor(float(best[1]), dtype=torch.float32)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal to quantization noise ratio in dB (for reports and tests)."""
    num = (ref.double() ** 2).sum()
    den = ((ref.double() - approx.double()) ** 2).sum().clamp(min=1e-300)
    return float(10 * math.log10(num / den))
