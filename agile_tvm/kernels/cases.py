"""Random, contract-valid inputs for every kernel together with the numpy reference output.

Shared by the tests, the aarch64 (qemu) checks and the benchmark, so all three exercise the same argument order.
Each ``*_case`` returns ``(args, out_index, expected)``: ``args`` in the PrimFunc's parameter order with a zero
output buffer at ``out_index``.
"""

from __future__ import annotations

import numpy as np

from . import layout, reference


def _scalar(v, dtype):
    return np.array(v, dtype=dtype)


def linear_case(kind, N, K, M, target, *, group_size=None, has_bias=False, unit_scales=False, seed=0,
                extreme=False, requant=False, wfmt="int8"):
    """Inputs for w4a8 / w8a8 / w4a4 linears. ``unit_scales``: y == float(acc) exactly (integer check).
    ``extreme``: codes at the ends of their ranges (saturation / overflow check)."""
    rng = np.random.default_rng(seed)
    gs = K if group_size in (None, -1) else group_size
    G = K // gs
    a_hi = 15 if kind == "w4a4" else 255
    if kind == "w8a8":
        q = rng.integers(-127, 128, (N, K))
        wz = np.zeros((N, G), np.int8) if layout._isa(target) in ("sdot", "neon") else rng.integers(-5, 6, (N, G))
        if extreme:
            q = np.where(rng.random((N, K)) < 0.5, -127, 127)
    else:
        q = rng.integers(-8, 8, (N, K))
        wz = rng.integers(-4, 4, (N, G))
        if extreme:
            q = np.where(rng.random((N, K)) < 0.5, -8, 7)
            wz = np.where(rng.random((N, G)) < 0.5, -8, 7)
    wz = np.asarray(wz).astype(np.int8)
    xq = rng.integers(0, a_hi + 1, (M, K)).astype(np.uint8)
    zp = int(rng.integers(0, a_hi + 1))
    if extreme:
        xq = np.where(rng.random((M, K)) < 0.5, 0, a_hi).astype(np.uint8)
        zp = 0 if seed % 2 else a_hi
    if unit_scales:
        wscale = np.ones((N, G), np.float32)
        act_scale = np.float32(1.0)
    else:
        wscale = (rng.random((N, G)) * 0.02 + 0.001).astype(np.float32)
        act_scale = np.float32(rng.random() * 0.1 + 0.01)
    bias = (rng.standard_normal(N)).astype(np.float32) if has_bias else None
    if kind == "w4a8":
        packed = layout.pack_w4a8_weights(reference.pack_int4(q), wz, target, wfmt=wfmt)
    elif kind == "w8a8":
        packed = layout.pack_w8a8_weights(q.astype(np.int8), wz, target)
    else:
        packed = layout.pack_w4a4_weights(reference.pack_int4(q), wz, target)
    args = [xq, packed["wpack"], packed["wsum"], wscale, _scalar(act_scale, np.float32), _scalar(zp, np.int32)]
    if has_bias:
        args.append(bias)
    expected = reference.linear(xq, act_scale, zp, q, wz, wscale, bias, gs)
    if requant:
        out_scale = np.float32(np.abs(expected).max() / 100 + 1e-3)
        out_zero = int(rng.integers(0, 256))
        out_shift = rng.integers(0, 3, N).astype(np.uint8)
        args += [_scalar(out_scale, np.float32), _scalar(out_zero, np.int32), out_shift]
        expected = reference.requantize(expected, out_scale, out_zero, out_shift, 8)
        args.append(np.zeros((M, N), np.uint8))
    else:
        args.append(np.zeros((M, N), np.float32))
    return args, len(args) - 1, expected


def quantize_case(K, M, bits, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, K)) * 20).astype(np.float32)
    x[0, : min(K, 4)] = [1e6, -1e6, 0.0, 3.5][: min(K, 4)]  # saturation at both ends
    scale = np.float32(0.05 if bits == 8 else 1.7)
    zero = np.int32(2 ** (bits - 1))
    shift = rng.integers(0, 5, K).astype(np.uint8)
    args = [x, _scalar(scale, np.float32), _scalar(zero, np.int32), shift, np.zeros((M, K), np.uint8)]
    return args, 4, reference.quantize_act(x, scale, zero, shift, bits)


def qk_case(Hq, Hkv, D, M, N, seed=0, unit_scales=False, causal=False):
    rng = np.random.default_rng(seed)
    q8 = rng.integers(-127, 128, (Hq, M, D)).astype(np.int8)
    k8 = rng.integers(-127, 128, (Hkv, N, D)).astype(np.int8)
    qs, ks = (np.float32(1), np.float32(1)) if unit_scales else (np.float32(0.031), np.float32(0.047))
    args = [q8, k8, _scalar(qs, np.float32), _scalar(ks, np.float32), np.zeros((Hq, M, N), np.float32)]
    return args, 4, reference.qk_int8(q8, k8, qs, ks, causal)


def softmax_probs(Hq, M, N, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((Hq, M, N)).astype(np.float32) * 3
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    if N > 1:
        p[0, 0, -1] = 0.0  # a masked key
    return p


def log2_case(Hq, M, N, bits, seed=0):
    p = softmax_probs(Hq, M, N, seed)
    codes, pmax = reference.log2_softmax_quant(p, bits)
    args = [p, np.zeros((Hq, M, N), np.uint8), np.zeros((Hq, M), np.float32)]
    return args, (1, 2), (codes, pmax)


def attn_v_case(Hq, Hkv, D, M, N, bits, seed=0, extreme=False):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, (Hq, M, N)).astype(np.uint8)
    v8 = rng.integers(-127, 128, (Hkv, N, D)).astype(np.int8)
    if extreme:  # every key at full weight with |v| = 127: int32 would overflow beyond 1024 keys
        codes[:] = 0
        v8[:] = 127
    pmax = (rng.random((Hq, M)) * 0.9 + 0.1).astype(np.float32)
    vs = np.float32(0.013)
    args = [codes, v8, pmax, _scalar(vs, np.float32), np.zeros((Hq, M, D), np.float32)]
    return args, 4, reference.attn_v_log2(codes, v8, pmax, vs, bits)
