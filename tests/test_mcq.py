"""MCQ sets: loaders, the sentence-completion generator, shared-prefix scoring, pipeline hook."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import tiny
from engine.evaluate import perplexity as evaluate
from engine.evaluate import mcq
from engine.config import RunConfig
from engine.errors import MinigptError


# ---- loaders ---------------------------------------------------------------------------------
def test_jsonl_accepts_index_letter_and_choice_text(tmp_path):
    p = tmp_path / "set.jsonl"
    rows = [{"question": "2+2?", "choices": ["3", "4"], "answer": 1},
            {"question": "Colour of sky?", "choices": ["red", "blue", "green"], "answer": "b"},
            {"question": "Capital of France?", "choices": ["Rome", "Paris"], "answer": "Paris"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    s = mcq.load(str(p))
    assert s.name == "set" and s.kind == "question"
    assert [it.answer for it in s.items] == [1, 1, 1]
    assert s.items[1].choices == ("red", "blue", "green")


@pytest.mark.parametrize("header", [True, False])
def test_mmlu_csv_with_or_without_header(tmp_path, header):
    p = tmp_path / "anatomy_test.csv"
    lines = (["question,A,B,C,D,answer"] if header else []) + [
        '"Which bone, of these, is longest?",Femur,Ulna,Rib,Skull,A',
        "Where is the heart?,Chest,Leg,Arm,Head,a",
    ]
    p.write_text("\n".join(lines) + "\n")
    s = mcq.load(str(p))
    assert len(s.items) == 2
    assert s.items[0] == mcq.Item("Which bone, of these, is longest?", ("Femur", "Ulna", "Rib", "Skull"), 0)


def test_paper_json_keeps_context(tmp_path):
    p = tmp_path / "basic_economics_dataset.json"
    p.write_text(json.dumps({"context": "Economics Test:", "questions": {
        "Inflation is": {"choices": ["a rise in prices", "a fall", " ", "rain"], "answer": 0}}}))
    s = mcq.load(str(p))
    assert s.context == "Economics Test:" and s.items[0].choices[2] == " "
    assert mcq.prompt(s, 0).startswith("Economics Test:\n\nQuestion: Inflation is\nAnswer:")


def test_hub_dataset_with_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hubset"
    folder.mkdir()
    datasets.Dataset.from_dict({"q": ["One?", "Two?"], "A": ["a", "b"], "B": ["c", "d"], "C": ["e", "f"],
                                "key": ["C", "A"]}).to_parquet(str(folder / "test.parquet"))
    s = mcq.load(f"hub:{folder}", ["question=q", "choices=A,B,C", "answer=key"])
    assert [it.answer for it in s.items] == [2, 0] and s.items[1].choices == ("b", "d", "f")
    nested = tmp_path / "nested"
    nested.mkdir()
    datasets.Dataset.from_dict({"question": ["Q?"], "choices": [{"text": ["x", "y"], "label": ["A", "B"]}],
                                "answer": [1]}).to_parquet(str(nested / "test.parquet"))
    s = mcq.load(f"hub:{nested}", ["choices=choices.text"])
    assert s.items[0].choices == ("x", "y") and s.items[0].answer == 1
    with pytest.raises(MinigptError, match="no column 'nope'"):
        mcq.load(f"hub:{folder}", ["question=nope"])


@pytest.mark.parametrize("row,match", [
    ({"question": "Q", "choices": ["a", "b"], "answer": "2"}, "ambiguous"),
    ({"question": "Q", "choices": ["a", "b"], "answer": 5}, "outside"),
    ({"question": "Q", "choices": ["a"], "answer": 0}, "at least 2"),
    ({"question": "", "choices": ["a", "b"], "answer": 0}, "question is missing"),
    ({"question": "Q", "choices": ["a", "b"]}, "missing or invalid answer"),
])
def test_bad_items_fail_with_the_line(tmp_path, row, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "ok", "choices": ["a", "b"], "answer": 0}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(MinigptError, match=match) as e:
        mcq.load(str(p))
    assert "line 2" in str(e.value)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(MinigptError, match="not found"):
        mcq.load(str(tmp_path / "none.jsonl"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(MinigptError, match="unknown type"):
        mcq.load(str(tmp_path / "x.xml"))


# ---- generator -------------------------------------------------------------------------------
def _prose(n_docs=6, per_doc=25, seed=3):
    rng = random.Random(seed)
    subj = "The licence|A function|This module|Every class|The caller|Each worker|The parser|A user".split("|")
    verb = "returns|grants|copies|reads|writes|checks|builds|sends".split("|")
    obj = ("the value of the key|a copy of the software|permission to modify the file|the list of open handles|"
           "an error when the input is empty|the text without trailing spaces|a new socket for each client|"
           "the result of the last call").split("|")
    tail = ("before the process exits|under the terms below|when the lock is held|in the order given|"
            "without any further notice|for every item in the queue|as soon as it is ready|if nothing else applies"
            ).split("|")
    docs = []
    for _ in range(n_docs):
        sents = [f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}."
                 for _ in range(per_doc)]
        docs.append(" ".join(sents[:10]) + "\n\n" + "\n".join(sents[10:]))
    return docs


def test_generator_is_seeded_and_valid():
    docs = _prose()
    a = mcq.generate(docs, 40, seed=7)
    assert a.items == mcq.generate(docs, 40, seed=7).items
    assert a.items != mcq.generate(docs, 40, seed=8).items
    originals = {" ".join(s.split()) for d in docs for s in mcq.sentences(d)}
    assert a.kind == "completion" and len(a.items) == 40
    for it in a.items:
        assert len(it.choices) == 4 and 0 <= it.answer < 4
        assert f"{it.question} {it.choices[it.answer]}" in originals  # true ending at the answer index
        assert len({c.lower() for c in it.choices}) == 4  # distractors distinct, none equal to the answer
        assert len(it.question.split()) >= 3 and all(len(c.split()) >= 3 for c in it.choices)
    assert len({it.question for it in a.items}) == 40  # one question per sentence
    assert len({it.answer for it in a.items}) == 4  # the answer's position varies


def test_generator_on_a_builtin_corpus_and_too_little_text():
    from engine.data.corpora import load_builtin

    s = mcq.generate(load_builtin("licenses")[:40], 100, seed=0)
    assert len(s.items) == 100
    with pytest.raises(MinigptError, match="too few"):
        mcq.generate(["Only one sentence here that is long enough to use."], 5)


def test_sentences_reflow_wrapped_lines():
    text = "Permission is hereby granted,\nfree of charge, to any person. The above copyright\nnotice shall be included."
    assert mcq.sentences(text) == ["Permission is hereby granted, free of charge, to any person.",
                                   "The above copyright notice shall be included."]


def test_fewshot_prompt_is_seeded_and_excludes_the_item():
    s = mcq.MCQSet("s", [mcq.Item(f"q{i}", ("a", f"b{i}"), 1) for i in range(6)], context="Ctx:")
    p = mcq.prompt(s, 2, fewshot=3, seed=1)
    assert p == mcq.prompt(s, 2, fewshot=3, seed=1)
    assert p.startswith("Ctx:\n\n") and p.endswith("Question: q2\nAnswer:")
    assert p.count("Question:") == 4 and "q2\nAnswer: b2" not in p
    assert "\nAnswer: b" in p  # the examples carry their answers
    assert mcq.prompt(s, 2, context="") == "Question: q2\nAnswer:"


# ---- scoring ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    return tiny.model("llama"), tiny.tokenizer()


def _nll_reference(model, ids):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_scores_equal_plain_forward_per_choice(lm):
    model, tok = lm
    s = mcq.generate(_prose(), 6, seed=1)
    res = mcq.score(model, tok, s, batch_size=4)
    for it, rec in zip(s.items, res["items"]):
        lls, ppls = [], []
        for c in it.choices:
            ctx_ids = tok(it.question)["input_ids"]
            whole = tok(it.question + " " + c)["input_ids"]
            lp = _nll_reference(model, whole)
            lls.append(sum(lp[len(ctx_ids) - 1:]))
            ppls.append(math.exp(-sum(lp) / len(lp)))
        assert rec["lls"] == pytest.approx(lls, abs=1e-4)
        assert rec["paper_ppl"] == pytest.approx(ppls, rel=1e-4)
        assert rec["pred"]["acc"] == max(range(4), key=lambda j: lls[j])
        assert rec["pred"]["acc_paper"] == min(range(4), key=lambda j: ppls[j])
        norm = [ll / len(c) for ll, c in zip(lls, it.choices)]
        assert rec["pred"]["acc_norm"] == max(range(4), key=lambda j: norm[j])
    assert res["acc"] == sum(r["pred"]["acc"] == r["answer"] for r in res["items"]) / 6
    assert res["stderr"]["acc"] == pytest.approx(math.sqrt(res["acc"] * (1 - res["acc"]) / 6))


def test_paper_rule_ignores_prompt_and_context(lm):
    model, tok = lm
    s = mcq.MCQSet("s", [mcq.Item("The licence grants", ("permission to copy", "a function value"), 0)],
                   context="Licence Test:")
    plain = mcq.score(model, tok, s, rules=("acc_paper",))
    fancy = mcq.score(model, tok, s, rules=("acc_paper",), fewshot=0, template="Q: {question}\nA:")
    assert plain["items"][0]["paper_ppl"] == fancy["items"][0]["paper_ppl"]
    assert "lls" not in plain["items"][0]
    assert set(plain) >= {"acc_paper", "stderr", "n", "items", "protocol"} and "acc" not in plain


def test_batching_and_rules_do_not_change_scores(lm):
    model, tok = lm
    s = mcq.generate(_prose(), 6, seed=2)
    a = mcq.score(model, tok, s, batch_size=1)
    b = mcq.score(model, tok, s, batch_size=7, fewshot=0)
    c = mcq.score(model, tok, s, rules=("acc",), batch_size=3)
    for x, y, z in zip(a["items"], b["items"], c["items"]):
        assert x["lls"] == pytest.approx(y["lls"], abs=1e-5) == z["lls"]
        assert x["paper_ppl"] == pytest.approx(y["paper_ppl"], rel=1e-5)


@pytest.mark.parametrize("family,mode", [(f, "sdpa") for f in tiny.FAMILIES] + [("llama", "eager"), ("llama", "unshared")])
def test_shared_prefix_rows_equal_full_forward(family, mode):
    model = tiny.model(family)
    if mode == "eager":
        model.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(4):
        pre = torch.randint(0, 300, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
        seqs = [tuple(pre + torch.randint(0, 300, (int(torch.randint(1, 5, (1,), generator=g)),),
                                          generator=g).tolist()) for _ in range(3)]
        groups.append((seqs, [1, min(2, len(seqs[1]) - 1), len(seqs[2]) - 1]))
    groups.append(([(1, 2, 3), (4, 5, 6, 7)], [1, 2]))  # no shared prefix
    groups.append(([(9, 8, 7), (9, 8, 7)], [1, 2]))  # identical sequences
    few = list(range(20, 40))  # few-shot prompt + question per choice, and question + choice (paper's rule)
    groups.append(([tuple(few + [5, 6, 7]), tuple(few + [5, 6, 8, 9]), (5, 6, 7, 1), (5, 6, 8, 2)], [21, 21, 2, 2]))
    groups.append((groups[-1][0], [1, 1, 1, 1]))  # whole-sequence scores (paper rule): prefix positions asked 2x
    out = mcq.token_logprobs(model, groups, batch_size=3, share=False if mode == "unshared" else None)
    for (seqs, lo), got in zip(groups, out):
        for seq, first, lp in zip(seqs, lo, got):
            ref = _nll_reference(model, list(seq))[first - 1:]
            assert lp.tolist() == pytest.approx(ref, abs=2e-5)


def test_sequences_pack_by_shared_prefix():
    few = tuple(range(20, 40))
    seqs = [few + (5, 6, 7), (5, 6, 7, 1), few + (5, 6, 8, 9), (5, 6, 8, 2), (3, 1)]
    # the two rules' sequences share different prefixes: two packed rows, plus the stray
    assert sorted((sorted(js), p) for js, p in mcq._packs(seqs)) == [([0, 2], 22), ([1, 3], 2), ([4], 1)]
    rows = mcq._rows([(seqs, [1] * 5)], share=True)
    assert sorted(r.length for r in rows) == [1, 4, 23]  # prefix 22 + tails 0 and 1; prefix 2 + 1 + 1; (3,) alone
    assert sum(r.length for r in rows) < sum(len(x) - 1 for x in seqs)


def test_protocol_and_comparable(lm):
    model, tok = lm
    s = mcq.generate(_prose(), 5, seed=0)
    p0 = mcq.score(model, tok, s, rules=("acc",))["protocol"]
    p1 = mcq.score(model, tok, s, rules=("acc",), fewshot=1)["protocol"]
    assert p0["items"] == 5 and p0["choices"] == 4 and p0["template"] == "{question}"
    assert evaluate.comparable(p0, p1) == ["fewshot: 0 vs 1"]
    with pytest.raises(MinigptError, match="unknown MCQ scoring rule"):
        mcq.score(model, tok, s, rules=("accuracy",))


# ---- the pipeline hook -----------------------------------------------------------------------
def test_mcq_sets_and_scores_for_the_pipeline(lm, tmp_path):
    model, tok = lm
    p = tmp_path / "set.jsonl"
    p.write_text("".join(json.dumps({"question": f"Question {i}?", "choices": ["yes", "no", "maybe"],
                                     "answer": i % 3}) + "\n" for i in range(7)))
    cfg = RunConfig()
    cfg.evaluate.mcq_files = [str(p)]
    cfg.evaluate.mcq_generate = 12
    sets = mcq.sets_for(cfg.evaluate, _prose(), cfg.seed, cfg.data.source)
    progress = []
    res = mcq.score_sets(model, tok, sets, cfg.evaluate, cfg.seed, progress=lambda d, n, r: progress.append((d, n)))
    out, per_set = res["metrics"], res["sets"]
    assert set(out) == {"mcq_acc", "mcq_acc_norm", "mcq_acc_bytes", "mcq_acc_paper"}
    assert per_set["set"]["n"] == 7 and per_set["generated:builtin:licenses"]["n"] == 12
    micro = (per_set["set"]["acc"] * 7 + per_set["generated:builtin:licenses"]["acc"] * 12) / 19
    assert out["mcq_acc"] == pytest.approx(micro)
    assert progress[-1] == (19, 19) and res["protocol"]["items"] == 19


def test_pipeline_records_mcq_for_base_and_pruned(tmp_path):
    import ft_case
    from engine.run import pipeline

    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "corpus.jsonl", "w") as f:
        for d in _prose(n_docs=12):
            f.write(json.dumps({"text": d}) + "\n")
    q = tmp_path / "econ.json"
    q.write_text(json.dumps({"context": "Licence Test:", "questions": {
        f"The licence number {i} grants": {"choices": ["permission to copy", "a red apple", "nothing"], "answer": 0}
        for i in range(5)}}))
    cfg = ft_case.config(tmp_path, "llama", finetune={"enabled": False}, calibrate={"max_tokens": 1024},
                         evaluate={"max_tokens": 512, "mcq_generate": 8, "mcq_files": [str(q)]})
    sess = ft_case.session(tmp_path, "mcq", cfg)
    results = pipeline.run(sess)
    for label in ("base", "pruned"):
        m = results["models"][label]
        assert 0.0 <= m["mcq_acc"] <= 1.0 and set(m["mcq"]) == {"econ", "generated:" + cfg.data.source}
        assert m["mcq"]["econ"]["protocol"]["context"] == "Licence Test:"
        assert m["mcq_protocol"]["items"] == 13
    metrics = {(e["model"], e["name"]) for e in ft_case.events(sess) if e["type"] == "metric"}
    assert {("base", "mcq_acc_paper"), ("pruned", "mcq_acc_norm")} <= metrics
    # base and pruned were asked the same generated questions
    assert results["models"]["base"]["mcq"] and evaluate.comparable(
        results["models"]["base"]["mcq_protocol"], results["models"]["pruned"]["mcq_protocol"]) == []
