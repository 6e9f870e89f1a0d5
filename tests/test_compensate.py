"""Compensation: exactness in float64, mean reproduction, save/load, sequential mode."""

from __future__ import annotations

import copy

import pytest
import torch

import tiny
from engine.models import adapters
from engine.prune import calibrate
from engine.prune import compensate
from engine.models import export
from engine.prune import mlp as prune
from engine.prune import sequential
from engine.config import PruneConfig
from engine.errors import MinigptError


def _ids(n=6, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, t), generator=g)


def _mlp_outputs(model, ids):
    """Each MLP's output (`out` module output) on `ids`, per layer."""
    outs, hs = {}, []
    for m in adapters.for_model(model).mlps():
        def hook(mod, args, out, i=m.layer):
            outs[i] = out.detach().reshape(-1, out.shape[-1]).clone()
        hs.append(m.out.module.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in hs:
        h.remove()
    return outs, logits


def _make_dependent(model, dup: dict[int, int], scale: float = -1.7):
    """Make neuron p's activation exactly scale × neuron k's (p -> k), in every MLP."""
    for m in adapters.for_model(model).mlps():
        with torch.no_grad():
            for p, k in dup.items():
                for i, proj in enumerate(m.ins):
                    w = proj.module.weight
                    sl = (lambda j: (slice(None), j)) if proj.transposed else (lambda j: (j, slice(None)))
                    # gated: gate row copied, up row scaled; plain: the (pre-activation) row copied
                    f = scale if (i == len(m.ins) - 1 and len(m.ins) > 1) else 1.0
                    w[sl(p)] = f * w[sl(k)]
                    if proj.bias is not None:
                        proj.bias[p] = f * proj.bias[k]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_lstsq_is_exact_when_pruned_neurons_are_combinations_of_kept(family):
    model = tiny.model(family).double()
    dup = {3: 10, 7: 20, 40: 5}  # pruned -> a kept neuron it copies
    _make_dependent(model, dup)
    ids = _ids()
    before, logits_before = _mlp_outputs(model, ids)
    stats = calibrate.calibrate(model, ids, 3, linears=False, gram=True)
    width = adapters.for_model(model).mlps()[0].width
    keep = torch.tensor([j for j in range(width) if j not in dup])
    plan = prune.plan_from_masks([keep] * len(before), [width] * len(before))
    pruned = copy.deepcopy(model)
    compensate.apply(pruned, plan.keep, stats, "lstsq", damping=0.0)
    prune.apply_structural(pruned, plan)
    assert adapters.for_model(pruned).widths() == [width - len(dup)] * len(before)
    after, logits_after = _mlp_outputs(pruned, ids)
    for i in before:
        assert torch.allclose(after[i], before[i], atol=1e-9, rtol=0), i
    assert torch.allclose(logits_after, logits_before, atol=1e-8, rtol=0)
    # the same pruning without compensation does change the output: the test can fail
    plain = copy.deepcopy(model)
    prune.apply_structural(plain, plan)
    assert not torch.allclose(_mlp_outputs(plain, ids)[1], logits_before, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_bias_compensation_reproduces_the_mean_output(family):
    model = tiny.model(family).double()
    ids = _ids()
    stats = calibrate.calibrate(model, ids, 2, linears=False)
    full, _ = _mlp_outputs(model, ids)
    plan = prune.select(model, stats, PruneConfig(rule="ratio", ratio=0.5))
    pruned = copy.deepcopy(model)
    compensate.apply(pruned, plan.keep, stats, "bias", 0.0)
    prune.apply_structural(pruned, plan)
    after, _ = _mlp_outputs(pruned, ids)
    plain = copy.deepcopy(model)
    prune.apply_structural(plain, plan)
    uncomp, _ = _mlp_outputs(plain, ids)
    # layer 0 sees the same inputs in both models, so its mean output is reproduced exactly
    assert torch.allclose(after[0].mean(0), full[0].mean(0), atol=1e-10, rtol=0)
    assert not torch.allclose(uncomp[0].mean(0), full[0].mean(0), atol=1e-4)
    # and the fluctuation is untouched: the outputs differ from uncompensated by a constant
    d = after[0] - uncomp[0]
    assert torch.allclose(d, d[:1].expand_as(d), atol=1e-10)


def test_bias_compensation_switches_on_llama_mlp_bias_and_refuses_mistral():
    llama = tiny.model("llama")
    compensate.ensure_out_bias(llama)
    assert llama.config.mlp_bias is True
    m = adapters.for_model(llama).mlps()[0]
    assert all(p.bias is not None and not p.bias.any() for p in [*m.ins, m.out])
    with pytest.raises(MinigptError, match="cannot store"):
        compensate.ensure_out_bias(tiny.model("mistral"))


def test_singular_lstsq_without_damping_is_a_clear_error():
    model = tiny.model("llama").double()
    with torch.no_grad():  # a dead neuron: its activation is exactly 0, so G_KK has a zero row
        for m in adapters.for_model(model).mlps():
            for proj in m.ins:
                proj.module.weight[3] = 0.0
    ids = _ids()
    stats = calibrate.calibrate(model, ids, 3, linears=False, gram=True)
    width = adapters.for_model(model).mlps()[0].width
    keep = [torch.arange(width)[torch.arange(width) != 0]] * 2  # neuron 3 kept
    with pytest.raises(MinigptError, match="damping"):
        compensate.apply(model, keep, stats, "lstsq", damping=0.0)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_uniform_bias_compensated_model_loads_with_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny.model("llama")
    ids = _ids()
    stats = calibrate.calibrate(model, ids, 2, linears=False)
    plan = prune.select(model, stats, PruneConfig(rule="ratio", ratio=0.25, round_to=8))
    compensate.apply(model, plan.keep, stats, "bias", 0.0)
    prune.apply_structural(model, plan)
    export.save_model(model, tiny.tokenizer(), tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert stock.config.mlp_bias and stock.model.layers[0].mlp.down_proj.bias.any()
    assert torch.equal(_logits(stock, ids), _logits(model, ids))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_nonuniform_compensated_model_loads_through_load_model(tmp_path, family):
    model = tiny.model(family)
    ids = _ids()
    stats = calibrate.calibrate(model, ids, 2, linears=False, gram=True)
    keep = [torch.arange(0, 64, 2), torch.arange(40)]
    plan = prune.plan_from_masks(keep, [64, 64])
    compensate.apply(model, plan.keep, stats, "bias", 0.0)
    compensate.apply(model, plan.keep, stats, "lstsq", 0.01)
    prune.apply_structural(model, plan)
    export.save_model(model, tiny.tokenizer(), tmp_path / "m")
    loaded = export.load_model(tmp_path / "m")
    assert adapters.for_model(loaded).widths() == [32, 40]
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def _post_norm_opt():
    from transformers import AutoModelForCausalLM

    cfg = tiny.config("opt")
    cfg.do_layer_norm_before = False  # OPT-350m: the residual add is normalised after the MLP
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return m.eval()


@pytest.mark.parametrize("family", ["llama", "opt", "opt-post-norm"])
def test_sequential_first_layer_matches_one_shot_and_zeroed_equals_sliced(family):
    model = _post_norm_opt() if family == "opt-post-norm" else tiny.model(family)
    ids = _ids(n=5)
    stats = calibrate.calibrate(model, ids, 2, linears=False, gram=True)
    one = prune.select(model, stats, PruneConfig(rule="ratio", ratio=0.3, criterion="wanda"))
    seq_model = copy.deepcopy(model)
    # batch 2 over 5 blocks: two batch shapes, so both capture paths run
    keep = sequential.prune(seq_model, one.widths_after, ids, 2, "wanda", "lstsq", 0.01)
    assert torch.equal(keep[0], one.keep[0])  # layer 0 sees the same inputs either way
    assert [k.numel() for k in keep] == one.widths_after
    zeroed = _logits(seq_model, ids)
    prune.apply_structural(seq_model, prune.plan_from_masks(keep, one.widths_before))
    assert torch.allclose(_logits(seq_model, ids), zeroed, atol=1e-5)


@pytest.mark.parametrize("method", ["lstsq", "bias"])
def test_sequential_correction_brings_the_output_closer_to_the_full_model(method):
    model = tiny.model("llama").double()
    ids = _ids(n=8)
    ref = _logits(model, ids)
    errs = {}
    for correct in (False, True):
        m = copy.deepcopy(model)
        sequential.prune(m, [32, 32], ids, 4, "wanda", method, 1e-6, correct=correct)
        errs[correct] = float((_logits(m, ids) - ref).pow(2).mean())
    # refitting the weights repairs much of the upstream error; a bias only shifts the mean
    assert errs[True] < (0.9 if method == "lstsq" else 1.0) * errs[False], errs


def test_sequential_with_nothing_removed_is_the_identity():
    model = tiny.model("gpt2")
    ids = _ids(n=4)
    ref = _logits(model, ids)
    widths = adapters.for_model(model).widths()
    sequential.prune(model, widths, ids, 2, "paper", "none", 0.0)
    assert torch.equal(_logits(model, ids), ref)


def test_prune_stage_compensates_and_the_saved_model_is_what_was_evaluated(tmp_path, monkeypatch):
    """Through the pipeline: the Gram is collected only when needed, and the model saved is the compensated one."""
    import ft_case
    from safetensors import safe_open

    from engine.run import pipeline

    cfg = ft_case.config(tmp_path, "llama", prune={"compensation": "lstsq", "allocation": "sensitivity",
                                                   "sensitivity_tokens": 64, "round_to": 8},
                         finetune={"enabled": False}, calibrate={"max_tokens": 512})
    sess = ft_case.session(tmp_path, "lstsq", cfg)
    results = pipeline.run(sess)
    assert sess.status() == "done"
    with safe_open(str(sess.stats_dir / calibrate.STATS_FILE), "pt") as f:
        assert "mlp.0.gram" in f.keys()
    widths = results["prune"]["widths"]
    assert all(w % 8 == 0 for w in widths) and sum(widths) < 0.8 * 128
    # recompute the same pruning by hand from the saved statistics: identical weights
    from engine.models import load as models

    base, _, _ = models.load(cfg.model)
    stats = calibrate.Stats.load(sess.stats_dir)
    from engine.data import domain as data_mod

    d = data_mod.DomainData.build(cfg.data, tiny.tokenizer(), max_calib=cfg.calibrate.max_tokens)
    plan = prune.select_and_compensate(base, stats, cfg.prune, data_mod.blocks(d.calibrate, 32), 2, cfg.seed)
    prune.apply_structural(base, plan)
    saved = export.load_model(sess.model_dir)
    assert torch.equal(saved.model.layers[1].mlp.down_proj.weight, base.model.layers[1].mlp.down_proj.weight)
    # an empty calibration cache: a cached gram-bearing pass would serve the plain run too
    monkeypatch.setenv("MINIGPT_CALIBRATION_CACHE", str(tmp_path / "other-cache"))
    plain = ft_case.session(tmp_path, "plain", ft_case.config(tmp_path, "llama", finetune={"enabled": False},
                                                                calibrate={"max_tokens": 512}))
    pipeline.run(plain, stages=["calibrate"])
    with safe_open(str(plain.stats_dir / calibrate.STATS_FILE), "pt") as f:
        assert "mlp.0.gram" not in f.keys()  # the default calibration stays lean


def test_a_per_layer_model_with_its_vocabulary_keep_map_loads(tmp_path):
    """minigpt_vocab_keep.safetensors sits next to the weights: it is not a weight file."""
    model = tiny.model("llama")
    ids = _ids()
    prune.apply_structural(model, prune.plan_from_masks([torch.arange(0, 64, 2), torch.arange(40)], [64, 64]))
    export.save_model(model, tiny.tokenizer(), tmp_path / "m", vocab_keep=torch.arange(300))
    assert (tmp_path / "m" / export.VOCAB_KEEP_FILE).is_file()
    loaded = export.load_model(tmp_path / "m")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
