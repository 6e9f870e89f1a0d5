"""Our MCQ scores equal lm-evaluation-harness's on the same local task, items and model folder."""

from __future__ import annotations

import json
import random

import pytest

import tiny
from engine.evaluate import mcq

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra")

WORDS = ("licence software permission copy modify distribute function value class method attribute "
         "grant free charge person obtaining warranty notice condition source binary form café naïve façade über año crème brûlée").split()


def _items(n=24, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize()
        if i % 5 == 0:
            q += " "  # trailing space: lm-eval moves it into the continuation
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) for _ in range(rng.choice((2, 4, 5)))]
        out.append({"question": q, "choices": choices, "answer": rng.randrange(len(choices))})
    return out


TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
{extra}metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    folder = tiny.save("llama", root / "model")
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _items()), encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    variants = {
        "mg_question": ("Question: {{question}}\\nAnswer:", ""),
        "mg_completion": ("{{question}}", ""),
        "mg_context": ("Question: {{question}}\\nAnswer:", 'description: "Licence Test:\\n\\n"\n'),
    }
    for name, (text, extra) in variants.items():
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=data, text=text, extra=extra))
    return folder, data, tasks


def _lm_eval(folder, tasks, names, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(folder), batch_size=4, device="cpu", dtype="float32")
    return simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks)),
                           log_samples=True, num_fewshot=0)


def test_acc_and_acc_norm_equal_lm_eval(setup, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, data, tasks = setup
    names = ["mg_question", "mg_completion", "mg_context"]
    ref = _lm_eval(folder, tasks, names, monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    questions = mcq.load(str(data))
    assert len(questions.items) >= 20
    ours = {
        "mg_question": mcq.score(model, tok, questions, rules=("acc", "acc_norm", "acc_bytes"), batch_size=3),
        "mg_completion": mcq.score(model, tok, questions, template="{question}",
                                   rules=("acc", "acc_norm", "acc_bytes"), batch_size=5),
        "mg_context": mcq.score(model, tok, questions, context="Licence Test:",
                                rules=("acc", "acc_norm", "acc_bytes")),
    }
    for name in names:
        theirs = ref["results"][name]
        samples = sorted(ref["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == ours[name]["n"] == len(questions.items)
        worst = 0.0
        for s, rec in zip(samples, ours[name]["items"]):
            lls = [float(r[0]) for r in s["filtered_resps"]]
            assert len(lls) == len(rec["lls"])
            worst = max(worst, max(abs(a - b) for a, b in zip(lls, rec["lls"])))
        assert worst < 1e-4, f"{name}: per-choice log-likelihoods differ by {worst}"
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert ours[name][metric] == pytest.approx(theirs[f"{metric},none"], abs=1e-12), (name, metric)
    # the context line and the prompt really change the scores (the comparison is not vacuous)
    assert ours["mg_question"]["items"][0]["lls"] != ours["mg_context"]["items"][0]["lls"]
    assert ours["mg_question"]["items"][0]["lls"] != ours["mg_completion"]["items"][0]["lls"]
