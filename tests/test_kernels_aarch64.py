"""Cross-compiled kernels for the Pi 4 (Cortex-A72, no dotprod) and the Snapdragon 870 (+dotprod).

Always: every kernel cross-links for both, the sd870 W4A8 build uses sdot and no pi4 build does.
With the emulated board (scripts/setup-boards): every kernel runs under qemu and matches numpy, and the sd870
build dies with SIGILL on the emulated Cortex-A72, which proves the pi4 check above means something.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from agile_tvm.kernels import cases, qemu  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                reason="needs g++-aarch64-linux-gnu (scripts/setup-boards installs it)")


def _fp32_case(target):
    from agile_tvm.kernels.fp32 import pack_fp32_weights

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 72)).astype(np.float32)
    w = rng.standard_normal((40, 72)).astype(np.float32)
    return [x, pack_fp32_weights(w, target), np.zeros((3, 40), np.float32)], 2, x @ w.T


def _specs(target):
    from agile_tvm import kernels as k
    from agile_tvm.kernels.fp32 import fp32_linear_func

    specs = [
        ("w4a8", k.w4a8_linear_func(40, 72, target, has_bias=True),
         cases.linear_case("w4a8", 40, 72, 5, target, has_bias=True, seed=1)),
        ("w4a8_int", k.w4a8_linear_func(40, 72, target),
         cases.linear_case("w4a8", 40, 72, 3, target, unit_scales=True, extreme=True, seed=2)),
        ("w4a8_gemv", k.w4a8_linear_func(40, 72, target, m=1), cases.linear_case("w4a8", 40, 72, 1, target, seed=3)),
        ("w8a8", k.w8a8_linear_func(40, 72, target), cases.linear_case("w8a8", 40, 72, 4, target, unit_scales=True)),
        ("w4a4", k.w4a4_linear_func(40, 72, target), cases.linear_case("w4a4", 40, 72, 3, target, unit_scales=True)),
        ("quant", k.quantize_act_func(72, 8, target), cases.quantize_case(72, 3, 8)),
        ("qk", k.qk_int8_func(6, 2, 64, target), cases.qk_case(6, 2, 64, 3, 9, unit_scales=True)),
        ("qk_causal", k.qk_int8_func(6, 2, 64, target, causal=True),
         cases.qk_case(6, 2, 64, 7, 70, unit_scales=True, causal=True)),
        ("fp32", fp32_linear_func(40, 72, target), _fp32_case(target)),
        ("log2", k.log2_softmax_quant_func(6, 4, target), cases.log2_case(6, 3, 9, 4)),
        ("attnv", k.attn_v_log2_func(6, 2, 64, 4, target), cases.attn_v_case(6, 2, 64, 3, 9, 4)),
        # checkpoint v2 and the grouped (register-tile) schedule
        ("quant_token", k.quantize_act_token_func(96, 8, target, group_size=32),
         cases.quantize_token_case(96, 5, 8, group_size=32, seed=2)),
        ("w4a8_g32_int", k.w4a8_linear_func(44, 96, target, group_size=32),
         cases.linear_case("w4a8", 44, 96, 3, target, group_size=32, unit_scales=True, extreme=True, seed=4)),
        ("v2_w4a8_g32_int", k.w4a8_linear_func(44, 96, target, group_size=32, act="token", has_wmin=True),
         cases.linear_v2_case("w4a8", 44, 96, 5, target, group_size=32, has_wmin=True, unit_scales=True,
                              extreme=True, seed=5)),
        ("v2_w4a8_g32", k.w4a8_linear_func(40, 128, target, group_size=32, act="token", has_wmin=True,
                                           has_bias=True),
         cases.linear_v2_case("w4a8", 40, 128, 6, target, group_size=32, has_wmin=True, has_bias=True, seed=6,
                              bound=True)),
        ("v2_w4a8_gemv", k.w4a8_linear_func(40, 128, target, group_size=32, act="token", has_wmin=True, m=1),
         cases.linear_v2_case("w4a8", 40, 128, 1, target, group_size=32, has_wmin=True, seed=7, bound=True)),
        ("v2_w8a8_int", k.w8a8_linear_func(40, 72, target, act="token", has_wmin=True),
         cases.linear_v2_case("w8a8", 40, 72, 4, target, has_wmin=True, unit_scales=True, seed=8)),
    ]
    return specs


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    from agile_tvm.kernels import export

    out = {}
    d = tmp_path_factory.mktemp("aarch64")
    for target in ("pi4", "sd870"):
        for name, func, case in _specs(target):
            path = export(func, target, str(d / f"{target}_{name}.so"))
            out[(target, name)] = (path, str(func.attrs["global_symbol"]), case)
    return out


def _disasm(path):
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.skip("aarch64-linux-gnu-objdump missing")
    return subprocess.run([objdump, "-d", path], capture_output=True, text=True, check=True).stdout


def test_isa_of_builds(libs):
    assert "sdot" in _disasm(libs[("sd870", "w4a8")][0])
    assert "sdot" in _disasm(libs[("sd870", "v2_w4a8_g32")][0])  # the grouped register-tile schedule too
    assert "smull" in _disasm(libs[("pi4", "w4a8")][0]) and "saddlp" in _disasm(libs[("pi4", "w8a8")][0])
    for (target, name), (path, _, _) in libs.items():
        if target == "pi4":
            assert "sdot" not in _disasm(path), name


@pytest.mark.board
@pytest.mark.skipif(not qemu.available(), reason="emulated aarch64 board missing: run scripts/setup-boards")
@pytest.mark.parametrize("target", ["pi4", "sd870"])
def test_kernels_match_numpy_under_qemu(libs, target):
    names = [n for (t, n) in libs if t == target]
    jobs = []
    for n in names:
        path, sym, (args, out, *_) = libs[(target, n)]
        jobs.append((path, sym, args, list(out) if isinstance(out, tuple) else [out]))
    results = qemu.run(target, jobs)
    for n, res in zip(names, results):
        _, _, (args, out, want, *bound) = libs[(target, n)]
        outs = list(out) if isinstance(out, tuple) else [out]
        wants = list(want) if isinstance(out, tuple) else [want]
        for i, w in zip(outs, wants):
            got = res[i]
            if bound:  # v2 float epilogue: the float32 rounding bound of reference.linear_error_bound
                err = np.abs(got.astype(np.float64) - w)
                assert (err <= bound[0]).all(), f"{target} {n}: max error {err.max()}"
            elif n.endswith("_int") or n in ("w8a8", "w4a4", "quant", "quant_token", "qk", "qk_causal", "log2"):
                np.testing.assert_array_equal(got, w, err_msg=f"{target} {n}")
            elif n == "fp32":
                np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4, err_msg=f"{target} {n}")
            else:
                np.testing.assert_allclose(got, w, rtol=1e-6, atol=2e-7 * float(np.abs(w).max()),
                                           err_msg=f"{target} {n}")


@pytest.mark.board
@pytest.mark.skipif(not qemu.available(), reason="emulated aarch64 board missing: run scripts/setup-boards")
def test_sdot_build_traps_on_cortex_a72(libs):
    path, sym, (args, out, _) = libs[("sd870", "w4a8")]
    with pytest.raises(RuntimeError, match="exited with -4"):  # SIGILL
        qemu.run("pi4", [(path, sym, args, [out])])
    assert os.path.exists(path)
