"""Structural pruning must be exact: same logits as masking the same neurons, as the
unpruned model when the removed neurons were already dead, and after save → load."""

import pytest
import torch

import tiny
from engine.models import size
from engine.models import adapters
from engine.models import export
from engine.prune import mlp as prune
from engine.prune.calibrate import Calibrator, calibrate

FAMILIES = tiny.FAMILIES


def _ids(n=2, L=24, vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, L), generator=g)


def _random_plan(model, frac=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = adapters.for_model(model).widths()
    keep = [torch.sort(torch.randperm(w, generator=g)[: int(w * (1 - frac)) + i]).values for i, w in enumerate(widths)]
    return prune.Plan(keep, widths)  # non-uniform on purpose (+i per layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_structural_equals_mask(family):
    ids = _ids()
    a, b = tiny.model(family), tiny.model(family)
    plan = _random_plan(a)
    prune.apply_structural(a, plan)
    prune.apply_masks(b, prune.mlp_masks(b, plan))
    assert adapters.for_model(a).widths() == plan.widths_after
    assert size.count_params(a) < size.count_params(b)
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert (la - lb).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_dead_neurons_keeps_logits(family):
    """Zero a neuron's up/fc1 row (and bias) first: removing it must change nothing.

    (silu(g)·0 = 0 for gated MLPs; relu(0) = gelu(0) = 0 for the others.)"""
    m = tiny.model(family)
    ad = adapters.for_model(m)
    dead = [torch.tensor([0, 3, 7, 11]) for _ in ad.mlps()]
    with torch.no_grad():
        for mlp, d in zip(ad.mlps(), dead):
            up = mlp.ins[-1]  # up_proj for gated MLPs, fc1/c_fc otherwise
            up.module.weight.index_fill_(up.out_axis, d, 0.0)
            if up.bias is not None:
                up.bias.index_fill_(0, d, 0.0)
        before = m(_ids()).logits
    widths = ad.widths()
    keep = [torch.tensor([j for j in range(w) if j not in set(d.tolist())]) for w, d in zip(widths, dead)]
    prune.apply_structural(m, prune.Plan(keep, widths))
    with torch.no_grad():
        after = m(_ids()).logits
    assert ad.widths() == [w - 4 for w in widths]
    assert (before - after).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_identical_logits(family, tmp_path):
    m = tiny.model(family)
    prune.apply_structural(m, _random_plan(m))
    widths = adapters.for_model(m).widths()
    assert len(set(widths)) > 1
    export.save_model(m, tiny.tokenizer(), tmp_path / "out")
    m2 = export.load_model(tmp_path / "out")
    assert adapters.for_model(m2).widths() == widths
    with torch.no_grad():
        assert torch.equal(m(_ids()).logits, m2(_ids()).logits)


def test_uniform_widths_load_with_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny.model("llama")
    w = adapters.for_model(m).widths()
    plan = prune.Plan([torch.arange(0, wi, 2) for wi in w], w)
    prune.apply_structural(m, plan)
    export.save_model(m, tiny.tokenizer(), tmp_path / "u")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    with torch.no_grad():
        assert torch.equal(m(_ids()).logits, m2(_ids()).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_do_not_change_logits(family):
    m = tiny.model(family)
    ids = _ids()
    with torch.no_grad():
        plain = m(ids).logits
        with Calibrator(m) as cal:
            hooked = m(ids).logits
            cal.n_tokens += ids.numel()
    assert torch.equal(plain, hooked)
    # and the hooks really recorded something, per neuron
    assert all(v.abs().sum() > 0 for k, v in cal.acc.items() if k.endswith(".abs"))


def test_calibration_score_is_mean_abs_activation():
    """The paper's score: mean |input of down_proj| over all calibration tokens."""
    m = tiny.model("llama")
    ids = _ids(n=3, L=16)
    mlp = adapters.for_model(m).mlps()[1]
    seen = []
    h = mlp.out.module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()) and None)
    stats = calibrate(m, ids, batch_size=2)
    h.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    assert stats.n_tokens == ids.numel()
    assert torch.allclose(stats.mlp_mean_abs(1), x.abs().mean(0).double(), atol=1e-6)
