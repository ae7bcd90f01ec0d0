"""The real SmolLM2-135M through the compiled path equals the PyTorch reference of the same quantized checkpoint.
The unquantized (fp) SmolLM2 runs unmarked (~40 s: it checks the real config: GQA 9/3, rope_parameters with
theta 1e5, tied head); the agileq8 one is slow (quantizes 30 layers, ~1-2 min, then 4 x 512 tokens): `pytest -m slow`.

Criterion: teacher forcing at every quantization point, then tight agreement. A quantized 30-layer model is chaotic
at rounding boundaries, and with checkpoint v2 (per-token activation scales) far more so than v1: measured on this
checkpoint, free-running compiled vs reference perplexity over the 4 x 512 handbook tokens is 19.562 vs 19.887
(-1.6%), although every kernel given the reference's inputs reproduces it (below). The gap starts at single rounding
ties: at token 1 of the first window, layer 28's o_proj input has a value at x / s = -42.5 exactly (attention
outputs lie on a lattice v_scale * pmax * integer / 2^14, so ties are common), the reference's float order gives
-42.4999962 and the kernel's -42.5000000, one code of 255 differs, and that position's logits move by 0.8 through
SmolLM2's outlier channels (the v1 note here measured 0.19% with static scales). Equally valid float orders of the
reference itself spread as wide: AttnV in the contract's integer form 20.001 (+0.6%), exact-integer linears
19.851 (-0.2%), float64 softmax 19.903 (+0.1%). So a free-running perplexity bound of 0.5% would test chance, not
the code. Instead the reference runs with each quantized linear's input and each attention's Q, K, V (after RoPE)
replaced by the compiled graph's values, each checked first against the reference's own to 1e-5 of its largest
entry (a wrong graph fails there); the logits then must agree elementwise to float32 noise and the perplexities to
1e-4, the exported module's logits must equal the tapped build's bit for bit, and generation must work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

@pytest.fixture(scope="module")
def smollm2_q8(tmp_path_factory):
    from agile_tvm.corpus import calibration_samples
    from agile_tvm.models import load_model
    from agile_tvm.quant.apply import quantize_model
    from agile_tvm.quant.checkpoint import save_quantized
    from agile_tvm.quant.configs import get_config
    from agile_tvm.runtime.export import export

    base = tmp_path_factory.mktemp("smollm2")
    lm = load_model("smollm2-135m")
    cfg = get_config("agileq8")
    cfg.weight.method = "rtn"  # GPTQ would add minutes; the frontend check does not depend on how codes were chosen
    qm = quantize_model(lm, cfg, calibration_samples(lm.tokenizer, 2, 128, seed=0))
    save_quantized(qm, base / "ckpt")
    export(base / "ckpt", "host", base / "module", max_seq_len=512, log=lambda *a: None)
    return base, lm.tokenizer


@pytest.mark.slow
def test_smollm2_agileq8_teacher_forced_equals_reference(smollm2_q8):
    from test_frontend_tiny import _reference_logits, tapped_forward

    from agile_tvm import corpus
    from agile_tvm.eval import perplexity
    from agile_tvm.runtime import load_module

    base, tok = smollm2_q8
    windows = corpus.eval_windows(corpus.token_stream(tok, "handbook"), 512, max_windows=4)
    lm = load_module(base / "module")
    run = tapped_forward(base / "ckpt", 512)
    got, want = [], []
    for ids in windows.numpy()[:, None]:
        logits, taps = run(ids)
        np.testing.assert_array_equal(lm.forward_logits(ids), logits)
        got.append(logits)
        want.append(_reference_logits(base / "ckpt", ids, forced=taps))
        # |logits| ~ 35 after SmolLM2's ~23,000 first-token residual: float32 order differences give ~1e-4 here
        np.testing.assert_allclose(got[-1], want[-1], atol=1e-3, rtol=1e-4)

    def replay(tables):  # perplexity() calls its forward function once per window, in order
        it = iter(tables)
        return lambda ids: torch.from_numpy(next(it))

    compiled = perplexity(replay(got), windows, progress=False)["ppl"]
    reference = perplexity(replay(want), windows, progress=False)["ppl"]
    assert abs(compiled / reference - 1) < 1e-4, (compiled, reference)
    text_ids, _ = lm.generate(windows[:1, :24], max_new_tokens=4)
    assert len(text_ids) == 4 and lm.tokenizer.decode(text_ids).strip()


def test_smollm2_fp_logits_equal_hugging_face(tmp_path):
    """No quantization, so no rounding boundaries: elementwise float32 agreement with the HF model."""
    from agile_tvm.models import load_model
    from agile_tvm.quant.apply import quantize_model
    from agile_tvm.quant.checkpoint import save_quantized
    from agile_tvm.quant.configs import get_config
    from agile_tvm.runtime import load_module
    from agile_tvm.runtime.export import export

    lm = load_model("smollm2-135m")
    save_quantized(quantize_model(lm, get_config("fp")), tmp_path / "ckpt")
    export(tmp_path / "ckpt", "host", tmp_path / "module", max_seq_len=32, log=lambda *a: None)
    ids = torch.tensor([lm.tokenizer.encode("Jane Austen wrote Pride and Prejudice in 1813.")])
    with torch.no_grad():
        ref = lm.model(ids).logits.numpy()
    got = load_module(tmp_path / "module").forward_logits(ids)
    # |logits| ~ 35 after a ~23,000 first-token residual: float32 order differences give ~1e-4 here
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-4)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
