"""RPC boards: ISA reporting, surviving a crashing kernel (SIGILL on the emulated Pi 4), loud warnings."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest_boards import need_emulated, rpc_cluster  # noqa: F401

from agile_tvm.errors import UserError
from agile_tvm.rpc import tracker as trk
from agile_tvm.rpc.netutil import parse_hostport, warn_if_exposed


def test_warns_loudly_when_bound_beyond_localhost(capsys):
    warn_if_exposed("127.0.0.1", "board")
    assert capsys.readouterr().err == ""
    warn_if_exposed("0.0.0.0", "board RPC server")
    err = capsys.readouterr().err
    assert "WARNING" in err and "0.0.0.0" in err and "ANY code" in err


@pytest.mark.parametrize("bad", ["", "localhost", "127.0.0.1:", "host:notaport", ":9190", "h:70000"])
def test_bad_tracker_address_is_a_user_error(bad):
    with pytest.raises(UserError, match="HOST:PORT"):
        parse_hostport(bad)


def test_boards_report_their_isa(rpc_cluster):
    host, port = parse_hostport(rpc_cluster.tracker)
    info = trk.board_info(host, port, "x86")
    assert info["machine"] == "x86_64" and info["profile"] == "native" and "avx2" in info["features"]
    if rpc_cluster.emulated:
        pi4 = trk.board_info(host, port, "pi4")
        sd870 = trk.board_info(host, port, "sd870")
        assert pi4["machine"] == sd870["machine"] == "aarch64"
        assert "asimd" in pi4["features"] and "asimddp" not in pi4["features"]
        assert "asimddp" in sd870["features"]


def _run_remote(cluster, key, func, target_name, arrays, timeout=90):
    """Cross-build `func`, run it on a board under `key`, return the outputs (or raise what the session raised)."""
    import tvm
    from tvm import rpc

    from agile_tvm.tune.builder import export_aarch64_so
    from agile_tvm.tune.targets import tuning_target

    path = export_aarch64_so(tvm.compile(func, target=tuning_target(target_name)).mod)
    host, port = parse_hostport(cluster.tracker)
    sess = rpc.connect_tracker(host, port).request(key, session_timeout=timeout)
    sess.upload(path, "k.so")
    mod = sess.load_module("k.so")
    dev = sess.cpu()
    tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
    mod["main"](*tensors)
    return [t.numpy() for t in tensors]


def test_pi4_board_survives_a_dotprod_kernel(rpc_cluster):
    """An sdot kernel on the Cortex-A72 board raises SIGILL: the client gets an error (no hang), the board logs
    the crash, stays registered, and runs the next (NEON) kernel correctly."""
    need_emulated(rpc_cluster)
    from agile_tvm.tune.export import random_args
    from agile_tvm.tune.workloads import hand_scheduled_func, plain_matmul

    sdot = hand_scheduled_func(4, 16, 16, 4, "sd870")
    started = time.time()
    with pytest.raises(Exception):  # noqa: B017 - the RPC layer raises its own error types
        _run_remote(rpc_cluster, "pi4", sdot, "sd870", random_args(sdot))
    assert time.time() - started < 120
    deadline = time.time() + 60
    while "crashed: SIGILL" not in rpc_cluster.log("board-pi4") and time.time() < deadline:
        time.sleep(0.5)
    assert "crashed: SIGILL" in rpc_cluster.log("board-pi4")
    rpc_cluster.wait_boards(["pi4"], timeout=60)

    mm = plain_matmul(8, 8, 16)
    a, b, c = random_args(mm)
    out = _run_remote(rpc_cluster, "pi4", mm, "pi4", [a, b, c])
    np.testing.assert_array_equal(out[2], a.astype(np.int32) @ b.astype(np.int32).T)
