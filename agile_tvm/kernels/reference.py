"""Numpy twins of the TensorIR kernels, written straight from docs/checkpoint.md.

They are the yardstick of the kernel tests: the integer part (accumulators, codes) must match bit for bit;
the float epilogues use the same float32 operation order as the kernels, so they agree to a few ulps (v2 linears:
within ``linear_error_bound``, since the kernels may fuse and reorder the float sum as the contract allows).
Nothing here is fast; everything is explicit.
"""

from __future__ import annotations

import numpy as np


def unpack_int4(qweight: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] nibble pairs (low nibble = even k) -> int8 [N, K] in [-8, 7]."""
    b = np.asarray(qweight, dtype=np.uint8)
    lo = (b & 0xF).astype(np.int8)
    hi = (b >> 4).astype(np.int8)
    lo = np.where(lo >= 8, lo - 16, lo).astype(np.int8)
    hi = np.where(hi >= 8, hi - 16, hi).astype(np.int8)
    out = np.empty((b.shape[0], b.shape[1] * 2), dtype=np.int8)
    out[:, 0::2] = lo
    out[:, 1::2] = hi
    return out


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int [N, K] in [-8, 7] -> uint8 [N, K/2] in the checkpoint's nibble order (inverse of unpack_int4)."""
    q = np.asarray(q)
    if q.shape[1] % 2:
        raise ValueError("K must be even to pack 4-bit weights")
    if q.min() < -8 or q.max() > 7:
        raise ValueError("4-bit codes must lie in [-8, 7]")
    u = (q.astype(np.int16) & 0xF).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def quantize_act(x, act_scale, act_zero, act_shift, bits: int) -> np.ndarray:
    """TRIP activation quantization: clip(floor(x * (1/s) * 2^-alpha + 0.5) + zp, 0, 2^b - 1) in float32."""
    x = np.asarray(x, dtype=np.float32)
    r = np.float32(1.0) / np.float32(act_scale)
    pow2 = np.ldexp(np.float32(1.0), -np.asarray(act_shift, np.int32)).astype(np.float32)  # exact 2^-alpha
    v = np.floor((x * r) * pow2 + np.float32(0.5)).astype(np.float32)
    q = v + np.float32(np.int32(act_zero))
    return np.clip(q, 0, 2**bits - 1).astype(np.uint8)


def quantize_act_token(x, act_shift, bits: int, group_size=None):
    """Checkpoint v2 per-token quantization, all float32 -> (xq u8[M,K], s f32[M], zp i32[M], xsum i32[M,G]).

    v = x * 2^-alpha; lo/hi = min/max of the row and 0; s = (hi - lo) / (2^b - 1) (1 for an all-zero row);
    r = 1 / s; zp = clip(floor(-lo * r + 0.5)); xq = clip(floor(v * r + 0.5) + zp); xsum = group sums of xq - zp.
    Every product is rounded to float32 before the following add (no fused multiply-add), as the kernel does."""
    x = np.asarray(x, dtype=np.float32)
    M, K = x.shape
    top = np.float32(2**bits - 1)
    pow2 = np.ldexp(np.float32(1.0), -np.asarray(act_shift, np.int32)).astype(np.float32)
    v = (x * pow2[None, :]).astype(np.float32)
    lo = np.minimum(np.float32(0), v.min(axis=1)).astype(np.float32)
    hi = np.maximum(np.float32(0), v.max(axis=1)).astype(np.float32)
    s = ((hi - lo) / top).astype(np.float32)
    s = np.where(s == np.float32(0), np.float32(1), s).astype(np.float32)
    r = (np.float32(1) / s).astype(np.float32)
    zp_f = np.floor((-lo * r).astype(np.float32) + np.float32(0.5)).astype(np.float32)
    zp = np.clip(zp_f, 0, top).astype(np.int32)
    t = (v * r[:, None]).astype(np.float32)
    codes = np.floor(t + np.float32(0.5)).astype(np.float32) + zp[:, None].astype(np.float32)
    xq = np.clip(codes, 0, top).astype(np.uint8)
    gs = K if group_size in (None, -1) else int(group_size)
    xsum = (xq.astype(np.int64) - zp[:, None]).reshape(M, K // gs, gs).sum(axis=2).astype(np.int32)
    return xq, s, zp, xsum


def linear_acc(xq, act_zero, q, wzero, group_size: int) -> np.ndarray:
    """Exact integer accumulators acc[m, n, g] = sum_{k in g} (xq - zp) * (q - wzero[n, g]) as int64.

    ``act_zero``: one zero point (v1, per tensor) or one per row (v2, per token)."""
    xq = np.asarray(xq, dtype=np.int64)
    q = np.asarray(q, dtype=np.int64)
    wzero = np.asarray(wzero, dtype=np.int64)
    M, K = xq.shape
    N = q.shape[0]
    G = K // group_size
    zp = np.asarray(act_zero, dtype=np.int64).reshape(-1, 1)
    xc = (xq - zp).reshape(M, G, group_size)
    wc = (q - np.repeat(wzero, group_size, axis=1)).reshape(N, G, group_size)
    return np.einsum("mgk,ngk->mng", xc, wc)


def linear_epilogue(acc, wscale, act_scale, bias=None) -> np.ndarray:
    """y = (sum_g float32(acc_g) * wscale[n, g]) * act_scale + bias, float32, in the kernels' order."""
    acc32 = np.asarray(acc).astype(np.float32)
    ws = np.asarray(wscale, dtype=np.float32)
    y = acc32[:, :, 0] * ws[None, :, 0]
    for g in range(1, ws.shape[1]):
        y = y + acc32[:, :, g] * ws[None, :, g]
    y = y * np.float32(act_scale)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32)[None, :]
    return y.astype(np.float32)


def linear(xq, act_scale, act_zero, q, wzero, wscale, bias=None, group_size=None) -> np.ndarray:
    """The quantized linear of docs/checkpoint.md (W4A8, W8A8 and W4A4 alike: q is the unpacked int code)."""
    K = np.asarray(xq).shape[1]
    g = K if group_size in (None, -1) else group_size
    return linear_epilogue(linear_acc(xq, act_zero, q, wzero, g), wscale, act_scale, bias)


def linear_epilogue_v2(acc, wscale, act_scale, wmin=None, xsum=None, bias=None) -> np.ndarray:
    """Checkpoint v2: y = s_m * sum_g (wscale[n, g] * float32(acc_g) + wmin[n, g] * float32(xsum[m, g])) + bias,
    float32, groups summed in order (the kernels' order; they may fuse the multiply-adds)."""
    acc32 = np.asarray(acc).astype(np.float32)
    ws = np.asarray(wscale, dtype=np.float32)
    s = np.asarray(act_scale, dtype=np.float32).reshape(-1, 1)
    y = np.zeros(acc32.shape[:2], np.float32)
    for g in range(ws.shape[1]):
        t = acc32[:, :, g] * ws[None, :, g]
        if wmin is not None:
            t = t + np.asarray(wmin, np.float32)[None, :, g] * np.asarray(xsum)[:, g:g + 1].astype(np.float32)
        y = (y + t).astype(np.float32)
    y = y * s
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32)[None, :]
    return y.astype(np.float32)


def linear_v2(xq, act_scale, act_zero, q, wzero, wscale, wmin=None, xsum=None, bias=None,
              group_size=None) -> np.ndarray:
    """The v2 quantized linear: per-row act_scale f32[M] / act_zero i32[M]; optional float offsets wmin f32[N, G]
    with the per-row group sums xsum i32[M, G] of (xq - zp)."""
    K = np.asarray(xq).shape[1]
    g = K if group_size in (None, -1) else group_size
    return linear_epilogue_v2(linear_acc(xq, act_zero, q, wzero, g), wscale, act_scale, wmin, xsum, bias)


def linear_error_bound(acc, wscale, act_scale, wmin=None, xsum=None, bias=None) -> np.ndarray:
    """Bound on |kernel - linear_v2| from float32 rounding alone: each of the two results is a sum of
    T = 2G + 2 rounded terms (G products acc*ws, G offsets wmin*xsum, the scale, the bias), so each is within
    T * 2^-24 * S of the exact value, S = |s| * sum_g (|ws acc| + |wmin xsum|) + |bias| (Higham, recursive
    summation; fused multiply-adds only remove roundings). The two may differ by twice that."""
    a = np.abs(np.asarray(acc, np.float64))
    S = np.einsum("mng,ng->mn", a, np.abs(np.asarray(wscale, np.float64)))
    G = a.shape[2]
    if wmin is not None:
        S = S + np.abs(np.asarray(xsum, np.float64)) @ np.abs(np.asarray(wmin, np.float64)).T
    S = S * np.abs(np.asarray(act_scale, np.float64)).reshape(-1, 1)
    if bias is not None:
        S = S + np.abs(np.asarray(bias, np.float64))[None, :]
    return 2 * (2 * G + 2) * 2.0**-24 * S


def qk_int8(q8, k8, q_scale, k_scale, causal: bool = False) -> np.ndarray:
    """Scores s[h, i, j] = float32(int32 dot(q8[h, i], k8[h // rep, j])) * (q_scale * k_scale) * (1/sqrt(D)).

    ``causal``: query i is at position N - M + i and keys after it score -inf."""
    q8 = np.asarray(q8, dtype=np.int32)
    k8 = np.asarray(k8, dtype=np.int32)
    rep = q8.shape[0] // k8.shape[0]
    kk = np.repeat(k8, rep, axis=0)
    dot = np.einsum("hid,hjd->hij", q8, kk)
    D = q8.shape[-1]
    scale = np.float32(q_scale) * np.float32(k_scale)
    inv = np.float32(1.0) / np.sqrt(np.float32(D))
    s = ((dot.astype(np.float32) * scale) * inv).astype(np.float32)
    if causal:
        M, N = s.shape[1], s.shape[2]
        hidden = np.arange(N)[None, :] > (N - M + np.arange(M))[:, None]
        s[:, hidden] = -np.inf
    return s


def log2_code(ratio, top: int) -> np.ndarray:
    """floor(-log2(r) + 0.5) clipped to [0, top], evaluated exactly from the float32 bits of r in (0, 1].

    With r = m * 2^e (1 <= m < 2): -log2 r + 0.5 = -e + (0.5 - log2 m), whose floor is -e when m < sqrt 2 and
    -e - 1 when m > sqrt 2 (no float32 equals sqrt 2). A float log2 would round near those boundaries."""
    bits = np.asarray(ratio, dtype=np.float32).view(np.int32).astype(np.int64)
    e = ((bits >> 23) & 0xFF) - 127
    sqrt2_mant = int(np.array(np.sqrt(np.float32(2.0)), np.float32).view(np.int32)) & 0x7FFFFF
    c = -e - ((bits & 0x7FFFFF) > sqrt2_mant)
    return np.clip(c, 0, top)


def log2_softmax_quant(p, bits: int):
    """Log2 codes c = clip(floor(-log2(p / pmax) + 0.5), 0, 2^b - 1) per row; top code = dropped. -> (codes, pmax)."""
    p = np.asarray(p, dtype=np.float32)
    pmax = p.max(axis=-1)
    top = 2**bits - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (p / pmax[..., None]).astype(np.float32)
    codes = np.where(p > 0, log2_code(np.where(p > 0, ratio, np.float32(1)), top), top).astype(np.uint8)
    return codes, pmax.astype(np.float32)


def attn_v_acc(codes, v8, bits: int) -> np.ndarray:
    """Integer AttnV: acc[h, i, d] = sum_j v8[j, d] << (2^b - 2 - c[i, j]) (0 for the top code), int64."""
    codes = np.asarray(codes, dtype=np.int64)
    v8 = np.asarray(v8, dtype=np.int64)
    rep = codes.shape[0] // v8.shape[0]
    vv = np.repeat(v8, rep, axis=0)
    top = 2**bits - 1
    w = np.where(codes < top, np.left_shift(1, np.clip(top - 1 - codes, 0, None)), 0)
    return np.einsum("hij,hjd->hid", w, vv)


def attn_v_log2(codes, v8, pmax, v_scale, bits: int) -> np.ndarray:
    """out = float32(acc) * (pmax * v_scale * 2^-(2^b - 2)), float32."""
    acc = attn_v_acc(codes, v8, bits)
    f = (np.asarray(pmax, np.float32) * np.float32(v_scale)) * np.float32(2.0 ** -(2**bits - 2))
    return (acc.astype(np.float32) * f[..., None]).astype(np.float32)


def requantize(y, out_scale, out_zero, out_shift, bits: int = 8) -> np.ndarray:
    """Quantize a linear's float output for the next quantized op (same rule as quantize_act)."""
    return quantize_act(y, out_scale, out_zero, out_shift, bits)
