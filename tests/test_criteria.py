"""Importance criteria (formulas checked against activations), allocation rules, sensitivity."""

from __future__ import annotations

import pytest
import torch

import tiny
from engine.models import adapters
from engine.prune import calibrate
from engine.prune import compensate
from engine import config
from engine.prune import criteria
from engine.prune import mlp as prune
from engine.prune import sensitivity
from engine.config import PruneConfig
from engine.errors import MinigptError


def _ids(n=6, t=24, seed=2):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def _activations(model, ids):
    """The neurons' activations (input of `out`) per layer, [tokens, width]."""
    acts, hs = {}, []
    for m in adapters.for_model(model).mlps():
        def hook(mod, args, i=m.layer):
            acts[i] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
        hs.append(m.out.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hs:
        h.remove()
    return acts


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request):
    model = tiny.model(request.param).double()
    ids = _ids()
    stats = calibrate.calibrate(model, ids, 2, linears=False, gram=True)
    return model, stats, _activations(model, ids)


def test_scores_follow_their_formulas(setup):
    model, stats, acts = setup
    for m in adapters.for_model(model).mlps():
        x = acts[m.layer]
        w = m.out.module.weight.detach()
        cols = w.t() if m.out.transposed else w  # [hidden, neurons]
        s = {c: criteria.layer_scores(m, stats, m.layer, c) for c in criteria.CRITERIA}
        torch.testing.assert_close(s["paper"], x.abs().mean(0))
        torch.testing.assert_close(s["rms"], x.pow(2).mean(0).sqrt())
        torch.testing.assert_close(s["wanda"], cols.norm(dim=0) * x.pow(2).mean(0).sqrt())
        torch.testing.assert_close(s["fluctuation"], x.var(0, unbiased=False) * cols.pow(2).sum(0))
        ins = sum(p.module.weight.detach().pow(2).sum(p.in_axis) for p in m.ins)
        torch.testing.assert_close(s["magnitude"], (ins + cols.pow(2).sum(0)).sqrt())


def test_obs_score_is_the_error_left_after_refitting_the_others(setup):
    """‖w_j‖² / [G⁻¹]_jj equals min over the other columns of E‖W x − W' x_{-j}‖² (brute force)."""
    model, stats, acts = setup
    m = adapters.for_model(model).mlps()[0]
    x = acts[0]
    w = m.out.module.weight.detach()
    cols = w.t() if m.out.transposed else w
    score = criteria.layer_scores(m, stats, 0, "obs", damping=0.0)
    for j in (0, 17, 63):
        rest = torch.tensor([i for i in range(x.shape[1]) if i != j])
        target = x @ cols.t()
        sol = torch.linalg.lstsq(x[:, rest], target).solution  # [k, hidden]
        err = (target - x[:, rest] @ sol).pow(2).sum(1).mean()
        torch.testing.assert_close(score[j], err, rtol=1e-4, atol=0)


def test_random_is_seeded_and_differs_by_layer():
    model = tiny.model("llama")
    stats = calibrate.calibrate(model, _ids(), 2, linears=False)
    a = criteria.scores(model, stats, "random", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, criteria.scores(model, stats, "random", seed=1)))
    assert not torch.equal(a[0], criteria.scores(model, stats, "random", seed=2)[0])
    assert not torch.equal(a[0], a[1])


def test_config_choices_match_the_implementations():
    assert set(config.CRITERIA) == set(criteria.CRITERIA)
    assert set(config.COMPENSATIONS) == set(compensate.METHODS)
    for key, bad in (("criterion", "nope"), ("compensation", "exact"), ("allocation", "owl")):
        with pytest.raises(MinigptError, match=f"prune.{key}"):
            config.from_dict({"prune": {key: bad}})
    with pytest.raises(MinigptError, match="sequential"):
        config.from_dict({"prune": {"sequential": True, "rule": "threshold"}})


def test_obs_without_gram_says_to_recalibrate():
    model = tiny.model("llama")
    stats = calibrate.calibrate(model, _ids(), 2, linears=False)
    with pytest.raises(MinigptError, match="Gram"):
        prune.select(model, stats, PruneConfig(rule="ratio", criterion="obs"))
    with pytest.raises(MinigptError, match="Gram"):
        prune.select_and_compensate(model, stats, PruneConfig(rule="ratio", compensation="lstsq"))


@pytest.mark.parametrize("allocation", ["per_layer", "global", "sensitivity"])
def test_allocations_respect_min_width_and_rounding(allocation):
    model = tiny.model("llama")
    ids = _ids()
    stats = calibrate.calibrate(model, ids, 2, linears=False)
    cfg = PruneConfig(rule="ratio", ratio=0.6, allocation=allocation, round_to=8, min_keep=16,
                      sensitivity_tokens=48)
    plan = prune.select_and_compensate(model, stats, cfg, ids, 2)
    assert all(w % 8 == 0 and 16 <= w <= 64 for w in plan.widths_after), plan.widths_after
    removed = 1 - sum(plan.widths_after) / sum(plan.widths_before)
    # the ratio rule rounds layers up or down, so the total stays within round_to / 2 per layer of
    # the ask (26 of 64 per layer here): 0.59375 ± 4 · layers / 128
    layers = len(plan.widths_before)
    assert abs(removed - (1 - 26 / 64)) <= 4 * layers / sum(plan.widths_before) + 1e-9, removed
    if allocation == "per_layer":
        assert len(set(plan.widths_after)) == 1  # one ratio on equal widths: one width


def test_ratio_rounding_keeps_the_ratio_and_threshold_rounding_only_adds():
    """round_to = 256 on 1,536-wide layers: per-layer rounding up kept 79% where 70% was asked;
    largest-remainder rounding keeps the total at the ask, every width a multiple."""
    counts = [1075, 1075, 1075, 1075, 1200, 900]  # what 30% asks, layer by layer
    cfg = PruneConfig(rule="ratio", ratio=0.3, round_to=256, min_keep=8, allocation="sensitivity")
    out = prune._rounded(counts, [1536] * 6, cfg)
    assert all(w % 256 == 0 for w in out) and sorted(out) == [1024, 1024, 1024, 1024, 1024, 1280]
    assert abs(sum(out) - sum(counts)) <= 128 and out[4] == 1280  # the layer furthest over its floor
    assert prune._rounded(counts, [1536] * 6, PruneConfig(rule="threshold", round_to=256)) == [1280] * 5 + [1024]
    assert prune._rounded([3, 40], [64, 64], PruneConfig(rule="ratio", round_to=8, min_keep=8,
                                                         allocation="global")) == [8, 40]
    # per_layer: each layer to its nearest multiple, so one ratio on equal widths stays uniform
    # (Gemma 3's 2,048 at 30%: 1,434 -> 1,432 in all 18 layers; largest remainder gave 5 layers 1,440)
    assert prune._rounded([1434] * 18, [2048] * 18, PruneConfig(rule="ratio", round_to=8)) == [1432] * 18
    assert prune._rounded([1434] * 18, [2048] * 18, PruneConfig(rule="ratio", round_to=8, allocation="global")) \
        .count(1440) == 5


def test_sensitivity_allocation_is_the_lagrange_optimum():
    # Δ_l = c_l r²: r_l ∝ 1/c_l. c ∝ [1, 2, 4, 4] and 30% overall give r = [0.6, 0.3, 0.15, 0.15]
    keep = sensitivity.allocate([1.0, 2.0, 4.0, 4.0], [100] * 4, ratio=0.3, probe=0.5, min_keep=1, spread=1.0)
    assert keep == [40, 70, 85, 85]
    # spread 0.5 bounds r to [0.15, 0.45]: layer 0 is capped, the rest share its excess as 1/c
    keep = sensitivity.allocate([1.0, 2.0, 4.0, 4.0], [100] * 4, ratio=0.3, probe=0.5, min_keep=1, spread=0.5)
    assert keep == [55, 63, 81, 81] and sum(keep) == 280
    assert sensitivity.allocate([1.0, 9.0], [100, 100], ratio=0.3, probe=0.5, min_keep=1, spread=0.0) == [70, 70]
    with pytest.raises(MinigptError, match="ratio"):
        sensitivity.allocate([1.0] * 4, [100] * 4, ratio=0.8, probe=0.5, min_keep=50, spread=0.1)
    with pytest.raises(MinigptError, match="sensitivit"):
        model = tiny.model("llama")
        stats = calibrate.calibrate(model, _ids(), 2, linears=False)
        prune.select(model, stats, PruneConfig(rule="ratio", allocation="sensitivity"))


def test_sensitivity_measure_restores_the_model_and_sees_damage():
    model = tiny.model("opt")
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    stats = calibrate.calibrate(model, ids, 2, linears=False)
    sens = sensitivity.measure(model, stats, ids[:2], "paper", "bias", 0.0, probe=0.9)
    assert len(sens) == 2 and all(s > 1e-6 for s in sens)  # a KL: positive once anything changes
    assert sensitivity.measure(model, stats, ids[:2], "paper", "bias", 0.0, probe=0.005) == [0.0, 0.0]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
