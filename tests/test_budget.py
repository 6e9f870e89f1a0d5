"""The parameter budget: unit costs read from real (tiny) models count them exactly, and the
candidate mixes land within the tolerance and spread over the axes."""

from __future__ import annotations

import pytest

from engine.errors import MinigptError
from engine.models import adapters, size
from engine.prune import budget
from tests import tiny


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt", "phi"])
def test_unpruned_count_is_exact(family):
    m = tiny.model(family)
    c = budget.costs(m, adapters.for_model(m))
    assert budget.estimate(c, budget.Mix()) == size.count_params(m)


def test_mlp_and_vocab_cuts_count_exactly():
    """The MLP and vocabulary axes exist today: the estimate equals the sliced model's count."""
    from engine.prune import mlp as prune
    from engine.config import PruneConfig
    from engine.prune.calibrate import calibrate

    m = tiny.model("llama")
    ids = tiny.tokenizer()(tiny.TEXT, return_tensors="pt")["input_ids"][:, :256].reshape(2, 128)
    stats = calibrate(m, ids, 2)
    c = budget.costs(m, adapters.for_model(m), vocab_rows_cut=200)
    mix = budget.Mix(mlp=0.25)
    plan = prune.select(m, stats, PruneConfig(rule="ratio", ratio=0.25))
    prune.apply_structural(m, plan)
    assert budget.estimate(c, mix) == size.count_params(m)
    # 200 embedding rows instead of 320, tied head: 120 rows x 32 channels fewer
    assert budget.estimate(c, budget.Mix(mlp=0.25, vocab=True)) == size.count_params(m) - 120 * 32


def test_heads_kept_is_gqa_aware():
    c = budget.Costs(hidden=576, vocab_rows=10, vocab_rows_cut=0, tied=True, head_bias=False, q_heads=9, kv_heads=3, head_dim=64,
                     widths=[1536])
    assert budget.heads_kept(c, 0.0) == (9, 3)
    assert budget.heads_kept(c, 1 / 3) == (6, 2)  # a whole group
    assert budget.heads_kept(c, 2 / 3) == (3, 1)
    assert budget.heads_kept(c, 1 / 9) == (6, 3)  # one head from every group (3 heads), not one head
    assert budget.head_levels(c) == [0.0, round(1 / 3, 6), round(2 / 3, 6)]


def test_candidates_land_on_the_budget_and_spread():
    m = tiny.model("llama")
    c = budget.costs(m, adapters.for_model(m), vocab_rows_cut=240)
    total = c.total()
    target = budget.target_count(total, 0.6)
    cands = budget.choose(c, target, 0.05, ["mlp", "heads", "hidden", "depth", "vocab"], 5)
    assert len(cands) == 5
    assert len({m for m, _ in cands}) == 5
    for mix, n in cands:
        assert abs(n - target) <= 0.05 * target
        assert n == budget.estimate(c, mix)
    used = {ax for mix, _ in cands for ax, v in (("mlp", mix.mlp), ("heads", mix.heads), ("hidden", mix.hidden),
                                                    ("depth", mix.depth), ("vocab", mix.vocab)) if v}
    assert len(used) >= 3  # spread, not five neighbours on one axis
    only_mlp = budget.choose(c, budget.target_count(total, 0.8), 0.05, ["mlp"], 3)
    assert len(only_mlp) == 3
    assert all(mix.heads == mix.hidden == mix.depth == 0 and not mix.vocab for mix, _ in only_mlp)


def test_budget_errors_are_one_line():
    m = tiny.model("llama")
    c = budget.costs(m, adapters.for_model(m))
    with pytest.raises(MinigptError, match="nothing to remove"):
        budget.target_count(c.total(), 1.0 * c.total())
    with pytest.raises(MinigptError, match="no mix"):
        budget.choose(c, budget.target_count(c.total(), 0.05), 0.01, ["depth"], 3)


def test_search_ranks_by_bits_per_byte():
    mixes = [(budget.Mix(mlp=0.3), 100), (budget.Mix(heads=0.5), 101), (budget.Mix(depth=1), 99)]
    scores = {0.3: 1.2, 0.0: 1.1}
    seen = []
    trials = budget.search(mixes, lambda mix: (mix.depth + 1, 1.5 if mix.depth else scores[mix.mlp]),
                           progress=lambda d, n, r: seen.append((d, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert budget.best(trials).mix == budget.Mix(heads=0.5)


@pytest.mark.parametrize("mix", [budget.Mix(heads=0.5), budget.Mix(heads=0.25), budget.Mix(hidden=0.25),
                                 budget.Mix(depth=1), budget.Mix(mlp=0.5, heads=0.5, hidden=0.375, depth=1)])
def test_other_axes_count_exactly(mix):
    """Heads, hidden channels and blocks cut for real: the estimate is the pruned model's count."""
    import dataclasses

    from engine.config import PruneConfig
    from engine.prune import mlp as prune
    from engine.prune import structure
    from engine.prune.calibrate import calibrate
    from engine.run import compress

    m = tiny.model("llama")
    ids = tiny.tokenizer()(tiny.TEXT, return_tensors="pt")["input_ids"][:, :256].reshape(2, 128)
    stats, struct = calibrate(m, ids, 2), structure.collect(m, ids, 2)
    c = budget.costs(m, adapters.for_model(m))
    p = dataclasses.replace(PruneConfig(), **mix.prune_keys())
    if p.ratio:
        prune.apply_structural(m, prune.select(m, stats, p))
    compress.apply_axes(m, p, struct)
    assert budget.estimate(c, mix) == size.count_params(m)


def test_mlp_only_is_always_a_candidate_where_it_reaches_the_budget():
    m = tiny.model("llama")
    c = budget.costs(m, adapters.for_model(m), vocab_rows_cut=240)
    target = budget.target_count(c.total(), 0.8)
    cands = budget.choose(c, target, 0.05, ["mlp", "heads", "hidden", "depth", "vocab"], 4)
    assert len(cands) == 4
    assert any(not (mix.heads or mix.hidden or mix.depth) and mix.mlp > 0 for mix, _ in cands)


@pytest.mark.parametrize("mix", [budget.Mix(), budget.Mix(heads=0.5, vocab=True), budget.Mix(hidden=0.25),
                                 budget.Mix(mlp=0.5, heads=0.25, hidden=0.375, depth=1, vocab=True)])
def test_macs_match_torch_flop_counter_on_the_pruned_model(mix):
    """`budget.macs` against torch's own count of a forward pass over the pruned model: the
    weights (every linear and the tied head) exactly, and the attention term as the causal
    half of the full L x L products the eager kernels run."""
    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engine.config import PruneConfig
    from engine.prune import mlp as prune
    from engine.prune import structure, vocab
    from engine.prune.calibrate import calibrate, token_counts
    from engine.run import compress

    m = tiny.model("llama")
    m.set_attn_implementation("eager")
    tok = tiny.tokenizer()
    ids = tok(tiny.TEXT, return_tensors="pt")["input_ids"][:, :256].reshape(2, 128)
    stats, struct = calibrate(m, ids, 2), structure.collect(m, ids, 2)
    counts = token_counts(ids.reshape(-1), m.config.vocab_size)
    rows_cut = int(vocab.plan(tok, counts, 0.0, m).keep.numel())
    c = budget.costs(m, adapters.for_model(m), vocab_rows_cut=rows_cut)
    p = dataclasses.replace(PruneConfig(), **mix.prune_keys())
    if p.ratio:
        prune.apply_structural(m, prune.select(m, stats, p))
    compress.apply_axes(m, p, struct)
    if mix.vocab:
        m, tok, _ = vocab.prune_vocabulary(m, tok, counts, 0.0)
    assert rows_cut < 320 or not mix.vocab
    weights = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))
    assert budget.macs(c, mix) == weights  # the tied head is the Linear lm_head here
    L = 64
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(input_ids=torch.zeros(1, L, dtype=torch.long))
    per_token = fc.get_total_flops() / 2 / L  # MACs
    full_attention = per_token - weights  # L keys per query in the eager kernels
    assert full_attention > 0
    assert budget.macs(c, mix, L) - budget.macs(c, mix) == pytest.approx(full_attention * (L + 1) / (2 * L))


def test_a_speed_floor_keeps_only_mixes_that_reach_it():
    m = tiny.model("llama")
    c = budget.costs(m, adapters.for_model(m), vocab_rows_cut=120)
    target = budget.target_count(c.total(), 0.6)
    axes = ["mlp", "heads", "hidden", "depth", "vocab"]
    free = budget.feasible(c, target, 0.05, axes)
    speeds = sorted(budget.speedup(c, mx, 128) for mx, _ in free)
    fastest, floor = speeds[-1], speeds[len(speeds) // 2]  # the faster half passes
    kept = budget.feasible(c, target, 0.05, axes, floor, 128)
    assert 0 < len(kept) < len(free)
    assert all(budget.speedup(c, mx, 128) >= floor for mx, _ in kept)
    assert {mx for mx, _ in kept} == {mx for mx, _ in free if budget.speedup(c, mx, 128) >= floor}
    cands = budget.choose(c, target, 0.05, axes, 3, floor, 128)
    assert all(budget.speedup(c, mx, 128) >= floor for mx, _ in cands)
    with pytest.raises(MinigptError, match=f"fastest reaches {fastest:.2f}x") as e:
        budget.choose(c, target, 0.05, axes, 3, fastest + 0.5, 128)
    assert "prune.search_speedup" in e.value.fix and "\n" not in str(e.value)


def test_speed_floor_config_errors_name_the_fix():
    from engine import config as config_mod

    with pytest.raises(MinigptError, match="search_speedup = 1.5 needs a parameter budget"):
        config_mod.from_dict({"prune": {"search_speedup": 1.5}})
    with pytest.raises(MinigptError, match="search_speedup = 0.8 is no speed floor"):
        config_mod.from_dict({"prune": {"search_speedup": 0.8, "target_params": 0.5}})
    assert config_mod.from_dict({"prune": {"search_speedup": 1.5, "target_params": 0.5}}).prune.search_speedup == 1.5
