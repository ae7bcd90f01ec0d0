"""The kernels as the frontend uses them: quantize + W4A8 linear through relax.call_tir with a symbolic M."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


def test_call_tir_symbolic_m_matches_reference():
    from tvm import relax

    from agile_tvm.kernels import cases, quantize_act_func, reference, w4a8_linear_func
    from agile_tvm.targets import get_target

    N, K = 40, 64
    args, _, _ = cases.linear_case("w4a8", N, K, 1, "host", has_bias=True)
    _, wpack, wsum, wscale, act_scale, act_zero, bias = args[:7]
    shift = np.random.default_rng(1).integers(0, 3, K).astype(np.uint8)

    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, K), "float32"))
    params = [relax.Var(n, relax.TensorType(a.shape, str(a.dtype))) for n, a in
              [("wpack", wpack), ("wsum", wsum), ("wscale", wscale), ("act_scale", act_scale),
               ("act_zero", act_zero), ("act_shift", shift), ("bias", bias)]]
    with bb.function("main", [x, *params]):
        with bb.dataflow():
            gq = bb.add_func(quantize_act_func(K, 8, "host"), "quantize")
            gl = bb.add_func(w4a8_linear_func(N, K, "host", has_bias=True), "linear")
            xq = bb.emit(relax.call_tir(gq, [x, params[3], params[4], params[5]], relax.TensorType((m, K), "uint8")))
            y = bb.emit(relax.call_tir(gl, [xq, *params[:5], params[6]], relax.TensorType((m, N), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=get_target("host")), tvm.cpu())

    rng = np.random.default_rng(0)
    for M in (1, 7):
        xf = (rng.standard_normal((M, K)) * 2).astype(np.float32)
        got = vm["main"](*[tvm.runtime.tensor(np.array(a, order="C")) for a in
                           (xf, wpack, wsum, wscale, act_scale, act_zero, shift, bias)]).numpy()
        xq = reference.quantize_act(xf, act_scale, act_zero, shift, 8)
        want = _reference_from_pack(xq, wpack, wsum, wscale, act_scale, act_zero, bias, N, K)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-7 * float(np.abs(want).max()))


def _reference_from_pack(xq, wpack, wsum, wscale, act_scale, act_zero, bias, N, K):
    """Unpack the x86/ARM tile layout back to w' = q - wzero [N, K] and apply the contract's linear."""
    from agile_tvm.kernels import reference

    nb, kb, nbl, kk = wpack.shape
    w = wpack.astype(np.int64).transpose(0, 2, 1, 3).reshape(nb * nbl, kb * kk)[:N]
    return reference.linear(xq, act_scale, act_zero, w, np.zeros((N, 1), np.int64), wscale, bias)


def test_attention_chain_through_relax():
    # hand-written (block-free) kernels must survive the Relax pipeline too: QK -> softmax (Relax) -> log2 -> AttnV
    from tvm import relax

    from agile_tvm.kernels import attn_v_log2_func, cases, log2_softmax_quant_func, qk_int8_func, reference
    from agile_tvm.targets import get_target

    Hq, Hkv, D = 6, 2, 64
    bb = relax.BlockBuilder()
    m, n = tvm.tirx.Var("m", "int64"), tvm.tirx.Var("n", "int64")
    q8 = relax.Var("q8", relax.TensorType((Hq, m, D), "int8"))
    k8 = relax.Var("k8", relax.TensorType((Hkv, n, D), "int8"))
    v8 = relax.Var("v8", relax.TensorType((Hkv, n, D), "int8"))
    sc = [relax.Var(s, relax.TensorType((), "float32")) for s in ("q_scale", "k_scale", "v_scale")]
    with bb.function("main", [q8, k8, v8, *sc]):
        with bb.dataflow():
            gqk = bb.add_func(qk_int8_func(Hq, Hkv, D, "host"), "qk")
            glog = bb.add_func(log2_softmax_quant_func(Hq, 4, "host"), "log2q")
            gav = bb.add_func(attn_v_log2_func(Hq, Hkv, D, 4, "host"), "attn_v")
            s = bb.emit(relax.call_tir(gqk, [q8, k8, sc[0], sc[1]], relax.TensorType((Hq, m, n), "float32")))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            cp = bb.emit(relax.call_tir(glog, [p], [relax.TensorType((Hq, m, n), "uint8"),
                                                    relax.TensorType((Hq, m), "float32")]))
            out = bb.emit(relax.call_tir(gav, [relax.TupleGetItem(cp, 0), v8, relax.TupleGetItem(cp, 1), sc[2]],
                                         relax.TensorType((Hq, m, D), "float32")))
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=get_target("host")), tvm.cpu())
    for M, N in ((1, 33), (7, 70)):
        (q, k, qs, ks, _), _, scores = cases.qk_case(Hq, Hkv, D, M, N, seed=N)
        v = np.random.default_rng(M).integers(-127, 128, (Hkv, N, D)).astype(np.int8)
        vs = np.array(np.float32(0.02))
        got = vm["main"](*[tvm.runtime.tensor(a) for a in (q, k, v, qs, ks, vs)]).numpy()
        got_scores = scores  # QK itself is checked bit-exactly in test_kernels_attention
        e = np.exp(got_scores - got_scores.max(-1, keepdims=True))
        probs = (e / e.sum(-1, keepdims=True)).astype(np.float32)
        codes, pmax = reference.log2_softmax_quant(probs, 4)
        want = reference.attn_v_log2(codes, v, pmax, vs, 4)
        # Relax's softmax may differ from numpy by an ulp, which can move a code near a boundary: compare loosely
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * float(np.abs(want).max()))
