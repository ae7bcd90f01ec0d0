"""Linear kernels (W4A8, W8A8, W4A4, FP32) and activation quantization on the host CPU vs numpy references.

Integer parts are compared bit for bit (unit scales make y == float(acc) exactly); float epilogues to ~1 ulp.
Each kernel is compiled once per module (symbolic M) and run on several M, including 1 and odd M.
"""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from agile_tvm.errors import UserError  # noqa: E402
from agile_tvm.kernels import cases, reference  # noqa: E402

TARGET = "host"
_built = {}


def run(func, args, out_idx):
    """Compile (cached by symbol) and run func on numpy args; returns the output array(s)."""
    from agile_tvm.kernels import build

    name = str(func.attrs["global_symbol"])
    if name not in _built:
        _built[name] = build(func, TARGET)
    dev = tvm.cpu()
    targs = [tvm.runtime.tensor(np.array(a, order="C"), dev) for a in args]
    _built[name][name](*targs)
    if isinstance(out_idx, tuple):
        return tuple(targs[i].numpy() for i in out_idx)
    return targs[out_idx].numpy()


def close(got, want):
    scale = float(np.abs(want).max()) or 1.0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-7 * scale)


@pytest.fixture(scope="module")
def funcs():
    from agile_tvm.kernels import w4a4_linear_func, w4a8_linear_func, w8a8_linear_func

    return {
        "w4a8": w4a8_linear_func(40, 80, TARGET),  # K % 16 == 0: the 4-tile int16-partial-sum path on x86
        "w4a8_bias": w4a8_linear_func(40, 72, TARGET, has_bias=True),
        "w4a8_group": w4a8_linear_func(48, 64, TARGET, group_size=16, has_bias=True),
        "w4a8_requant": w4a8_linear_func(40, 72, TARGET, has_bias=True, requant=True),
        "w4a8_gemv": w4a8_linear_func(40, 72, TARGET, m=1),
        "w8a8": w8a8_linear_func(40, 72, TARGET, has_bias=True),
        "w4a4": w4a4_linear_func(40, 72, TARGET, has_bias=True),
        "w4a4_long": w4a4_linear_func(24, 520, TARGET),
    }


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("kind", ["w4a8", "w8a8", "w4a4"])
def test_integer_part_exact(funcs, kind, M):
    key = kind
    has_bias = key != "w4a8"  # the w8a8/w4a4 modules have a bias: it is zeroed so y == float(acc) exactly
    K = 80 if key == "w4a8" else 72
    args, out, want = cases.linear_case(kind, 40, K, M, TARGET, has_bias=has_bias, unit_scales=True, seed=M)
    if has_bias:
        args[6][:] = 0
        want = cases.linear_case(kind, 40, K, M, TARGET, unit_scales=True, seed=M)[2]
    got = run(funcs[key], args, out)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("M", [1, 5, 33])
@pytest.mark.parametrize("key,kind,kw", [
    ("w4a8_bias", "w4a8", {"has_bias": True}),
    ("w4a8_group", "w4a8", {"has_bias": True, "group_size": 16}),
    ("w8a8", "w8a8", {"has_bias": True}),
    ("w4a4", "w4a4", {"has_bias": True}),
])
def test_scaled_outputs(funcs, key, kind, kw, M):
    N, K = (48, 64) if key == "w4a8_group" else (40, 72)
    args, out, want = cases.linear_case(kind, N, K, M, TARGET, seed=100 + M, **kw)
    close(run(funcs[key], args, out), want)


@pytest.mark.parametrize("seed", [0, 1])
def test_extreme_codes_no_saturation_or_overflow(funcs, seed):
    # pmaddubsw pair sums and the packed multiplier's 16-bit halves at their worst case
    for key, kind, N, K in [("w4a8", "w4a8", 40, 80), ("w4a8_bias", "w4a8", 40, 72), ("w8a8", "w8a8", 40, 72),
                            ("w4a4_long", "w4a4", 24, 520)]:
        has_bias = key in ("w8a8", "w4a8_bias")
        args, out, want = cases.linear_case(kind, N, K, 7, TARGET, unit_scales=True, extreme=True, seed=seed,
                                            has_bias=has_bias)
        if has_bias:
            args[6][:] = 0
            want = cases.linear_case(kind, N, K, 7, TARGET, unit_scales=True, extreme=True, seed=seed)[2]
        np.testing.assert_array_equal(run(funcs[key], args, out), want)


@pytest.mark.parametrize("M", [1, 4, 9])
def test_nibble_weights(M):
    # 4-bit weights read straight from memory, unpacked in registers (x86), with groups and extreme codes
    from agile_tvm.kernels import w4a8_linear_func

    if cases.layout._isa(TARGET) not in ("avx2", "avx512"):
        pytest.skip("nibble format is x86 only")
    f = w4a8_linear_func(40, 96, TARGET, group_size=32, m=1 if M == 1 else None, wfmt="nibble")
    for extreme in (False, True):
        args, out, want = cases.linear_case("w4a8", 40, 96, M, TARGET, group_size=32, unit_scales=True,
                                            extreme=extreme, seed=M, wfmt="nibble")
        np.testing.assert_array_equal(run(f, args, out), want)
    fb = w4a8_linear_func(40, 64, TARGET, has_bias=True, wfmt="nibble")
    args, out, want = cases.linear_case("w4a8", 40, 64, M, TARGET, has_bias=True, seed=M, wfmt="nibble")
    close(run(fb, args, out), want)


@pytest.mark.parametrize("kind", ["w4a8", "w8a8", "w4a4"])
def test_ragged_last_n_tile(kind):
    # N = 44: padded to 48, split into panels of several tiles, so the last panel's epilogue is guarded
    from agile_tvm import kernels as k

    make = {"w4a8": k.w4a8_linear_func, "w8a8": k.w8a8_linear_func, "w4a4": k.w4a4_linear_func}[kind]
    for m, Ms in ((None, (1, 5)), (1, (1,))):
        f = make(44, 64, TARGET, has_bias=True, m=m)
        for M in Ms:
            args, out, want = cases.linear_case(kind, 44, 64, M, TARGET, has_bias=True, seed=M)
            close(run(f, args, out), want)


def test_w4a4_chunks_at_the_256_bound():
    from agile_tvm.kernels.w4a4 import w4a4_chunk

    assert w4a4_chunk(512) == 256 and w4a4_chunk(520) == 130 and w4a4_chunk(72) == 72
    # 256 products of 15 * 15 fill a 16-bit half to 57600 < 65536: checked in test_extreme_codes (K = 520)


def test_gemv_schedule_matches(funcs):
    args, out, want = cases.linear_case("w4a8", 40, 72, 1, TARGET, seed=9)
    close(run(funcs["w4a8_gemv"], args, out), want)


@pytest.mark.parametrize("M", [1, 6])
def test_fused_requantize(funcs, M):
    args, out, want = cases.linear_case("w4a8", 40, 72, M, TARGET, has_bias=True, requant=True, seed=M)
    got = run(funcs["w4a8_requant"], args, out)
    # the requantized codes come from float y: allow a code to differ only where y sits on a rounding boundary
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert (got != want).mean() < 0.01


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_act_exact(bits):
    from agile_tvm.kernels import quantize_act_func

    f = quantize_act_func(72, bits, TARGET)
    for M in (1, 9):
        args, out, want = cases.quantize_case(72, M, bits, seed=M)
        np.testing.assert_array_equal(run(f, args, out), want)


def test_fp32_linear():
    from agile_tvm.kernels.fp32 import fp32_linear_func, pack_fp32_weights

    rng = np.random.default_rng(3)
    f = fp32_linear_func(40, 72, TARGET, has_bias=True)
    for M in (1, 7):
        x = rng.standard_normal((M, 72)).astype(np.float32)
        w = rng.standard_normal((40, 72)).astype(np.float32)
        b = rng.standard_normal(40).astype(np.float32)
        got = run(f, [x, pack_fp32_weights(w, TARGET), b, np.zeros((M, 40), np.float32)], 3)
        np.testing.assert_allclose(got, x @ w.T + b, rtol=1e-5, atol=1e-4)


def test_packing_roundtrip_and_layout():
    from agile_tvm.kernels import pack_w4a8_weights

    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (20, 16))
    qw = reference.pack_int4(q)
    np.testing.assert_array_equal(reference.unpack_int4(qw), q)
    wz = rng.integers(-3, 3, (20, 1)).astype(np.int8)
    p = pack_w4a8_weights(qw, wz, "x86-avx2")
    assert p["wpack"].shape == (3, 4, 8, 4)  # N padded 20 -> 24
    np.testing.assert_array_equal(p["wpack"][1, 2, 3], q[11, 8:12] - wz[11, 0])
    assert (p["wpack"][2, :, 4:] == 0).all() and (p["wsum"][20:] == 0).all()
    assert pack_w4a8_weights(qw, wz, "sd870")["wpack"].shape == (5, 4, 4, 4)


def test_bad_inputs_raise_user_errors():
    from agile_tvm.kernels import pack_w4a4_weights, pack_w8a8_weights, w4a8_linear_func

    with pytest.raises(UserError, match="multiple of 4"):
        w4a8_linear_func(16, 70, TARGET)
    with pytest.raises(UserError, match="group size"):
        w4a8_linear_func(16, 64, TARGET, group_size=24)
    qw = reference.pack_int4(np.zeros((8, 16), int))
    with pytest.raises(UserError, match="per-channel"):
        pack_w4a4_weights(qw, np.zeros((8, 2), np.int8), TARGET)
    with pytest.raises(UserError, match="symmetric"):
        pack_w8a8_weights(np.full((8, 16), 127, np.int8), np.full((8, 1), -100, np.int8), "pi4")
    with pytest.raises(UserError, match="unknown target"):
        w4a8_linear_func(16, 64, "riscv")


def test_avx512_builds():
    # this machine may lack AVX-512: check the code generated for x86-avx512, run it only if the CPU has it
    from agile_tvm import kernels as k
    from agile_tvm.targets import get_target

    t = "x86-avx512"
    specs = [
        ("vpmaddubsw", k.w4a8_linear_func(64, 128, t, has_bias=True),
         cases.linear_case("w4a8", 64, 128, 5, t, has_bias=True)),
        ("vpmaddubsw", k.w4a8_linear_func(64, 72, t), cases.linear_case("w4a8", 64, 72, 3, t)),
        ("vpmaddubsw", k.w4a8_linear_func(64, 128, t, m=1, wfmt="nibble"),
         cases.linear_case("w4a8", 64, 128, 1, t, wfmt="nibble")),
        ("vpmaddwd", k.w8a8_linear_func(64, 128, t), cases.linear_case("w8a8", 64, 128, 5, t)),
        ("vpmullw", k.w4a4_linear_func(64, 128, t), cases.linear_case("w4a4", 64, 128, 5, t)),
    ]
    with open("/proc/cpuinfo") as fh:
        has_avx512 = "avx512bw" in fh.read()
    for instr, f, (args, out, want) in specs:
        ex = tvm.compile(f, target=get_target(t))
        asm = "".join(m.inspect_source("asm") for m in [ex.mod, *ex.mod.imports] if m.kind == "llvm")
        assert instr in asm and "zmm" in asm, f.attrs["global_symbol"]
        if has_avx512:
            dev = tvm.cpu()
            targs = [tvm.runtime.tensor(np.array(a, order="C"), dev) for a in args]
            ex.mod[str(f.attrs["global_symbol"])](*targs)
            close(targs[out].numpy(), want)
