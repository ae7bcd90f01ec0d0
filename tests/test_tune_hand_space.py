"""The hand space (`agile_tvm.tune.space.hand_space`): every point is a valid schedule of the kernel that computes
exactly what the hand schedule computes, the hand choice is a point, and a point's trace recorded on the static-M
proxy replays on the symbolic-M kernel the prefill runs (`records.replayed_func`)."""

from __future__ import annotations

import numpy as np
import pytest

from agile_tvm.rpc.profiles import host_x86_target

X86 = "x86-avx2"
pytestmark = pytest.mark.skipif(host_x86_target() is None, reason="needs an x86 host with AVX2 (runs x86-avx2 code)")
V2 = dict(a_bits=8, act="token", compact=False, group_size=32, has_bias=False, has_wmin=True, tables="tiled",
          wfmt="nibble")


def _spec(m, N=48, K=128):
    return dict(wbits=4, N=N, K=K, options=dict(V2, m=m))


def _design_spaces(spec):
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from agile_tvm.tune.intrinsics import import_cpu_intrinsics
    from agile_tvm.tune.space import hand_space
    from agile_tvm.tune.targets import tuning_target
    from agile_tvm.tune.workloads import kernel_func, kernel_info

    import_cpu_intrinsics()
    ctx = ms.TuneContext(mod=_normalize_mod(kernel_func(spec, X86)), target=tuning_target(X86),
                         space_generator=hand_space(kernel_info(spec, X86)), task_name="t")
    return ctx.generate_design_space()


def _run(func, args):
    import tvm

    from agile_tvm.tune.export import run_local
    from agile_tvm.tune.targets import tuning_target

    return run_local(tvm.compile(tvm.IRModule({"main": func}), target=tuning_target(X86)), args)


def test_hand_points_start_with_the_hand_choice_and_cover_tiles_and_chunks():
    from agile_tvm.tune.space import hand_points
    from agile_tvm.tune.workloads import kernel_info

    info = kernel_info(_spec(512, N=576, K=1536), X86)  # G = 48 groups, 72 tiles of 8 outputs
    points = hand_points(info)
    assert points[0] == {}
    assert {p["nt"] for p in points[1:]} == {1, 2, 3, 4}
    assert {p.get("chunks") for p in points if p.get("chunked")} == {1, 2, 3, 4, 6, 8, 12, 16, 24, 48}
    assert any(p.get("chunked") is False for p in points)
    gemv = hand_points(kernel_info(_spec(1, N=576, K=1536), X86))
    assert {p["nt"] for p in gemv[1:]} == {1, 2, 3, 4, 6, 8}


def test_every_point_replays_on_the_symbolic_kernel_and_matches_the_hand_schedule():
    import tvm
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from agile_tvm.tune.export import random_args
    from agile_tvm.tune.workloads import kernel_func

    proxy, symbolic = _spec(8), _spec(None)
    spaces = _design_spaces(proxy)
    assert len({str(s.trace) for s in spaces}) == len(spaces) - 1 >= 10  # distinct but for the hand choice's twin
    args = random_args(kernel_func(proxy, X86))
    want = _run(kernel_func(symbolic, X86, schedule=True), args)
    for j, space in enumerate(spaces):
        got = _run(space.mod["main"], args)  # the point itself, on the proxy
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), j
        sch = tvm.s_tir.Schedule(_normalize_mod(kernel_func(symbolic, X86)))
        space.trace.apply_to_schedule(sch, remove_postproc=True)
        got = _run(sch.mod["main"], args)  # its trace on the symbolic-M kernel, at M = 8
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), j
