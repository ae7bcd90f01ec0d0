"""Token pruning: eq. 9 schedule, first token kept, order kept, pruned tokens keep their last hidden state, batch."""

import math

import pytest
import torch

from agile_tvm.models import tiny_model
from agile_tvm.quant.configs import Pruning, get_config
from agile_tvm.quant.pruning import schedule_counts, select_tokens, token_sparsity
from agile_tvm.quant.qmodel import QuantizedCausalLM




@pytest.mark.parametrize("beta,start,layers", [(0.5, 10, 30), (0.3, 4, 12), (0.1, 1, 2)])
def test_schedule_matches_eq9(beta, start, layers):
    p = Pruning(beta=beta, start_layer=start)
    assert p.layers(layers) == list(range(start, layers))
    m = layers - start
    gamma = 1 - (1 - beta) ** (1 / m)
    assert p.gamma(layers) == pytest.approx(gamma, rel=1e-12)
    counts = schedule_counts(2048, layers, p.layers(layers), p.gamma(layers))
    n = 2048
    for i in range(layers):
        if i >= start:
            n = math.ceil((1 - gamma) * n)
        assert counts[i] == n
    # after the last layer about beta of the tokens are gone (ceil keeps a few more)
    assert 1 - counts[-1] / 2048 == pytest.approx(beta, abs=m / 2048 + 1e-9)
    assert token_sparsity(counts, 2048) == pytest.approx(1 - sum(counts) / (layers * 2048))


def test_no_pruning_when_beta_zero():
    assert Pruning(beta=0.0, start_layer=3).layers(12) == []
    assert Pruning(beta=0.0).gamma(12) == 0.0


def test_select_tokens_keeps_first_and_order():
    kept = torch.tensor([[0, 2, 3, 5, 7, 9], [0, 1, 4, 6, 8, 9]])
    scores = torch.tensor([[0.0, 5, 1, 4, 3, 2], [0.0, 1, 2, 3, 9, 8]])
    out = select_tokens(kept, scores, 3)
    assert out.tolist() == [[0, 2, 5], [0, 8, 9]]


def test_select_tokens_breaks_ties_by_earlier_token():
    """The compiled prefill must pick the same tokens, so ties (common with log2 probabilities) are defined."""
    kept = torch.arange(8)[None]
    scores = torch.tensor([[0.0, 1, 2, 2, 1, 2, 2, 1]])
    assert select_tokens(kept, scores, 4).tolist() == [[0, 2, 3, 5]]
    assert select_tokens(kept, scores, 6).tolist() == [[0, 1, 2, 3, 5, 6]]


def _pruned_model(arch="llama", beta=0.5):
    lm = tiny_model(arch, num_hidden_layers=3)
    cfg = get_config("fp")
    cfg.pruning = Pruning(beta=beta, start_layer=1)
    return lm, QuantizedCausalLM(lm.model, arch, cfg)


def test_pruned_tokens_keep_their_last_hidden_state():
    lm, qm = _pruned_model()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        st = qm.embed(ids)
        st = qm.run_layer(0, st)
        after0 = st.h.clone()
        st = qm.run_layer(1, st)
        after1 = st.h.clone()
        kept1 = qm.kept_mask(st)
        st = qm.run_layer(2, st)
    assert kept1[:, 0].all() and (~kept1).any()
    # tokens pruned before layer 1 hold their layer-0 output; kept ones changed
    assert torch.equal(after1[~kept1], after0[~kept1])
    assert not torch.allclose(after1[kept1], after0[kept1])
    kept2 = qm.kept_mask(st)
    assert torch.equal(st.h[~kept2 & kept1], after1[~kept2 & kept1])
    assert st.counts == [24, math.ceil((1 - qm.gamma) * 24), math.ceil((1 - qm.gamma) * st.counts[1])]


@pytest.mark.parametrize("arch", ["llama", "opt", "bloom"])
def test_batch_equals_one_sequence_at_a_time(arch):
    lm, qm = _pruned_model(arch, beta=0.4)
    ids = torch.randint(0, 256, (3, 20))
    logits, kept = qm(ids)
    assert logits.shape == (3, 20, 256) and kept.shape == (3, 20)
    assert qm.last_token_sparsity > 0
    for b in range(3):
        one, kept_one = qm(ids[b:b + 1])
        torch.testing.assert_close(one[0], logits[b], rtol=1e-4, atol=1e-5)
        assert torch.equal(kept_one[0], kept[b])


def test_unpruned_rows_match_a_model_without_pruning_before_the_first_pruning_layer():
    lm, qm = _pruned_model(beta=0.5)
    full = QuantizedCausalLM(lm.model, "llama", get_config("fp"))
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        a, b = qm.run_layer(0, qm.embed(ids)), full.run_layer(0, full.embed(ids))
    assert torch.equal(a.h, b.h)
