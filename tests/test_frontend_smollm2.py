"""The real SmolLM2-135M through the compiled path equals the PyTorch reference of the same quantized checkpoint.
The unquantized (fp) SmolLM2 runs unmarked (~40 s: it checks the real config: GQA 9/3, rope_parameters with
theta 1e5, tied head); the agileq8 one is slow (quantizes 30 layers, ~2-4 min): `pytest -m slow`.

Criterion and why it is statistical, not elementwise: a quantized 30-layer model is chaotic at rounding
boundaries. Measured here: the compiled and reference attention outputs differ by ~1e-6 relative (float32
summation order, exp), and in layer 3 one o_proj input lands at -11.499998 vs -11.500013 in code units, so one
activation code differs; that flip spreads (16 differing codes in layer 4, 199 in layer 5) and moves final logits
by up to ~5 while the model's predictions stay the same in quality. Both sides are correct implementations of the
contract; neither is "the" float32 answer. So the test checks what the issue asks: perplexity over 16 windows
(1,024 tokens) of the handbook agrees within 0.5% (a single short sentence is too few tokens: measured 7% apart
on one 25-token sentence with this deliberately cheap checkpoint, 0.19% over 2,044 tokens), and the first
positions (before any flip can accumulate) agree elementwise to float32 noise.
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
def test_smollm2_agileq8_perplexity_equals_reference(smollm2_q8):
    from agile_tvm import corpus
    from agile_tvm.eval import perplexity
    from agile_tvm.quant.checkpoint import load_quantized
    from agile_tvm.quant.pruning import forward_fn_for
    from agile_tvm.runtime import load_module

    base, tok = smollm2_q8
    # 4 x 512 tokens: a single activation sitting on a rounding boundary flips one code in float32 and the 30-layer
    # model amplifies it (traced: 1 code in layer 3, 199 by layer 5), so agreement is a perplexity over enough tokens
    # (measured 0.19% on 2,044 tokens; 0.69% on 16 x 64 tokens, too few to average), as the issue states it.
    windows = corpus.eval_windows(corpus.token_stream(tok, "handbook"), 512, max_windows=4)
    lm = load_module(base / "module")
    got = perplexity(lambda ids: torch.from_numpy(lm.forward_logits(ids.numpy())), windows, progress=False)
    ref = perplexity(forward_fn_for(load_quantized(base / "ckpt").model), windows, progress=False)
    assert abs(got["ppl"] / ref["ppl"] - 1) < 0.005, (got["ppl"], ref["ppl"])
    ids = windows[:1, :24]
    want = load_quantized(base / "ckpt").model(ids)[0].numpy()
    have = lm.forward_logits(ids)
    np.testing.assert_allclose(have[0, :2], want[0, :2], atol=2e-3, rtol=1e-3)  # before any code can flip
    text_ids, _ = lm.generate(ids, max_new_tokens=4)
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
