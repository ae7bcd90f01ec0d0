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


def _weights(kind, N, K, G, target, rng, extreme, wfmt=None):
    """Random weight codes q [N, K] and zero points wz i8[N, G] of a ``kind`` linear (ranges per the contract;
    8-bit weights in int8 tiles need wz = 0, so that |q - wz| <= 127)."""
    if kind == "w8a8":
        q = rng.integers(-127, 128, (N, K))
        int8_tiles = layout._isa(target) in ("sdot", "neon") or wfmt == "int8"
        wz = np.zeros((N, G), np.int8) if int8_tiles else rng.integers(-5, 6, (N, G))
        if extreme:
            q = np.where(rng.random((N, K)) < 0.5, -127, 127)
    else:
        q = rng.integers(-8, 8, (N, K))
        wz = rng.integers(-4, 4, (N, G))
        if extreme:
            q = np.where(rng.random((N, K)) < 0.5, -8, 7)
            wz = np.where(rng.random((N, G)) < 0.5, -8, 7)
    return q, np.asarray(wz).astype(np.int8)


def _pack(kind, q, wz, target, wfmt):
    if kind == "w4a8":
        return layout.pack_w4a8_weights(reference.pack_int4(q), wz, target, wfmt=wfmt)
    if kind == "w8a8":
        return layout.pack_w8a8_weights(q.astype(np.int8), wz, target, wfmt=wfmt)
    return layout.pack_w4a4_weights(reference.pack_int4(q), wz, target)


def linear_case(kind, N, K, M, target, *, group_size=None, has_bias=False, unit_scales=False, seed=0,
                extreme=False, requant=False, wfmt=None):
    """Inputs for w4a8 / w8a8 / w4a4 linears. ``unit_scales``: y == float(acc) exactly (integer check).
    ``extreme``: codes at the ends of their ranges (saturation / overflow check)."""
    rng = np.random.default_rng(seed)
    gs = K if group_size in (None, -1) else group_size
    G = K // gs
    a_hi = 15 if kind == "w4a4" else 255
    q, wz = _weights(kind, N, K, G, target, rng, extreme, wfmt)
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
    packed = _pack(kind, q, wz, target, wfmt)
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


def token_activations(M, K, rng, bits=8, group_size=None, shift=None):
    """Realistic per-token quantized activations: rows of different ranges (one all zero, one all positive, one
    all negative when M allows), a few outlier channels; -> (xq, s, zp, xsum) from the numpy twin."""
    x = (rng.standard_normal((M, K)) * rng.uniform(0.1, 4.0, (M, 1))).astype(np.float32)
    x[:, rng.integers(0, K, max(1, K // 64))] *= 20  # outlier channels
    if M >= 4:
        x[1] = 0.0
        x[2] = np.abs(x[2])
        x[3] = -np.abs(x[3])
    shift = np.zeros(K, np.uint8) if shift is None else shift
    return reference.quantize_act_token(x, shift, bits, group_size)


def linear_v2_case(kind, N, K, M, target, *, group_size=None, has_wmin=False, has_bias=False, unit_scales=False,
                   seed=0, extreme=False, wfmt=None, bound=False, tables="ng"):
    """Inputs for the checkpoint-v2 linears (``act="token"``, optionally ``has_wmin``), in the PrimFunc's order
    (xq, wpack, wsum, wscale, [wmin], act_scale f32[M], act_zero i32[M], [xsum], [bias], y).

    ``unit_scales``: s = wscale = 1 and integer wmin, so y is an exact integer (integer check of acc and xsum).
    ``extreme``: codes and per-row zero points at the ends of their ranges. ``bound=True`` also returns the
    float32 rounding bound of ``reference.linear_error_bound`` (the tolerance of the float epilogue).
    ``tables="tiled"``: wsum, wscale and wmin in the kernels' tile-major layout (``layout.tile_tables``);
    ``"tiled16"``: the same in 16 bits (the kernels' ``compact=True``)."""
    rng = np.random.default_rng(seed)
    gs = K if group_size in (None, -1) else group_size
    G = K // gs
    q, wz = _weights(kind, N, K, G, target, rng, extreme, wfmt)
    if has_wmin:  # contract v2: float weight offsets come with a zero integer weight zero point
        wz = np.zeros_like(wz)
    xq, s, zp, xsum = token_activations(M, K, rng, 4 if kind == "w4a4" else 8, gs)
    if extreme:
        xq = np.where(rng.random((M, K)) < 0.5, 0, 255).astype(np.uint8)
        zp = np.where(rng.random(M) < 0.5, 0, 255).astype(np.int32)
        xsum = (xq.astype(np.int64) - zp[:, None]).reshape(M, G, gs).sum(axis=2).astype(np.int32)
    if unit_scales:
        wscale = np.ones((N, G), np.float32)
        wmin = rng.integers(-3, 4, (N, G)).astype(np.float32)
        s = np.ones(M, np.float32)
    else:
        wscale = (rng.random((N, G)) * 0.02 + 0.001).astype(np.float32)
        wmin = (-8.5 * wscale * rng.uniform(0.5, 1.5, (N, G))).astype(np.float32)  # Q4_1-like block minima
    bias = (rng.standard_normal(N)).astype(np.float32) if has_bias else None
    packed = _pack(kind, q, wz, target, wfmt)
    wbits = 8 if kind == "w8a8" else 4
    narrow = {np.dtype(np.float32): np.float16, np.dtype(np.int32): np.int16}

    def lay(t):
        if tables == "ng":
            return t
        if tables == "tiled16":
            narrowed = t.astype(narrow[t.dtype])
            assert np.array_equal(narrowed.astype(t.dtype), t), "a table of this case does not fit 16 bits"
            t = narrowed
        return layout.tile_tables(t, target, wbits, wfmt)

    if tables == "tiled16":  # scales and offsets exactly representable in float16, as Q4_1-born weights are
        wscale = wscale.astype(np.float16).astype(np.float32)
        if has_wmin:
            wmin = wmin.astype(np.float16).astype(np.float32)
    args = [xq, packed["wpack"], lay(packed["wsum"]), lay(wscale)] + ([lay(wmin)] if has_wmin else [])
    args += [s.astype(np.float32), zp.astype(np.int32)] + ([xsum] if has_wmin else []) + ([bias] if has_bias else [])
    args.append(np.zeros((M, N), np.float32))
    wm, xs = (wmin, xsum) if has_wmin else (None, None)
    expected = reference.linear_v2(xq, s, zp, q, wz, wscale, wm, xs, bias, gs)
    if not bound:
        return args, len(args) - 1, expected
    acc = reference.linear_acc(xq, zp, q, wz, gs)
    return args, len(args) - 1, expected, reference.linear_error_bound(acc, wscale, s, wm, xs, bias)


def quantize_case(K, M, bits, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, K)) * 20).astype(np.float32)
    x[0, : min(K, 4)] = [1e6, -1e6, 0.0, 3.5][: min(K, 4)]  # saturation at both ends
    scale = np.float32(0.05 if bits == 8 else 1.7)
    zero = np.int32(2 ** (bits - 1))
    shift = rng.integers(0, 5, K).astype(np.uint8)
    args = [x, _scalar(scale, np.float32), _scalar(zero, np.int32), shift, np.zeros((M, K), np.uint8)]
    return args, 4, reference.quantize_act(x, scale, zero, shift, bits)


def quantize_token_case(K, M, bits, *, group_size=None, seed=0):
    """Inputs of ``quantize_act_token_func`` with rows that test its corners: saturating outliers, an all-zero
    row, rows of one sign, TRIP shifts; outputs (xq, act_scale, act_zero, xsum) at indices 2..5."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, K)) * rng.uniform(0.05, 30.0, (M, 1))).astype(np.float32)
    x[0, : min(K, 3)] = [1e4, -3.0, 0.0][: min(K, 3)]
    if M >= 4:
        x[1] = 0.0
        x[2] = np.abs(x[2]) + 0.01
        x[3] = -np.abs(x[3])
    shift = rng.integers(0, 5, K).astype(np.uint8)
    gs = K if group_size in (None, -1) else group_size
    G = K // gs
    args = [x, shift, np.zeros((M, K), np.uint8), np.zeros(M, np.float32), np.zeros(M, np.int32),
            np.zeros((M, G), np.int32)]
    return args, (2, 3, 4, 5), reference.quantize_act_token(x, shift, bits, gs)


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


def int_scale_case(N, K, M, target, *, group_size=32, seed=0):
    """Inputs of the integer-scale GEMM (`int_scales.int_scale_linear_func`, no bias) and its numpy twin's output,
    plus the raw codes, for benchmarks that also run the float-epilogue GEMM on the same weights:
    (args, out_index, expected, codes) with codes = dict(q, c, d, e, xq, zp, s, xsum, wpack)."""
    from . import int_scales

    rng = np.random.default_rng(seed)
    G = K // group_size
    q = rng.integers(-8, 8, (N, K))
    c = rng.integers(1, 256, (N, G)).astype(np.uint8)
    d = rng.integers(-2047, 2048, (N, G)).astype(np.int16)
    e = np.full(N, -18, np.int32)
    xq = rng.integers(0, 256, (M, K)).astype(np.uint8)
    zp = rng.integers(0, 256, M).astype(np.int32)
    s = rng.random(M).astype(np.float32)
    xsum = (xq.astype(np.int64) - zp[:, None]).reshape(M, G, group_size).sum(-1).astype(np.int32)
    tabs = int_scales.pack_tables(q, c, d, e, target)
    wpack = layout._pack_nibbles(q, np.zeros((N, G), np.int8), layout._isa(target))["wpack"]
    args = [xq, wpack, tabs["c8"], tabs["d16"], tabs["zc"], tabs["srow"], s, zp, xsum, np.zeros((M, N), np.float32)]
    codes = dict(q=q, c=c, d=d, e=e, xq=xq, zp=zp, s=s, xsum=xsum, wpack=wpack)
    return args, len(args) - 1, int_scales.reference(xq, zp, s, xsum, q, c, d, e), codes
