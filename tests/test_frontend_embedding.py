"""The embedding is stored once and no wider than exact (`GraphBuilder.embed`): read from the INT8 LM head's codes
when their products equal the table, else the table in 16 bits where that is exact, else float32. Each kernel
returns the table's rows bit for bit; the storage choice never rounds a value. The compiled models that use these
paths (tiny LLaMA: head codes; tiny LLaMA on free scales: bfloat16) are checked against their PyTorch reference in
test_frontend_tiny.py."""

from __future__ import annotations

import numpy as np
import pytest


def _run(func, arrays, out_shape):
    import tvm

    from agile_tvm.targets import get_target

    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=get_target("host"))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, "float32"), dev)
    ex.mod["main"](*[tvm.runtime.tensor(a, dev) for a in arrays], out)
    return out.numpy()


def _table(rng, vocab=40, hidden=24):
    t = (rng.randn(vocab, hidden) * 0.05).astype(np.float32)
    t[0, :3] = [0.0, -0.0, 1e-30]  # zeros keep their sign; a float16 subnormal-range value
    return t


def test_narrow_table_picks_the_narrowest_exact_storage():
    from agile_tvm.frontend.tir_ops import narrow_table

    rng = np.random.RandomState(0)
    free = _table(rng)
    stored, storage = narrow_table(free)
    assert storage == "float32" and np.array_equal(stored, free)

    bf16 = (free.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # bfloat16 checkpoints
    stored, storage = narrow_table(bf16)
    assert storage == "bfloat16" and stored.dtype == np.uint16
    assert np.array_equal((stored.astype(np.uint32) << 16).view(np.float32), bf16)

    half = (rng.randn(40, 24) * 0.05).astype(np.float16).astype(np.float32)  # float16 checkpoints
    stored, storage = narrow_table(half)
    assert storage == "float16" and np.array_equal(stored.astype(np.float32), half)

    nan = half.copy()
    nan[3, 3] = np.nan  # not equal to itself: never narrowed on a comparison it cannot pass
    assert narrow_table(nan)[1] == "float32"


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
@pytest.mark.parametrize("parallel", [True, False])
def test_embed_narrow_returns_the_rows_bit_for_bit(storage, parallel):
    from agile_tvm.frontend.tir_ops import embed_narrow, narrow_table

    rng = np.random.RandomState(1)
    t = _table(rng)
    t = ((t.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32) if storage == "bfloat16"
         else t.astype(np.float16).astype(np.float32))
    stored, got_storage = narrow_table(t)
    assert got_storage == storage
    ids = np.array([0, 39, 5, 5, 17], np.int32)
    out = _run(embed_narrow(40, 24, storage, parallel=parallel), [ids, stored], (5, 24))
    assert np.array_equal(out.view(np.uint32), t[ids].view(np.uint32))  # bits: -0.0 stays -0.0


@pytest.mark.parametrize("target_isa,wfmt", [("avx2", "int8"), ("avx2", "int16"), ("avx512", "int16"),
                                             ("sdot", "int8")])  # tiles [nb, kk] 8x4, 8x2, 16x2, 4x4
def test_embed_codes_equals_the_dequantized_head(target_isa, wfmt):
    """Rows of the packed head codes times the tiled scales equal (q - wzero) * scale computed in float32, for the
    tile layouts of x86 and ARM (the layout is data here: the kernel runs on this host whatever its tiles)."""
    from agile_tvm.frontend.tir_ops import embed_codes
    from agile_tvm.kernels.layout import pack_w8a8_weights, tile_tables

    rng = np.random.RandomState(2)
    vocab, hidden, gs = 44, 64, 32  # vocab not a multiple of the tile: the last tile is padded
    q = rng.randint(-127, 128, (vocab, hidden)).astype(np.int8)
    wz = np.zeros((vocab, hidden // gs), np.int8)
    scale = (rng.rand(vocab, hidden // gs) * 0.01 + 1e-3).astype(np.float16).astype(np.float32)
    packed = pack_w8a8_weights(q, wz, target_isa, wfmt=wfmt)
    codes = packed["wpack"]
    for dtype in (np.float32, np.float16):  # full and compact scale tables
        tiles = tile_tables(scale.astype(dtype), target_isa, 8, wfmt)
        blocks, kblocks, nb, kk = codes.shape
        func = embed_codes(blocks, kblocks, nb, kk, str(codes.dtype), hidden // gs, str(tiles.dtype))
        ids = np.array([0, vocab - 1, 7, 7, 30], np.int32)
        out = _run(func, [ids, codes, tiles], (len(ids), hidden))
        expect = q.astype(np.float32) * np.repeat(scale, gs, axis=1)
        assert np.array_equal(out, expect[ids])
