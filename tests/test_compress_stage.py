"""The prune stage over every axis on a tiny Llama with GQA: per-axis keys, and a parameter
budget whose search ranks candidates by a short distillation each, through the real pipeline."""

from __future__ import annotations

import csv

import pytest
import torch

import ft_case
from ft_case import one_thread  # noqa: F401  (fixture)
import tiny
from engine.models import export, size
from engine.run import pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PRE = ["baseline", "calibrate", "prune"]


def _cfg(tmp, **prune):
    return ft_case.config(tmp, "llama", prune={"criterion": "wanda", "compensation": "lstsq", **prune},
                          finetune={"enabled": False}, evaluate={"bpb": True})


def test_per_axis_keys_cut_every_axis(tmp_path):
    cfg = _cfg(tmp_path, ratio=0.25, head_ratio=0.5, depth=1, hidden_ratio=0.25)
    s = ft_case.session(tmp_path, "axes", cfg)
    res = pipeline.run(s, stages=PRE + ["evaluate"])
    m = export.load_model(s.model_dir)
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (1, 24, 2, 1)
    assert c.head_dim == 8  # unchanged, and explicit: hidden / heads would say 12
    assert size.count_params(m) == res["models"]["pruned"]["params"]
    assert res["models"]["pruned"]["params"] < res["models"]["base"]["params"]
    assert res["models"]["pruned"]["bpb"] > 0 and res["models"]["base"]["bpb"] > 0
    # the bits per byte of both models are over the same held-out bytes
    assert res["models"]["pruned"]["bpb_protocol"]["bytes"] == res["models"]["base"]["bpb_protocol"]["bytes"]
    # ... and say which bytes and which corpus (the test's own documents, hashed as the stage read them)
    from engine.data.domain import load_documents, texts_sha256

    base_p, pruned_p = res["models"]["base"]["bpb_protocol"], res["models"]["pruned"]["bpb_protocol"]
    assert base_p["texts_sha256"] == pruned_p["texts_sha256"] and len(base_p["texts_sha256"]) == 64
    assert base_p["corpus_sha256"] == pruned_p["corpus_sha256"] == texts_sha256(load_documents(s.config().data))
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, m(ids).logits, atol=1e-5)


def test_budget_search_lands_on_target_and_writes_its_table(tmp_path):
    cfg = _cfg(tmp_path, target_params=0.6, search_candidates=3, search_steps=2, embedding_threshold=-1.0)
    s = ft_case.session(tmp_path, "budget", cfg)
    res = pipeline.run(s, stages=PRE)
    search = res["search"]
    total, target = search["total_params"], search["target_params"]
    assert target == round(0.6 * total)
    assert len(search["candidates"]) == 3
    assert all(abs(r["estimated_params"] - target) <= 0.05 * target for r in search["candidates"])
    # every candidate was pruned on a copy, distilled and measured; the estimate is its real size
    assert all(r["params"] == r["estimated_params"] and r["bpb"] > 0 for r in search["candidates"])
    best = min(search["candidates"], key=lambda r: r["bpb"])
    assert search["chosen"]["label"] == best["label"]
    # the session's model is the chosen mix, at the size the search measured for it
    m = export.load_model(s.model_dir)
    assert size.count_params(m) == best["params"] == res["models"]["pruned"]["params"]
    with open(s.path / "search.csv") as f:
        assert [r["label"] for r in csv.DictReader(f)] == [r["label"] for r in search["candidates"]]
    assert any(e["type"] == "progress" and e.get("phase") == "search" for e in s.events())


def test_a_speed_floor_limits_the_search_to_mixes_that_reach_it(tmp_path):
    """`prune.search_speedup`: every candidate cuts the estimated MACs per token by the floor,
    the table records each one's figure, and the run log names the floor."""
    cfg = _cfg(tmp_path, target_params=0.6, search_candidates=2, search_steps=1, search_speedup=1.7,
               embedding_threshold=-1.0)
    s = ft_case.session(tmp_path, "floor", cfg)
    res = pipeline.run(s, stages=PRE)
    search = res["search"]
    assert search["min_speedup"] == 1.7 and search["speedup_context"] == cfg.evaluate.block_size
    assert len(search["candidates"]) == 2
    assert all(r["mac_speedup"] >= 1.7 for r in search["candidates"])
    assert search["chosen"]["mac_speedup"] >= 1.7
    with open(s.path / "search.csv") as f:
        assert all(float(r["mac_speedup"]) >= 1.7 for r in csv.DictReader(f))
    assert any("estimated ≥ 1.7x faster" in (e.get("message") or e.get("text") or "") for e in s.events())


@pytest.mark.parametrize("candidates", [1, 2])
def test_the_budget_prices_and_tries_the_vocabulary_cut_the_keep_rule_makes(tmp_path, candidates):
    """With `vocab_rule = "heldout"` and a row budget, the search priced (and tried) ε_emb's cut
    while the stage then cut to `vocab_rows`: the model missed the size the search chose for it
    (20,512 parameters where the chosen mix said 20,896). One plan now serves all three."""
    cfg = _cfg(tmp_path, target_params=0.7, search_axes=["mlp", "vocab"], search_candidates=candidates,
               search_steps=1, vocab_rule="heldout", vocab_prior=0.0, vocab_rows=290)
    s = ft_case.session(tmp_path, f"vocab{candidates}", cfg)
    res = pipeline.run(s, stages=PRE)
    search = res["search"]
    assert 0 < search["vocab_rows_cut"] <= 290
    if candidates > 1:  # each candidate pruned on a copy: its real size is the one priced
        assert any("no vocab" not in r["label"] for r in search["candidates"])
        assert all(r["params"] == r["estimated_params"] for r in search["candidates"])
    if "no vocab" not in search["chosen"]["label"]:
        assert res["vocab"]["rows_after"] == res["vocab"]["heldout"]["chosen_rows"] == search["vocab_rows_cut"]
    else:
        assert "vocab" not in res
    assert res["models"]["pruned"]["params"] == search["chosen"]["estimated_params"]
    assert size.count_params(export.load_model(s.model_dir)) == res["models"]["pruned"]["params"]
