"""Multiple-choice questions: load sets, generate them from held-out text, score them.

Scoring follows lm-evaluation-harness (0.4.x) exactly, so our numbers can be set beside
published ones:

* a choice is the continuation `" " + choice` of the prompt, split from it like
  lm-eval's `_encode_pair` (whole string tokenized, then cut at the prompt's length;
  trailing prompt spaces move into the continuation; the tokenizer's own special
  tokens, as HFLM's default);
* `acc`: argmax of the summed log-likelihood; `acc_norm`: of log-likelihood per
  character of the choice (lm-eval divides by `len(choice)`, i.e. characters, though
  its docs say bytes); `acc_bytes`: per UTF-8 byte (lm-eval's `acc_bytes`).

The paper's rule (`acc_paper`): the answer is the choice with the lowest perplexity of
the plain string `question + " " + choice` (no context line, no prompt). The paper's code
divides that perplexity by the sequence length as well; we do not copy that slip.

Speed: the choices of a question share their prompt, so a question runs as one packed
row, the prompt once and then every choice's tokens, with a tree-shaped attention mask
and explicit positions (the same result as running the prompt once and reusing its KV
cache for each choice), several questions per batch; the LM head runs only where a
log-probability is wanted.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.errors import MinigptError
from engine.evaluate.perplexity import decoder_and_head, head_nll
from engine.models import adapters as adapters_mod

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
RULES = ("acc", "acc_norm", "acc_bytes", "acc_paper")
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
COMPLETION_TEMPLATE = "{question}"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
DEFAULT_COLUMNS = {"question": "question", "choices": "choices", "answer": "answer"}


@dataclass(frozen=True)
class Item:
    question: str
    choices: tuple
    answer: int  # 0-based


@dataclass
class MCQSet:
    name: str
    items: list
    context: str = ""  # a line set before every prompt, e.g. "Economics Test:"
    kind: str = "question"  # "question": Question/Answer prompt | "completion": a sentence's beginning
    source: str = ""
    meta: dict = field(default_factory=dict)


# ---- loading -----------------------------------------------------------------------------
def load(spec: str, columns: list[str] | None = None) -> MCQSet:
    """A question set from a file or URL (.jsonl, .csv/.tsv, the paper's .json) or `hub:ID[:CONFIG[:SPLIT]]`."""
    from engine.data import download

    spec = str(spec).strip()
    if spec.startswith("hub:"):
        return _from_hub(spec, columns)
    path = download.resolve(spec, setting="evaluate.mcq_files")
    if not path.is_file():
        raise MinigptError(f"MCQ file {spec} not found",
                           "give a .jsonl, .csv or .json file, or hub:ID[:CONFIG[:SPLIT]] for a hub dataset")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            mcq = _from_jsonl(path)
        elif suffix in (".csv", ".tsv"):
            mcq = _from_csv(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".json":
            mcq = _from_json(path)
        else:
            raise MinigptError(f"MCQ file {path.name} has an unknown type", "use .jsonl, .csv, .tsv or .json")
    except UnicodeDecodeError:
        raise MinigptError(f"MCQ file {path} is not UTF-8 text", "save it as UTF-8") from None
    if not mcq.items:
        raise MinigptError(f"MCQ file {path} holds no questions", "add at least one question")
    return mcq


def _answer_index(value, choices, where: str) -> int:
    """An int (0-based), a letter (A = first), or the text of the right choice."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        idx = value
    elif isinstance(value, str) and value.strip():
        v = value.strip()
        if len(v) == 1 and v.upper() in LETTERS:
            idx = LETTERS.index(v.upper())
        elif v in choices:
            idx = list(choices).index(v)
        elif v.isdigit():
            raise MinigptError(f"{where}: answer {v!r} is ambiguous (0- or 1-based?)",
                               "write it as a letter (A = first choice) or a JSON integer (0 = first)")
        else:
            raise MinigptError(f"{where}: answer {v!r} is neither a letter nor one of the choices",
                               "use a letter (A, B, ...) or a 0-based integer")
    else:
        raise MinigptError(f"{where}: missing or invalid answer {value!r}",
                           "give the answer as a 0-based integer or a letter")
    if not 0 <= idx < len(choices):
        raise MinigptError(f"{where}: answer {value!r} is outside the {len(choices)} choices",
                           "answers are 0-based integers or letters A..")
    return idx


def _item(question, choices, answer, where: str) -> Item:
    if not isinstance(question, str) or not question.strip():
        raise MinigptError(f"{where}: the question is missing or empty", "give each item a non-empty question")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise MinigptError(f"{where}: needs a list of at least 2 choices", 'write "choices": ["...", "..."]')
    if not all(isinstance(c, str) for c in choices):
        raise MinigptError(f"{where}: every choice must be a string", "quote numbers as text")
    return Item(question, tuple(choices), _answer_index(answer, choices, where))


def _from_jsonl(path: Path) -> MCQSet:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MinigptError(f"{where} is not valid JSON ({e.msg})", "one JSON object per line") from None
        if not isinstance(row, dict):
            raise MinigptError(f"{where} is not a JSON object", 'write {"question": ..., "choices": [...], "answer": 0}')
        items.append(_item(row.get("question"), row.get("choices"), row.get("answer"), where))
    return MCQSet(path.stem, items, source=str(path))


def _from_csv(path: Path, delimiter: str) -> MCQSet:
    """MMLU's layout: question, the choices, the answer letter; with or without a header row."""
    rows = [r for r in csv.reader(path.read_text(encoding="utf-8").splitlines(), delimiter=delimiter) if r]
    if rows and not (rows[0][-1].strip().upper() in LETTERS and len(rows[0][-1].strip()) == 1):
        rows = rows[1:]  # a header: its last cell is not an answer letter
    items = []
    for n, r in enumerate(rows, 1):
        where = f"{path.name} row {n}"
        if len(r) < 4:
            raise MinigptError(f"{where} has {len(r)} columns", "write: question, choice A, choice B, ..., answer letter")
        items.append(_item(r[0], r[1:-1], r[-1], where))
    return MCQSet(path.stem, items, source=str(path))


def _from_json(path: Path) -> MCQSet:
    """The paper's form: {"context": str, "questions": {question: {"choices": [...], "answer": int}}}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MinigptError(f"{path.name} is not valid JSON ({e.msg} at line {e.lineno})", "fix the JSON") from None
    if isinstance(data, list):
        items = [_item(r.get("question"), r.get("choices"), r.get("answer"), f"{path.name} item {i}")
                 if isinstance(r, dict) else _item(None, None, None, f"{path.name} item {i}")
                 for i, r in enumerate(data, 1)]
        return MCQSet(path.stem, items, source=str(path))
    if not isinstance(data, dict) or not isinstance(data.get("questions"), dict):
        raise MinigptError(f"{path.name} is not a question set",
                           'use {"context": "...", "questions": {"question": {"choices": [...], "answer": 0}}}')
    context = data.get("context") or ""
    if not isinstance(context, str):
        raise MinigptError(f"{path.name}: context must be a string", 'write "context": "Economics Test:"')
    items = []
    for i, (q, spec) in enumerate(data["questions"].items(), 1):
        spec = spec if isinstance(spec, dict) else {}
        items.append(_item(q, spec.get("choices"), spec.get("answer"), f"{path.name} question {i}"))
    return MCQSet(path.stem, items, context=context, source=str(path))


def parse_columns(columns: list[str] | None) -> dict:
    """["question=q", "choices=A,B,C,D", "answer=label"] → mapping onto our three fields."""
    out = dict(DEFAULT_COLUMNS)
    for entry in columns or []:
        key, sep, value = str(entry).partition("=")
        key = key.strip()
        if not sep or key not in out or not value.strip():
            raise MinigptError(f"MCQ column mapping {entry!r} is not valid",
                               "write question=COL, choices=COL (or COL1,COL2,..; a.b for nested), answer=COL")
        out[key] = value.strip()
    return out


def _field(row: dict, path: str):
    v = row
    for part in path.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def _from_hub(spec: str, columns: list[str] | None) -> MCQSet:
    """hub:ID[:CONFIG[:SPLIT]] (split defaults to test), e.g. hub:cais/mmlu:anatomy."""
    parts = spec[4:].split(":")
    ds_id, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    cols = parse_columns(columns)
    try:
        import datasets

        ds = datasets.load_dataset(ds_id, config, split=split)
    except Exception as e:  # datasets raises many types (not found, offline, bad config)
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise MinigptError(f"cannot load MCQ dataset {ds_id!r} ({config or 'default'}, {split}): {msg}",
                           "check the hub id, subset and split (hub:ID:CONFIG:SPLIT), or download it") from None
    names = set(ds.column_names)
    choice_cols = [c.strip() for c in cols["choices"].split(",")]
    for c in [cols["question"], cols["answer"], *choice_cols]:
        if c.split(".")[0] not in names:
            raise MinigptError(f"MCQ dataset {ds_id} has no column {c!r}",
                               f"map the columns with evaluate.mcq_columns; columns are: {', '.join(sorted(names))}")
    items = []
    for i, row in enumerate(ds):
        where = f"{ds_id} row {i}"
        choices = [_field(row, c) for c in choice_cols]
        if len(choice_cols) == 1:
            choices = choices[0]
        items.append(_item(_field(row, cols["question"]), choices, _field(row, cols["answer"]), where))
    name = ds_id.rstrip("/").split("/")[-1] + (f"-{config}" if config else "")
    return MCQSet(name, items, source=spec)


# ---- generation --------------------------------------------------------------------------
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z])")
_WORDY = re.compile(r"[A-Za-z]")


def sentences(text: str) -> list[str]:
    """Prose sentences of a document: paragraphs re-flowed, then split at . ! ? before a capital."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if para:
            out += [s.strip() for s in _SENT_END.split(para) if s.strip()]
    return out


def _is_prose(s: str, min_words: int, max_words: int) -> bool:
    words = s.split()
    if not (min_words <= len(words) <= max_words) or ">>>" in s or "://" in s:
        return False
    letters = len(_WORDY.findall(s))
    return letters >= 0.7 * len(s.replace(" ", "")) and s[-1] in ".!?"


def generate(texts: list[str], n: int, seed: int = 0, n_choices: int = 4, name: str = "generated",
             min_words: int = 8, max_words: int = 40) -> MCQSet:
    """Sentence-completion questions from held-out text (the paper's Skyrim/translation method).

    A prose sentence is cut at a seeded point (40-60% of its words): the beginning is the
    question, the rest the true ending. The distractors are endings of other sentences,
    distinct from it and from each other, drawn (seeded) among the endings closest in
    length, so that a length prior alone cannot pick the answer.
    """
    if n_choices < 2:
        raise MinigptError(f"MCQ generation needs at least 2 choices, not {n_choices}", "set evaluate.mcq_choices = 4")
    rng = random.Random(seed)
    seen, pool = set(), []
    for doc in texts:
        for s in sentences(doc):
            key = " ".join(s.lower().split())
            if key in seen or not _is_prose(s, min_words, max_words):
                continue
            seen.add(key)
            words = s.split()
            cut = rng.randint(max(3, round(0.4 * len(words))), min(len(words) - 3, round(0.6 * len(words))))
            pool.append((" ".join(words[:cut]), " ".join(words[cut:])))
    endings = sorted({e for _, e in pool}, key=lambda e: (len(e.split()), e))
    if len(pool) < 1 or len(endings) < n_choices:
        raise MinigptError(f"the held-out text has {len(pool)} usable sentences, too few for {n_choices}-choice questions",
                           "use more held-out text (data.evaluate_fraction) or fewer choices")
    order = list(range(len(pool)))
    rng.shuffle(order)
    items = []
    for i in order[:n]:
        question, ending = pool[i]
        L = len(ending.split())
        others = [e for e in endings if e.lower() != ending.lower()]
        others = rng.sample(others, len(others))  # random order among equal lengths (stable sort next)
        others.sort(key=lambda e: abs(len(e.split()) - L))
        near = others[: max(4 * (n_choices - 1), 12)]
        picked, keys = [], {ending.lower()}
        for e in rng.sample(near, len(near)):
            if e.lower() not in keys:
                picked.append(e)
                keys.add(e.lower())
            if len(picked) == n_choices - 1:
                break
        if len(picked) < n_choices - 1:
            continue
        pos = rng.randrange(n_choices)
        choices = picked[:pos] + [ending] + picked[pos:]
        items.append(Item(question, tuple(choices), pos))
    return MCQSet(name, items, kind="completion", source=f"generated(seed={seed})",
                  meta={"seed": seed, "sentences": len(pool), "n_choices": n_choices})


# ---- scoring -----------------------------------------------------------------------------
def _prefix_token_id(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _encode(tok, text: str) -> list[int]:
    """lm-eval HFLM.tok_encode: the tokenizer's default special tokens, none if text starts with BOS."""
    bos = _prefix_token_id(tok)
    add = not (bos is not None and text.startswith(tok.decode(bos)))
    return list(tok.encode(text, add_special_tokens=add))


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into token lists, empty context included."""
    if context == "":
        cont = list(tok.encode(continuation, add_special_tokens=False))
        bos = _prefix_token_id(tok)
        return ([bos], cont) if bos != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tok, context + continuation)
    ctx = _encode(tok, context)
    return ctx, whole[len(ctx):]


def prompt(mcq: MCQSet, item_index: int, fewshot: int = 0, context: str | None = None,
           template: str | None = None, seed: int = 0) -> str:
    """The context line, the few-shot examples (seeded, never the item itself), the prompt."""
    tmpl = template or (COMPLETION_TEMPLATE if mcq.kind == "completion" else QUESTION_TEMPLATE)
    line = mcq.context if context is None else context
    parts = [line + FEWSHOT_DELIMITER] if line else []
    if fewshot:
        rng = random.Random(seed * 1_000_003 + item_index)
        others = [j for j in range(len(mcq.items)) if j != item_index]
        for j in rng.sample(others, min(fewshot, len(others))):
            ex = mcq.items[j]
            parts.append(tmpl.format(question=ex.question) + TARGET_DELIMITER + ex.choices[ex.answer]
                         + FEWSHOT_DELIMITER)
    parts.append(tmpl.format(question=mcq.items[item_index].question))
    return "".join(parts)


def _model_max_length(model) -> int:
    from engine.models.adapters import model_context

    return model_context(model)


def score(model, tokenizer, mcq: MCQSet, fewshot: int = 0, context: str | None = None,
          template: str | None = None, rules=RULES, batch_size: int = 8, seed: int = 0,
          progress=None, dist=None) -> dict:
    """Accuracy of `model` on a question set under each rule, with standard errors and protocol.
    `dist` (an `engine.distributed.Dist`): each rank scores items rank, rank + world, ... and
    the per-item records are gathered, so every rank returns the whole result.

    Returns {"acc": .., "acc_norm": .., "acc_bytes": .., "acc_paper": .., "stderr": {rule: ..},
    "n": items, "items": [{"lls": [...], "paper_ppl": [...], "pred": {rule: i}, "answer": i}],
    "protocol": {...}}; only the requested rules are computed.
    """
    rules = tuple(rules)
    unknown = [r for r in rules if r not in RULES]
    if unknown or not rules:
        raise MinigptError(f"unknown MCQ scoring rule {unknown[0] if unknown else '(none)'}",
                           f"use some of: {', '.join(RULES)}")
    items = mcq.items
    if not items:
        raise MinigptError(f"MCQ set {mcq.name} has no questions", "give a set with at least one question")
    max_len = _model_max_length(model)
    want_ll = any(r != "acc_paper" for r in rules)
    want_paper = "acc_paper" in rules
    groups, plans = [], []
    for i, item in enumerate(items):
        seq_list, lo, reqs = _requests(tokenizer, mcq, i, item, max_len, want_ll, want_paper,
                                       (fewshot, context, template, seed))
        plans.append(reqs)
        groups.append((seq_list, lo))
    t0 = time.perf_counter()

    def on_batch(done):
        if progress:
            dt = time.perf_counter() - t0
            progress(done, len(items), done / dt if dt else 0.0)

    mine = dist.shard(range(len(items))) if dist is not None and dist.on else list(range(len(items)))
    logprobs = token_logprobs(model, [groups[i] for i in mine], batch_size, on_batch)
    recs = [(i, _predict(items[i], plans[i], lps, groups[i][1], rules)) for i, lps in zip(mine, logprobs)]
    if dist is not None and dist.on:  # every rank scored its share of the items: gather them, in order
        recs = sorted((x for part in dist.gather(recs) for x in part), key=lambda x: x[0])
    per_item, correct = [rec for _, rec in recs], {r: 0 for r in rules}
    for item, rec in zip(items, per_item):
        for r in rules:
            correct[r] += int(rec["pred"][r] == item.answer)
    n = len(items)
    out = {r: correct[r] / n for r in rules}
    out["stderr"] = {r: binomial_stderr(out[r], n) for r in rules}
    out["n"] = n
    out["items"] = per_item
    out["protocol"] = protocol(mcq, fewshot, context, template, rules, seed)
    return out


def _requests(tokenizer, mcq: MCQSet, i: int, item: Item, max_len: int, want_ll: bool, want_paper: bool,
              prompt_args: tuple) -> tuple[list, list, dict]:
    """One item's distinct token sequences, the first scored index of each, and per choice
    the (sequence, first scored index) the lm-eval rules and the paper's rule read."""
    fewshot, context, template, seed = prompt_args
    seqs, reqs = {}, {"ll": [], "paper": []}
    if want_ll:
        ctx = prompt(mcq, i, fewshot, context, template, seed)
        for c in item.choices:
            a, b = encode_pair(tokenizer, ctx, TARGET_DELIMITER + c)
            seq = (a + b)[-(max_len + 1):]
            reqs["ll"].append((seqs.setdefault(tuple(seq), len(seqs)), len(seq) - len(b)))
    if want_paper:
        for c in item.choices:
            seq = list(tokenizer(item.question + " " + c)["input_ids"])[-max_len:]
            reqs["paper"].append((seqs.setdefault(tuple(seq), len(seqs)), 1))
    seq_list = list(seqs)
    lo = [min([s for k, s in reqs["ll"] + reqs["paper"] if k == j]) for j in range(len(seq_list))]
    return seq_list, lo, reqs


def _predict(item: Item, reqs: dict, lps, lo: list, rules) -> dict:
    """The choice each rule picks from the sequences' token log-probabilities."""
    rec = {"answer": item.answer, "pred": {}}
    if reqs["ll"]:
        lls = [float(lps[k][s - lo[k]:].sum()) for k, s in reqs["ll"]]
        rec["lls"] = lls
        norms = {"acc": [1.0] * len(lls), "acc_norm": [float(len(c)) for c in item.choices],
                 "acc_bytes": [float(len(c.encode("utf-8"))) for c in item.choices]}
        for r in ("acc", "acc_norm", "acc_bytes"):
            if r in rules:
                rec["pred"][r] = _argmax([_div(ll, d) for ll, d in zip(lls, norms[r])])
    if reqs["paper"]:
        ppl = []
        for k, s in reqs["paper"]:
            lp = lps[k][s - lo[k]:]
            ppl.append(math.exp(-float(lp.sum()) / lp.numel()) if lp.numel() else math.inf)
        rec["paper_ppl"] = ppl
        rec["pred"]["acc_paper"] = _argmax([-p for p in ppl])
    return rec


def sets_for(e, held_out: list[str], seed: int, source: str, log=None) -> list[MCQSet]:
    """The sets `EvaluateConfig` names (files, URLs, hub ids) plus questions generated from
    the held-out documents (`e.mcq_generate` of them, named after the data source)."""
    sets = [load(f, e.mcq_columns) for f in e.mcq_files]
    if e.mcq_generate:
        gen = generate(held_out, e.mcq_generate, seed=seed, n_choices=e.mcq_choices, name=f"generated:{source}")
        if len(gen.items) < e.mcq_generate and log:
            log(f"held-out text gave {len(gen.items)} of {e.mcq_generate} generated questions", "warning")
        sets.append(gen)
    return sets


def score_sets(model, tokenizer, sets: list[MCQSet], e, seed: int, progress=None, dist=None) -> dict:
    """Score every set; `progress(done, total, rate)` counts items over all sets.

    Returns {"metrics": micro-averaged `mcq_<rule>` over all items, "sets": per-set
    accuracies, standard errors, n and protocol, "protocol": what was scored}.
    """
    total = sum(len(s.items) for s in sets)
    per_set, correct, offset = {}, {r: 0.0 for r in RULES}, 0
    for s in sets:
        def on(done, _total, rate, off=offset):
            if progress:
                progress(off + done, total, rate)

        res = score(model, tokenizer, s, fewshot=e.mcq_fewshot, context=e.mcq_context or None,
                    template=e.mcq_template or None, batch_size=e.batch_size, seed=seed, progress=on, dist=dist)
        offset += res["n"]
        per_set[s.name] = {**{r: res[r] for r in RULES}, "stderr": res["stderr"], "n": res["n"],
                           "protocol": res["protocol"]}
        for r in RULES:
            correct[r] += res[r] * res["n"]
    metrics = {f"mcq_{r}": correct[r] / total for r in RULES} if total else {}
    return {"metrics": metrics, "sets": per_set, "n": total,
            "protocol": {"metric": "mcq", "items": total, "sets": sorted(per_set), "fewshot": e.mcq_fewshot,
                         "rules": list(RULES)}}


def protocol(mcq: MCQSet, fewshot: int, context: str | None, template: str | None, rules, seed: int) -> dict:
    counts = sorted({len(it.choices) for it in mcq.items})
    tmpl = template or (COMPLETION_TEMPLATE if mcq.kind == "completion" else QUESTION_TEMPLATE)
    return {"metric": "mcq", "set": mcq.name, "source": mcq.source, "items": len(mcq.items),
            "choices": counts[0] if len(counts) == 1 else counts, "fewshot": fewshot,
            "context": mcq.context if context is None else context, "template": tmpl,
            "target_delimiter": TARGET_DELIMITER, "rules": list(rules), "seed": seed,
            "scoring": "lm-eval loglikelihood (acc sum, acc_norm per char, acc_bytes per byte); "
                       "acc_paper: min ppl of question + ' ' + choice"}


def _div(ll: float, d: float) -> float:
    return ll / d if d else (-math.inf if ll < 0 else math.inf)


def _argmax(values: list[float]) -> int:
    """First index of the maximum (numpy's tie rule, as lm-eval uses)."""
    best = 0
    for j, v in enumerate(values):
        if v > values[best]:
            best = j
    return best


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


# ---- the shared-prefix forward -----------------------------------------------------------
def _lcp(seqs: list[tuple]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


@dataclass
class _Row:
    """One question packed into one row: the shared prefix once, then each choice's tail.

    Each tail attends to the prefix and to itself only, at the positions it would have
    after the prefix: a tree-shaped attention mask, equivalent to running the prefix
    once and reusing its KV cache for every choice, in one forward pass and without
    padding the choices to a common length.
    """

    group: int
    seqs: list  # indices into the group's sequences
    P: int  # shared prefix length
    tails: list  # (start offset in the row, length) per sequence

    @property
    def length(self) -> int:
        return self.P + sum(n for _, n in self.tails)


def _packs(seqs: list[tuple]) -> list[tuple[list[int], int]]:
    """Split one question's sequences into rows that share a prefix, fewest tokens first:
    (sequence indices, shared prefix length) per row.

    The choices of one rule share the prompt; the paper's rule scores question + choice
    without the few-shot prompt, so its sequences share another prefix. In lexicographic
    order sequences with a common prefix are adjacent; each joins the current row when
    that costs fewer tokens than starting a new one. A prefix never covers a sequence's
    last token (only ever a target).
    """
    order = sorted(range(len(seqs)), key=lambda j: seqs[j])
    packs, cur = [], [order[0]]
    p = cost = len(seqs[order[0]]) - 1  # shared prefix length, tokens the row runs
    for j in order[1:]:
        q = min(p, _lcp([seqs[cur[0]], seqs[j]]), len(seqs[j]) - 1)
        merged = q + sum(len(seqs[k]) - 1 - q for k in cur + [j])
        if q >= 1 and merged <= cost + len(seqs[j]) - 1:
            cur, p, cost = cur + [j], q, merged
        else:
            packs.append((cur, p))
            cur, p, cost = [j], len(seqs[j]) - 1, len(seqs[j]) - 1
    packs.append((cur, p))
    return packs


def _rows(groups, share: bool) -> list[_Row]:
    rows = []
    for g, (seqs, _) in enumerate(groups):
        packs = _packs(seqs) if share else [([j], len(seqs[j]) - 1) for j in range(len(seqs))]
        for js, p in packs:
            tails, off = [], p
            for j in js:
                n = len(seqs[j]) - 1 - p
                tails.append((off, n))
                off += n
            rows.append(_Row(g, js, p, tails))
    return rows


@torch.no_grad()
def token_logprobs(model, groups: list[tuple[list[tuple], list[int]]], batch_size: int = 8,
                   on_batch=None, max_batch_tokens: int = 4096, share: bool | None = None) -> list[list[torch.Tensor]]:
    """log p(token_i | tokens_<i) for i in [lo, len) of every sequence of every group.

    A group is one question's sequences (one per choice and rule) with, per sequence, the
    first position whose log-probability is wanted (>= 1). A group runs as one packed
    row (`_Row`): its common prefix is computed once for all its sequences. Rows are
    sorted by length and batched (up to `batch_size` rows and about `max_batch_tokens`
    tokens); the LM head runs only on the positions whose log-probabilities are wanted.
    """
    device = next(model.parameters()).device
    if share is None:  # tree masks need a custom 4D mask: sdpa or eager attention, not flash
        share = getattr(model.config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
    rows = sorted(_rows(groups, share), key=lambda r: -r.length)
    result = [[torch.zeros(0, dtype=torch.float64)] * len(seqs) for seqs, _ in groups]
    remaining = [0] * len(groups)
    for r in rows:
        remaining[r.group] += 1
    done, i = 0, 0
    while i < len(rows):
        batch = [rows[i]]
        i += 1
        while i < len(rows) and len(batch) < max(1, batch_size) and (len(batch) + 1) * batch[0].length <= max_batch_tokens:
            batch.append(rows[i])
            i += 1
        _run_rows(model, groups, batch, result, device, share)
        for r in batch:
            remaining[r.group] -= 1
            done += remaining[r.group] == 0
        if on_batch:
            on_batch(done)
    return result


def _run_rows(model, groups, batch: list[_Row], result, device, share: bool) -> None:
    B, L = len(batch), max(1, max(r.length for r in batch))
    x = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    allowed = torch.zeros(B, L, L, dtype=torch.bool)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for b, r in enumerate(batch):
        seqs = groups[r.group][0]
        x[b, :r.P] = torch.tensor(seqs[r.seqs[0]][:r.P])
        pos[b, :r.P] = torch.arange(r.P)
        allowed[b, :r.P, :r.P] = causal[:r.P, :r.P]
        for j, (off, n) in zip(r.seqs, r.tails):
            if n:
                x[b, off:off + n] = torch.tensor(seqs[j][r.P:r.P + n])
                pos[b, off:off + n] = torch.arange(r.P, r.P + n)
                allowed[b, off:off + n, :r.P] = True
                allowed[b, off:off + n, off:off + n] = causal[:n, :n]
        tail = torch.arange(r.length, L)  # padding attends to itself only: no empty softmax rows
        allowed[b, tail, tail] = True
    if share:  # the adapter builds it: a family may want one per layer type (Gemma's sliding windows)
        mask = adapters_mod.for_model(model).tree_mask(allowed, pos)
    else:  # one sequence per row: a plain causal model call with a padding mask
        mask = (torch.arange(L)[None] < torch.tensor([r.length for r in batch])[:, None]).long()
    # which (row, position, next token) each wanted log-probability needs
    rr, pp, tt, spans = [], [], [], []
    for b, r in enumerate(batch):
        seqs, lo = groups[r.group]
        for j, (off, n) in zip(r.seqs, r.tails):
            seq, first = seqs[j], lo[j]
            want = range(first, len(seq))  # token t is predicted at position t-1
            rr += [b] * len(want)
            pp += [t - 1 if t - 1 < r.P else off + (t - 1 - r.P) for t in want]
            tt += [seq[t] for t in want]
            spans.append((r.group, j, len(want)))
    dec, head = decoder_and_head(model)
    mask = {k: v.to(device) for k, v in mask.items()} if isinstance(mask, dict) else mask.to(device)
    kw = dict(input_ids=x.to(device), attention_mask=mask, position_ids=pos.to(device), use_cache=False)
    rr, pp, tt = (torch.tensor(v, dtype=torch.long, device=device) for v in (rr, pp, tt))
    if dec is not None:  # the LM head once per distinct (row, position, target): shared prefixes score once
        uniq, inv = torch.unique(torch.stack([rr, pp, tt], 1), dim=0, return_inverse=True)
        vals = -head_nll(head, dec(**kw).last_hidden_state[uniq[:, 0], uniq[:, 1]], uniq[:, 2])[inv]
    else:
        vals = -F.cross_entropy(model(**kw).logits[rr, pp].float(), tt, reduction="none")
    vals = vals.double().cpu()
    k = 0
    for g, j, n in spans:
        result[g][j] = vals[k:k + n]
        k += n
