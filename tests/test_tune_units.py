"""Unit checks of the tuning plumbing that need no boards: kernel naming, ISA requirements, error triage."""

from __future__ import annotations

import pytest

from agile_tvm.errors import UserError
from agile_tvm.rpc.profiles import missing_features
from agile_tvm.tune.runner import classify_error
from agile_tvm.tune.workloads import SMOLLM2_135M, model_kernel_names, workload


def test_smollm2_kernel_set_covers_every_linear_shape():
    names = model_kernel_names(SMOLLM2_135M)
    # q/o 576->576, k/v 576->192, gate/up 576->1536, down 1536->576; decode (M=1) and prefill (M=128)
    for n, k in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
        for m in (1, 128):
            assert f"w4a8_n{n}_k{k}_m{m}" in names
    assert len(names) == 8


def test_model_config_without_hidden_size_is_a_user_error():
    with pytest.raises(UserError, match="hidden_size"):
        model_kernel_names({"vocab_size": 10})


def test_unknown_kernel_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown kernel 'gemm42'"):
        workload("gemm42", "x86-avx2")


def test_plain_matmul_workload_flops():
    w = workload("matmul_m4_n8_k16", "x86-avx2")
    assert w.flops == 2 * 4 * 8 * 16
    assert [int(x) for x in w.func.params[0].shape] == [4, 16]


@pytest.mark.parametrize("target, machine, feats, missing", [
    ("sd870", "aarch64", ["fp", "asimd"], ["asimddp"]),
    ("sd870", "aarch64", ["fp", "asimd", "asimddp"], []),
    ("pi4", "aarch64", ["fp", "asimd"], []),
    ("x86-avx512", "x86_64", ["avx2", "fma"], ["avx512f", "avx512bw"]),
    ("x86-avx2", "x86_64", ["avx2", "fma"], []),
])
def test_isa_requirements(target, machine, feats, missing):
    assert missing_features(target, machine, feats) == missing


def test_aarch64_target_on_x86_board_is_a_machine_mismatch():
    assert missing_features("pi4", "x86_64", ["avx2"]) == ["machine aarch64 (board is x86_64)"]


@pytest.mark.parametrize("msg, kind", [
    ("", "ok"),
    ("RPCRunner: An exception occurred\nAGILE_NO_BOARD: no board under key 'x'", "no-board"),
    ("RPCRunner: Timeout, killed after 30 seconds", "timeout"),
    ("RPCRunner: An exception occurred\nSocket SockChannel::Recv Error:Connection reset by peer", "board-lost"),
    ("RPCRunner: An exception occurred\nValueError: something else", "run"),
])
def test_runner_errors_are_triaged(msg, kind):
    assert classify_error(msg) == kind


def test_decode_gemvs_on_x86_are_measured_with_cold_caches():
    """In the model a decode GEMV's weights come from memory; measured cache-resident, the tuner picked schedules
    20-55% slower cold (runner.make_runner). Prefill proxies, plain matmuls and ARM boards are measured warm."""
    from agile_tvm.tune.runner import measure_cold
    from agile_tvm.tune.targets import tuning_target

    x86, arm = tuning_target("x86-avx2"), tuning_target("sd870")
    assert measure_cold(workload("w4a8_n64_k64_m1", "x86-avx2"), x86)
    assert not measure_cold(workload("w4a8_n64_k64_m8", "x86-avx2"), x86)
    assert not measure_cold(workload("matmul_m1_n8_k16", "x86-avx2"), x86)
    assert not measure_cold(workload("w4a8_n64_k64_m1", "sd870"), arm)


def test_native_board_and_export_measure_on_every_core(monkeypatch):
    """Kernels are timed on all cores, as the model runs them (TVM's default here is 1 thread: schedules tuned on
    one thread were 10-20% slower on two); a TVM_NUM_THREADS the user set wins."""
    import os

    from agile_tvm.rpc.supervisor import board_command
    from agile_tvm.tune.export import measure_on_all_cores

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    assert board_command("x86", "native", "127.0.0.1", 0, None)[1]["TVM_NUM_THREADS"] == str(os.cpu_count())
    measure_on_all_cores()
    assert os.environ["TVM_NUM_THREADS"] == str(os.cpu_count())
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert board_command("x86", "native", "127.0.0.1", 0, None)[1]["TVM_NUM_THREADS"] == "1"
    measure_on_all_cores()
    assert os.environ["TVM_NUM_THREADS"] == "1"
