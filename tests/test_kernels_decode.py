"""The kernel options that make decode and prefill of the compiled models fast, vs the numpy twins (x86 host).

- W8A8 in int8 tiles (``wfmt="int8"`` on AVX2): signed activations xq - 128 with ``vpsignb`` + ``vpmaddubsw``; the
  extreme codes (xq in {0, 255}, w' = +-127) are where a pmaddubsw pair could saturate, so they are checked exactly.
- Nibble weights in the GEMM: panels unpacked once to int8 tiles (``decoded``); with float offsets the dot runs over
  q = u - 8 and wzero moves into the offset term, exact for integer scales (unit-scale check) with any wzero.
- Tile-major tables (``tables="tiled"``), 16-bit tables (``compact``), slices of concatenated weights
  (``n_offset``/``n_total``), several outputs (``outs``) and the quantizer inside the GEMV (``x_float``).
Integer parts are compared bit for bit (unit scales); float epilogues within ``reference.linear_error_bound``.
"""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from agile_tvm.errors import UserError  # noqa: E402
from agile_tvm.kernels import cases, layout, reference  # noqa: E402

from test_kernels_linear import TARGET, run  # noqa: E402
from test_kernels_v2 import within_bound  # noqa: E402

X86 = layout._isa(TARGET) == "avx2"
needs_avx2 = pytest.mark.skipif(not X86, reason="int8-tile W8A8 and nibble weights are AVX2 kernels")


def _make(kind, N, K, **kw):
    from agile_tvm.kernels import w4a8_linear_func, w8a8_linear_func

    return (w4a8_linear_func if kind == "w4a8" else w8a8_linear_func)(N, K, TARGET, **kw)


@needs_avx2
@pytest.mark.parametrize("m", [1, None])
@pytest.mark.parametrize("group_size", [None, 32])
def test_w8a8_int8_tiles_exact(m, group_size):
    f = _make("w8a8", 44, 96, group_size=group_size, act="token", m=m, wfmt="int8")
    for M in (1,) if m == 1 else (1, 5, 33):
        for extreme in (False, True):
            args, out, want = cases.linear_v2_case("w8a8", 44, 96, M, TARGET, group_size=group_size, unit_scales=True,
                                                   extreme=extreme, seed=M, wfmt="int8")
            assert args[1].dtype == np.int8
            np.testing.assert_array_equal(run(f, args, out), want, err_msg=f"M={M} extreme={extreme}")
    v1 = _make("w8a8", 44, 96, group_size=group_size, m=m, wfmt="int8")  # v1 static scales, same tiles
    args, out, want = cases.linear_case("w8a8", 44, 96, 1 if m == 1 else 7, TARGET, group_size=group_size,
                                        unit_scales=True, extreme=True, seed=3, wfmt="int8")
    np.testing.assert_array_equal(run(v1, args, out), want)


@needs_avx2
def test_w8a8_int8_tiles_refuse_minus_128():
    # vpsignb cannot negate -128: such weights need the int16 tiles
    with pytest.raises(UserError, match="int16"):
        layout.pack_w8a8_weights(np.full((8, 16), -127, np.int8), np.full((8, 1), 1, np.int8), TARGET, wfmt="int8")
    assert layout.pack_w8a8_weights(np.full((8, 16), -127, np.int8), np.zeros((8, 1), np.int8), TARGET,
                                    wfmt="int8")["wpack"].dtype == np.int8
    with pytest.raises(UserError, match="weight format"):
        _make("w8a8", 16, 64, wfmt="nibble")


@needs_avx2
@pytest.mark.parametrize("has_wmin,act", [(True, "token"), (False, "token"), (False, "tensor")])
def test_nibble_gemm_unpacks_panels(has_wmin, act):
    # K = 1024: the panel's groups are split into chunks, each unpacked before its rows
    for N, K in ((44, 96), (96, 1024)):
        f = _make("w4a8", N, K, group_size=32, act=act, has_wmin=has_wmin, wfmt="nibble")
        for M in (1, 6, 33):
            for extreme in (False, True):
                if act == "token":
                    args, out, want = cases.linear_v2_case("w4a8", N, K, M, TARGET, group_size=32, has_wmin=has_wmin,
                                                           unit_scales=True, extreme=extreme, seed=M, wfmt="nibble")
                else:
                    args, out, want = cases.linear_case("w4a8", N, K, M, TARGET, group_size=32, unit_scales=True,
                                                        extreme=extreme, seed=M, wfmt="nibble")
                np.testing.assert_array_equal(run(f, args, out), want, err_msg=f"N={N} M={M} extreme={extreme}")


@needs_avx2
@pytest.mark.parametrize("m", [1, None])
def test_nibble_float_offsets_with_integer_zero_points(m):
    # the contract's v2 weights have wzero = 0; the kernels stay exact for any wzero (the GEMM folds it into the
    # offset term: wmin - wzero * wscale, exact with unit scales)
    rng = np.random.default_rng(11)
    N, K, gs = 40, 128, 32
    f = _make("w4a8", N, K, group_size=gs, act="token", has_wmin=True, wfmt="nibble", m=m)
    for M in (1,) if m == 1 else (1, 9):
        q = rng.integers(-8, 8, (N, K))
        wz = rng.integers(-8, 8, (N, K // gs)).astype(np.int8)
        wmin = rng.integers(-3, 4, (N, K // gs)).astype(np.float32)
        xq, s, zp, xsum = cases.token_activations(M, K, rng, 8, gs)
        s = np.ones(M, np.float32)
        packed = layout.pack_w4a8_weights(reference.pack_int4(q), wz, TARGET, wfmt="nibble")
        ones = np.ones((N, K // gs), np.float32)
        args = [xq, packed["wpack"], packed["wsum"], ones, wmin, s, zp, xsum, np.zeros((M, N), np.float32)]
        want = reference.linear_v2(xq, s, zp, q, wz, ones, wmin, xsum, None, gs)
        np.testing.assert_array_equal(run(f, args, 8), want)


@needs_avx2
@pytest.mark.parametrize("tables", ["tiled", "tiled16"])
@pytest.mark.parametrize("kind,wfmt", [("w4a8", None), ("w4a8", "nibble"), ("w8a8", "int8"), ("w8a8", None)])
def test_tiled_and_compact_tables(tables, kind, wfmt):
    for m in (1, None):
        for has_wmin in (True, False):
            f = _make(kind, 44, 96, group_size=32, act="token", has_wmin=has_wmin, wfmt=wfmt, m=m, tables="tiled",
                      compact=tables == "tiled16")
            for M in (1,) if m == 1 else (1, 6):
                args, out, want = cases.linear_v2_case(kind, 44, 96, M, TARGET, group_size=32, has_wmin=has_wmin,
                                                       unit_scales=True, extreme=True, seed=M, wfmt=wfmt,
                                                       tables=tables)
                np.testing.assert_array_equal(run(f, args, out), want)
                args, out, want, bound = cases.linear_v2_case(kind, 44, 96, M, TARGET, group_size=32, seed=M + 7,
                                                              has_wmin=has_wmin, wfmt=wfmt, tables=tables, bound=True)
                within_bound(run(f, args, out), want, bound)


def _fused_weights(Ns, K, gs, wfmt, rng):
    """Three linears packed one by one (tables tiled, padded to whole tiles) and concatenated along N."""
    parts = []
    for N in Ns:
        q = rng.integers(-8, 8, (N, K))
        wz = np.zeros((N, K // gs), np.int8)
        wscale = (rng.random((N, K // gs)) * 0.02 + 0.001).astype(np.float32)
        wmin = (-8.5 * wscale * rng.uniform(0.5, 1.5, wscale.shape)).astype(np.float32)
        packed = layout.pack_w4a8_weights(reference.pack_int4(q), wz, TARGET, wfmt=wfmt)
        tile = (lambda t: layout.tile_tables(t, TARGET, 4, wfmt))  # noqa: E731
        parts.append(dict(q=q, wz=wz, wscale=wscale, wmin=wmin, bias=rng.standard_normal(N).astype(np.float32),
                          wpack=packed["wpack"], wsum=tile(packed["wsum"]), ws=tile(wscale), wm=tile(wmin),
                          npad=-(-N // 8) * 8))
    cat = {key: np.concatenate([p[key] for p in parts]) for key in ("wpack", "wsum", "ws", "wm")}
    cat["bias"] = np.concatenate([np.pad(p["bias"], (0, p["npad"] - len(p["bias"]))) for p in parts])
    offsets = [int(o) for o in np.cumsum([0] + [p["npad"] for p in parts])[:-1]]
    return parts, cat, offsets, int(sum(p["npad"] for p in parts))


def _check_part(y, p, xq, s, zp, xsum, gs, has_bias):
    bias = p["bias"] if has_bias else None
    want = reference.linear_v2(xq, s, zp, p["q"], p["wz"], p["wscale"], p["wmin"], xsum, bias, gs)
    acc = reference.linear_acc(xq, zp, p["q"], p["wz"], gs)
    within_bound(y, want, reference.linear_error_bound(acc, p["wscale"], s, p["wmin"], xsum, bias))


@needs_avx2
@pytest.mark.parametrize("wfmt", [None, "nibble"])
@pytest.mark.parametrize("has_bias", [False, True])
def test_slices_and_fused_outputs_of_concatenated_weights(wfmt, has_bias):
    # q/k/v-like: N = 48, 16, 20 (the last ragged: padded inside the concatenation)
    rng = np.random.default_rng(3)
    Ns, K, gs = [48, 16, 20], 96, 32
    parts, cat, offsets, n_total = _fused_weights(Ns, K, gs, wfmt, rng)
    weights = [cat["wpack"], cat["wsum"], cat["ws"], cat["wm"]]
    for p, off, N in zip(parts, offsets, Ns):  # prefill: one kernel per linear on its slice
        f = _make("w4a8", N, K, group_size=gs, act="token", has_wmin=True, wfmt=wfmt, tables="tiled",
                  n_offset=off, n_total=n_total, has_bias=has_bias)
        for M in (1, 7):
            xq, s, zp, xsum = cases.token_activations(M, K, rng, 8, gs)
            args = [xq, *weights, s, zp, xsum] + ([cat["bias"]] if has_bias else []) + [np.zeros((M, N), np.float32)]
            _check_part(run(f, args, len(args) - 1), p, xq, s, zp, xsum, gs, has_bias)
    # decode: one GEMV over all three that quantizes x itself and writes three outputs
    f = _make("w4a8", n_total, K, group_size=gs, act="token", has_wmin=True, wfmt=wfmt, tables="tiled", m=1,
              outs=tuple(zip(offsets, Ns)), x_float=True, has_bias=has_bias)
    for seed in range(3):
        qargs, _, (xq, s, zp, xsum) = cases.quantize_token_case(K, 1, 8, group_size=gs, seed=seed)
        args = [qargs[0], qargs[1], *weights] + ([cat["bias"]] if has_bias else [])
        args += [np.zeros((1, N), np.float32) for N in Ns]
        ys = run(f, args, tuple(range(len(args) - len(Ns), len(args))))
        for p, y in zip(parts, ys):
            _check_part(y, p, xq, s, zp, xsum, gs, has_bias)


@needs_avx2
@pytest.mark.parametrize("kind,wfmt", [("w4a8", "nibble"), ("w8a8", "int8")])
def test_quantizer_inside_the_gemv_is_the_token_quantizer(kind, wfmt):
    # unit weight scales and integer offsets: y = s * (an exact integer), so one flipped code or zero point shows
    rng = np.random.default_rng(5)
    N, K, gs = 40, 96, 32
    has_wmin = kind == "w4a8"
    f = _make(kind, N, K, group_size=gs, act="token", has_wmin=has_wmin, wfmt=wfmt, m=1, x_float=True)
    for seed in range(6):
        qargs, _, (xq, s, zp, xsum) = cases.quantize_token_case(K, 1, 8, group_size=gs, seed=seed)
        q = rng.integers(-8, 8, (N, K)) if kind == "w4a8" else rng.integers(-127, 128, (N, K))
        wz = np.zeros((N, K // gs), np.int8)
        ones = np.ones((N, K // gs), np.float32)
        wmin = rng.integers(-3, 4, (N, K // gs)).astype(np.float32)
        packed = (layout.pack_w4a8_weights(reference.pack_int4(q), wz, TARGET, wfmt=wfmt) if kind == "w4a8"
                  else layout.pack_w8a8_weights(q.astype(np.int8), wz, TARGET, wfmt=wfmt))
        args = [qargs[0], qargs[1], packed["wpack"], packed["wsum"], ones] + ([wmin] if has_wmin else [])
        args.append(np.zeros((1, N), np.float32))
        got = run(f, args, len(args) - 1)
        want = reference.linear_v2(xq, np.ones(1, np.float32), zp, q, wz, ones, wmin if has_wmin else None,
                                   xsum if has_wmin else None, None, gs)
        # the integer part is exact, then y = float32(that * s): one rounding on both sides
        np.testing.assert_array_equal(got, (want.astype(np.float32) * s[0]).astype(np.float32))


@needs_avx2
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("Ns", [[40], [48, 16, 20]])
def test_zero_in_dot_gemv_equals_the_row_sum_gemv(compact, Ns):
    # the decode GEMV without row sums (xq - zp inside the dot) against the one with them, bit for bit, on the
    # codes and activations where int16 sums are tightest: all codes 0 or 15, activations spanning 0..255 with
    # zp at either end (a one-signed row), and random ones; with one output and with fused q/k/v-like outputs
    rng = np.random.default_rng(17)
    K, gs = 128, 32
    parts, cat, offsets, n_total = _fused_weights(Ns, K, gs, "nibble", rng)
    outs = tuple(zip(offsets, Ns)) if len(Ns) > 1 else None
    kw = dict(group_size=gs, act="token", has_wmin=True, wfmt="nibble", tables="tiled", m=1, x_float=True,
              compact=compact, **({"outs": outs} if outs else {}))
    with_sums = _make("w4a8", n_total if outs else Ns[0], K, **kw)
    without = _make("w4a8", n_total if outs else Ns[0], K, zero_in_dot=True, **kw)
    narrow = (lambda a: a.astype(np.int16 if a.dtype.kind == "i" else np.float16)) if compact else (lambda a: a)
    for codes in ("random", "zeros", "fifteens"):
        wpack = cat["wpack"] if codes == "random" else np.full_like(cat["wpack"], 0 if codes == "zeros" else 255)
        wsum = cat["wsum"].copy()
        if codes != "random":  # the row sums of constant codes (kernels with sums must see consistent ones)
            wsum[:, 0] = 0 if codes == "zeros" else 15 * gs
        for x_kind in ("random", "positive", "negative", "spread"):
            x = rng.standard_normal((1, K)).astype(np.float32) * 4
            x = {"positive": np.abs(x), "negative": -np.abs(x), "spread": np.linspace(-50, 9, K)[None]}.get(x_kind, x)
            shift = rng.integers(0, 3, K).astype(np.uint8)
            ys = [np.zeros((1, n), np.float32) for n in Ns]
            tables = [narrow(cat["ws"]), narrow(cat["wm"])]
            n_out = len(ys)
            want = run(with_sums, [x.astype(np.float32), shift, wpack, narrow(wsum), *tables, *ys],
                       tuple(range(6, 6 + n_out)) if outs else 6)
            got = run(without, [x.astype(np.float32), shift, wpack, *tables, *ys],
                      tuple(range(5, 5 + n_out)) if outs else 5)
            for g, w in zip(got if outs else [got], want if outs else [want]):
                np.testing.assert_array_equal(g, w, err_msg=f"codes={codes} x={x_kind}")


@needs_avx2
@pytest.mark.parametrize("Ns", [[40], [48, 16, 20]])
def test_grid_gemv_equals_the_float_table_gemv(Ns):
    # weights on a power-of-two row grid (wscale = c 2^e, wmin = d 2^e, `int_scales.grid_codes`): the decode GEMV
    # reading the codes (c8, d16, srow: the integer-scale GEMM's tables) computes the same floats as the one reading
    # float16 tables, so the outputs agree bit for bit; codes at both ends of their ranges, exponents per row
    from agile_tvm.kernels import int_scales

    rng = np.random.default_rng(23)
    K, gs = 128, 32
    G = K // gs
    parts = []
    for N in Ns:
        q = rng.integers(-8, 8, (N, K))
        c = rng.integers(0, 256, (N, G)).astype(np.uint8)
        d = rng.integers(-2047, 2048, (N, G)).astype(np.int16)
        c[0], d[0], d[-1] = 255, -2047, 2047
        e = rng.integers(-20, -12, N).astype(np.int32)
        assert int_scales.grid_codes(np.ldexp(c, e[:, None]), np.ldexp(d, e[:, None])) is not None
        tile = (lambda t: layout.tile_tables(t, TARGET, 4, "nibble"))  # noqa: E731
        packed = layout.pack_w4a8_weights(reference.pack_int4(q), np.zeros((N, G), np.int8), TARGET, wfmt="nibble")
        parts.append(dict(wpack=packed["wpack"], **int_scales.pack_tables(q, c, d, e, TARGET),
                          ws=tile(np.ldexp(c, e[:, None]).astype(np.float16)),
                          wm=tile(np.ldexp(d, e[:, None]).astype(np.float16))))
    cat = {key: np.concatenate([p[key] for p in parts]) for key in ("wpack", "c8", "d16", "srow", "ws", "wm")}
    npads = [-(-N // 8) * 8 for N in Ns]
    outs = tuple(zip(np.cumsum([0] + npads)[:-1].tolist(), Ns)) if len(Ns) > 1 else None
    n = sum(npads) if outs else Ns[0]
    kw = dict(group_size=gs, act="token", has_wmin=True, wfmt="nibble", tables="tiled", m=1, x_float=True,
              zero_in_dot=True, **({"outs": outs} if outs else {}))
    floats = _make("w4a8", n, K, compact=True, **kw)
    grid = _make("w4a8", n, K, grid=True, **kw)
    for seed in range(4):
        x = (rng.standard_normal((1, K)) * 4).astype(np.float32)
        shift = rng.integers(0, 3, K).astype(np.uint8)
        ys = [np.zeros((1, N), np.float32) for N in Ns]
        idx = lambda first: tuple(range(first, first + len(Ns))) if outs else first  # noqa: E731
        want = run(floats, [x, shift, cat["wpack"], cat["ws"], cat["wm"], *ys], idx(5))
        got = run(grid, [x, shift, cat["wpack"], cat["c8"], cat["d16"], cat["srow"], *ys], idx(6))
        for g, w in zip(got if outs else [got], want if outs else [want]):
            assert np.abs(w).max() > 0
            np.testing.assert_array_equal(g, w, err_msg=f"seed={seed}")
    with pytest.raises(UserError, match="grid"):
        _make("w4a8", 16, 64, act="token", has_wmin=True, wfmt="nibble", tables="tiled", m=1, grid=True)


@needs_avx2
def test_zero_in_dot_option_errors():
    with pytest.raises(UserError, match="zero_in_dot"):
        _make("w4a8", 16, 64, act="token", has_wmin=True, wfmt="nibble", zero_in_dot=True)  # not a GEMV
    with pytest.raises(UserError, match="zero_in_dot"):
        _make("w4a8", 16, 64, act="token", m=1, wfmt="nibble", zero_in_dot=True)  # no float offsets


def test_fusion_option_errors():
    with pytest.raises(UserError, match='tables="tiled"'):
        _make("w4a8", 16, 64, act="token", n_offset=8, n_total=32)
    with pytest.raises(UserError, match="multiples"):
        _make("w4a8", 16, 64, act="token", tables="tiled", n_offset=4, n_total=32)
    with pytest.raises(UserError, match="m=1"):
        _make("w4a8", 32, 64, act="token", tables="tiled", outs=((0, 16), (16, 16)))
    with pytest.raises(UserError, match="x_float"):
        _make("w4a8", 16, 64, act="tensor", m=1, x_float=True)
