"""The held-out text's overlap with the fine-tune split: counted exactly, and written with
every bits-per-byte figure, with a warning where the corpus is made of near-copies."""

from __future__ import annotations

import json
import random

import pytest

import ft_case
from ft_case import one_thread  # noqa: F401  (fixture)
from engine.data import overlap
from engine.data.domain import load_documents, split_documents
from engine.run import pipeline


def test_windows_are_counted_where_they_occur_and_found_anywhere():
    words = [f"w{i}" for i in range(20)]
    held = [" ".join(words[:15]),  # windows w0..w12, w1..w13, w2..w14
            " ".join(words[:13] + words[:13])]  # 14 windows; the first and the last are w0..w12
    ref = ["x " + " ".join(words[1:14]) + " y",  # holds w1..w13 only
           " ".join(words[:13])]  # holds w0..w12
    o = overlap.ngram_overlap(held, ref)
    # found: w0..w12 (once in doc 1, twice in doc 2) and w1..w13 (once in doc 1) = 4 of 17
    assert o == {"n": 13, "windows": 17, "share": round(4 / 17, 4)}
    assert overlap.ngram_overlap(held, []) ["share"] == 0.0
    assert overlap.ngram_overlap(["too short"], ref) == {"n": 13, "windows": 0, "share": None}
    assert overlap.ngram_overlap(held, held)["share"] == 1.0


def _near_copies(folder, docs=40):
    """A licence-like corpus: one long text, each copy with its own first line."""
    rng = random.Random(1)
    body = " ".join(rng.choice(ft_case.WORDS) for _ in range(150))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "copies.jsonl"
    with open(path, "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": f"Copyright {1990 + i} holder number {i}.\n{body}"}) + "\n")
    return path


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("corpus", ["word salad", "near copies"])
def test_every_bpb_protocol_names_the_overlap_and_a_high_one_is_a_warning(tmp_path, corpus):
    cfg = ft_case.config(tmp_path, "llama", evaluate={"bpb": True})
    if corpus == "near copies":
        cfg.data.source = str(_near_copies(tmp_path / "copies"))
    s = ft_case.session(tmp_path, "ov", cfg)
    res = pipeline.run(s, stages=["baseline"])
    got = res["models"]["base"]["bpb_protocol"]["finetune_overlap"]
    parts = split_documents(load_documents(cfg.data), cfg.data)
    # over the held-out bytes the stage scored (the evaluate split's first evaluate.max_tokens tokens)
    from transformers import AutoTokenizer

    from engine.data.domain import texts_sha256
    from engine.prune.vocab import held_out_texts

    tok = AutoTokenizer.from_pretrained(cfg.model.source)
    texts = held_out_texts(tok, parts["evaluate"], cfg.evaluate.max_tokens)
    assert texts_sha256(texts) == res["models"]["base"]["bpb_protocol"]["texts_sha256"]
    assert got == overlap.ngram_overlap(texts, parts["finetune"]) and got["windows"] > 200
    warnings = [e["message"] for e in ft_case.events(s) if e["type"] == "log" and e.get("level") == "warning"]
    said = [e["message"] for e in ft_case.events(s) if e["type"] == "log" and "-word windows" in e["message"]]
    assert len(said) == 1
    if corpus == "near copies":
        assert got["share"] > 0.9
        assert any("measure recall" in w for w in warnings), warnings
    else:
        assert got["share"] < 0.05 and not any("measure recall" in w for w in warnings)
