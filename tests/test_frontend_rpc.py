"""An aarch64 export (cross-linked .so) runs on an emulated board over RPC and gives the logits of the x86 build.

Needs the emulated boards (scripts/setup-boards); skipped otherwise. Both board profiles: the Pi 4 (Cortex-A72, no
dotprod: the strictest ISA, so a stray SDOT fails with SIGILL) and the Snapdragon 870 (emulated as Cortex-A76 with
dotprod: its kernels take the SDOT paths). Tolerance: the two builds run the same
integer math with different SIMD (x86 pmaddubsw vs NEON) and float summation orders; integer parts agree exactly,
so logits agree to float32 rounding (atol 1e-4, rtol 1e-4) and the argmax is identical.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest_boards import need_emulated, rpc_cluster  # noqa: F401
from test_frontend_tiny import MAX_LEN, _quantize

pytestmark = pytest.mark.board


@pytest.mark.parametrize("board_key", ["pi4", "sd870"])
def test_board_export_over_rpc_matches_x86(rpc_cluster, tmp_path, board_key):
    need_emulated(rpc_cluster)
    from tvm import rpc

    from agile_tvm.rpc.netutil import parse_hostport
    from agile_tvm.runtime import load_module
    from agile_tvm.runtime.export import export

    ckpt = _quantize("llama", tmp_path / "ckpt")
    export(ckpt, "host", tmp_path / "x86", max_seq_len=MAX_LEN, log=lambda *a: None)
    export(ckpt, board_key, tmp_path / board_key, max_seq_len=MAX_LEN, log=lambda *a: None)
    ids = np.random.RandomState(3).randint(0, 256, (1, 24))
    local = load_module(tmp_path / "x86")
    want = local.forward_logits(ids)

    host, port = parse_hostport(rpc_cluster.tracker)
    sess = rpc.connect_tracker(host, port).request(board_key, session_timeout=300)
    board = load_module(tmp_path / board_key, remote=sess)
    got = board.forward_logits(ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # generation on the board (KV cache objects live on the board) = generation here
    assert board.generate(ids[:, :8], 4)[0] == local.generate(ids[:, :8], 4)[0]
