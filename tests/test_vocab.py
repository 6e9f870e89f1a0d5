"""Vocabulary pruning: the rebuilt tokenizer round-trips any text, tokenizes kept-only text
exactly as before, the sliced model's log-probs are the original's renormalised over the
kept tokens, and the exported folder loads with stock transformers in a fresh process."""

import functools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from engine.prune import calibrate
from engine.models import export
from engine.prune import mlp as prune
from engine.prune import vocab
from engine.errors import MinigptError

CORPUS = tiny.TEXT + ("def main(argv):\n    for i in range(10):\n        print(f'{i}: {argv[i]}')\n    return 0\n"
                      "Le café est très bon à Paris; naïve façade. Über die Straße. ") * 5
TRAIN = CORPUS[:600]  # the "domain" text whose token counts decide what stays
TEXTS = ["plain ASCII text.", "  leading spaces and   runs\t\ttabs\n\nnewlines  ", "café naïve Über 世界 你好",
         "emoji 🎉🚀 👩\u200d💻 ", "def f(x):\n    return x ** 2  # code", "", " ", "\u00a0\u200b zero-width",
         "<|endoftext|> special literal", "Ωμέγα Ελληνικά и кириллица"]
PAD_ROWS = 16  # embedding rows past the tokenizer (like Phi's padded vocab): dropped too


# ---- the two supported tokenizer kinds, built here ---------------------------------------
@functools.lru_cache(maxsize=None)
def byte_level():
    """GPT-2 style: ByteLevel pre-tokenizer, 256-symbol alphabet, plain BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


@functools.lru_cache(maxsize=None)
def byte_fallback():
    """Llama style: BPE(byte_fallback) with <0xNN> tokens, Metaspace, a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    t0 = Tokenizer(models.BPE())  # trained per word, like SentencePiece: no merge crosses a "▁"
    t0.normalizer = normalizers.Prepend("▁")
    t0.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    t0.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=300, limit_alphabet=60))
    trained = json.loads(t0.to_str())["model"]
    vocab_ = {s: i for i, s in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab_.setdefault(t, len(vocab_))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab_, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Prepend("▁")
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.lru_cache(maxsize=None)
def byte_level_split():
    """Llama-3 / Qwen2 style: a regex Split then ByteLevel in a Sequence, ignore_merges=True."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    trained = json.loads(byte_level().backend_tokenizer.to_str())
    bpe = trained["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    tok = Tokenizer(models.BPE(vocab=bpe["vocab"], merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


KINDS = {"byte_level": byte_level, "byte_fallback": byte_fallback, "byte_level_split": byte_level_split}


def counts_for(tok, rows, text=TRAIN):
    return calibrate.token_counts(torch.tensor(tok(text, add_special_tokens=False)["input_ids"]), rows)


def pruned(kind: str, family: str = "llama", threshold: float = 0.0):
    """(original tokenizer, original model, plan, pruned tokenizer, pruned model)."""
    tok = KINDS[kind]()
    rows = len(tok) + PAD_ROWS
    orig, model = tiny.model(family, vocab=rows), tiny.model(family, vocab=rows)
    model, new_tok, info = vocab.prune_vocabulary(model, tok, counts_for(tok, rows), threshold)
    p = vocab.plan(tok, counts_for(tok, rows), threshold, orig)
    return tok, orig, p, new_tok, model, info


def fuzz_texts(n=40, seed=0):
    pools = ["abcdefghijklmnopqrstuvwxyz ", "ABCXYZ0123456789", " \t\n\r", "éèàçüöñßÅØ", "世界你好中文字",
             "🎉🚀👩\u200d💻🙂", "(){}[]<>=+-*/#:;'\"\\", "αβγδЖЯ", "\u00a0\u2009\u200b\u3000"]
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))) for _ in range(n)]


# ---- 1. round trip ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_any_text_round_trips(kind):
    tok, _, p, new, _, _ = pruned(kind)
    assert len(new) < len(tok) and len(new) == p.new_tokenizer_size
    for text in TEXTS + fuzz_texts() + [CORPUS]:
        ids = new(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < len(new) for i in ids)
        back = new.decode(ids)
        assert back == tok.decode(tok(text, add_special_tokens=False)["input_ids"])  # as the original does
        if not (kind == "byte_fallback" and "<|endoftext|>" in text):  # the Prepend normaliser: not the pruning
            assert back == text, (text, back)
    # out-of-domain text costs more tokens once its merges are gone (the pruning bites)
    ood = "".join(TEXTS)
    assert len(new(ood)["input_ids"]) > len(tok(ood)["input_ids"])


# ---- 2. kept-only text tokenizes exactly as before --------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_kept_only_text_tokenizes_as_before(kind):
    tok, _, p, new, _, _ = pruned(kind)
    o2n = p.old2new()
    old = tok(TRAIN)["input_ids"]
    assert all(i in o2n for i in old)  # every counted token is kept
    assert new(TRAIN)["input_ids"] == [o2n[i] for i in old]
    same = changed = 0
    for word in (CORPUS + " ".join(TEXTS + fuzz_texts())).split(" "):
        a = tok(word, add_special_tokens=False)["input_ids"]
        b = new(word, add_special_tokens=False)["input_ids"]
        if all(i in o2n for i in a):
            assert b == [o2n[i] for i in a], word
            same += 1
        else:
            changed += 1
    assert same > 100 and changed > 10  # both cases are exercised


def _kept_only_mismatches(tok, new, p) -> list[str]:
    """Words the original tokenizes into kept tokens only, which `new` tokenizes otherwise."""
    o2n = p.old2new()
    out = []
    for word in set((CORPUS + " ".join(TEXTS)).split(" ")):
        a = tok(word, add_special_tokens=False)["input_ids"]
        if all(i in o2n for i in a) and new(word, add_special_tokens=False)["input_ids"] != [o2n[i] for i in a]:
            out.append(word)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_kept_token_stays_producible_and_needs_the_closure(kind, monkeypatch):
    """Each kept token is still what BPE builds from its own characters. Without the
    merge-ancestor closure (control), kept-only words tokenize differently."""
    tok, orig, p, new, _, _ = pruned(kind)
    added = set(tok.added_tokens_decoder)
    for i in p.keep.tolist():
        s = tok.convert_ids_to_tokens(i)
        if i < len(tok) and i not in added and len(s) > 1:
            if [t.value for t in tok.backend_tokenizer.model.tokenize(s)] == [s]:
                assert [t.value for t in new.backend_tokenizer.model.tokenize(s)] == [s]
    assert p.reasons["ancestors"] > 0 and _kept_only_mismatches(tok, new, p) == []
    monkeypatch.setattr(vocab, "derivation", lambda token, ranks, vocab_: [])
    p_open = vocab.plan(tok, counts_for(tok, len(tok) + PAD_ROWS), 0.0, orig)
    assert p_open.reasons["ancestors"] == 0
    assert _kept_only_mismatches(tok, vocab.prune_tokenizer(tok, p_open), p_open)


@pytest.mark.parametrize("kind,cls", [("byte_level", "GPT2Tokenizer"), ("byte_fallback", "LlamaTokenizer")])
def test_tokenizer_classes_that_rebuild_themselves(kind, cls, tmp_path):
    """Hub checkpoints name classes whose __init__ rebuilds the backend from vocab + merges
    (transformers 5): the pruned tokenizer must survive that path and keep its class."""
    from transformers import AutoTokenizer

    KINDS[kind]().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": cls}))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(tok).__name__ == cls
    rows = len(tok) + PAD_ROWS
    p = vocab.plan(tok, counts_for(tok, rows), 0.0, tiny.model("llama", vocab=rows))
    new = vocab.prune_tokenizer(tok, p)
    assert type(new).__name__ == cls and len(new) == p.new_tokenizer_size < len(tok)
    o2n = p.old2new()
    assert new(TRAIN)["input_ids"] == [o2n[i] for i in tok(TRAIN)["input_ids"]]
    for text in TEXTS[:5] + fuzz_texts(10):
        assert new.decode(new(text, add_special_tokens=False)["input_ids"]) == \
            tok.decode(tok(text, add_special_tokens=False)["input_ids"])


# ---- 3. the sliced model ------------------------------------------------------------------------
CASES = [("byte_level", f) for f in tiny.FAMILIES] + [("byte_fallback", "llama"), ("byte_fallback", "phi"),
                                                   ("byte_fallback", "gemma3")]  # Gemma 3: BPE with byte fallback


@pytest.mark.parametrize("kind,family", CASES)
def test_logprobs_equal_renormalised_original(kind, family):
    tok, orig, p, new, model, info = pruned(kind, family)
    o2n = p.old2new()
    old_ids = tok(TRAIN[:300])["input_ids"]
    x_old = torch.tensor([old_ids])
    x_new = torch.tensor([[o2n[i] for i in old_ids]])
    assert x_new.tolist() == [new(TRAIN[:300])["input_ids"]]
    with torch.no_grad():
        ref = orig(x_old).logits[..., p.keep].log_softmax(-1)
        got = model(x_new).logits.log_softmax(-1)
    assert got.shape == ref.shape and got.shape[-1] == len(new) < len(tok)
    assert (ref - got).abs().max().item() <= 1e-5
    # shapes, tying, bias, saved parameters
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = orig.get_output_embeddings().weight is orig.get_input_embeddings().weight
    assert (head.weight is emb.weight) == tied
    d, removed = emb.weight.shape[1], len(tok) + PAD_ROWS - len(new)
    per_row = d * (1 if tied else 2) + (1 if head.bias is not None else 0)
    assert info["params_before"] - info["params_after"] == removed * per_row == info["params_saved"]
    assert model.config.vocab_size == emb.num_embeddings == head.out_features == len(new)
    if family == "phi":
        assert head.bias is not None and torch.equal(head.bias, orig.get_output_embeddings().bias[p.keep])
    if family == "opt":  # padding_idx follows its token
        assert emb.padding_idx == o2n[orig.get_input_embeddings().padding_idx]
    for cfg, ocfg in ((model.config, orig.config), (model.generation_config, orig.generation_config)):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            old = getattr(ocfg, name, None)
            if old is not None and old < len(tok):  # tiny gpt2's 50256 was out of range before and stays so
                assert new.convert_ids_to_tokens(getattr(cfg, name)) == tok.convert_ids_to_tokens(old)


def test_mask_mode_shares_the_keep_rule():
    """Mask mode (the paper) zeroes exactly the rows the shared rule drops, never padding rows,
    and structural pruning keeps a superset of those rows (plus what encoding needs)."""
    tok = byte_level()
    rows = len(tok) + PAD_ROWS
    m = tiny.model("phi", vocab=rows)
    counts = counts_for(tok, rows)
    masks = prune.embedding_masks(m, tok, counts, 0.0)
    rule = vocab.domain_keep(tok, counts, 0.0, m)
    for name, mask in masks.items():
        kept_rows = mask.all(1)
        assert torch.equal(kept_rows[: len(tok)], rule) and kept_rows[len(tok):].all()
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert all(rule[i] for i in special)
    assert torch.equal(rule, (counts[: len(tok)] > 0) | torch.isin(torch.arange(len(tok)), torch.tensor(sorted(special))))
    structural = set(vocab.plan(tok, counts, 0.0, m).keep.tolist())
    assert set(torch.nonzero(rule).flatten().tolist()) <= structural


# ---- 4. stock loading in a fresh process ------------------------------------------------------
FRESH = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
import torch
out = {}
for folder in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    enc = tok("Permission is granted, free of charge", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    gen = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    out[folder] = {"ids": enc["input_ids"][0].tolist(), "logits": logits[0, -1].tolist(), "vocab": len(tok),
                   "text": tok.decode(gen[0], skip_special_tokens=True), "new": gen[0, enc["input_ids"].shape[1]:].tolist(),
                   "engine": any(m.startswith(("engine", "minigpt")) for m in sys.modules)}
print(json.dumps(out))
"""


@pytest.mark.process
def test_exported_folder_loads_with_stock_transformers_in_a_fresh_process(tmp_path):
    folders, expect = [], {}
    for kind, family in (("byte_level", "llama"), ("byte_fallback", "phi")):
        _, _, _, new, model, _ = pruned(kind, family)
        folder = export.save_model(model, new, tmp_path / f"{kind}-{family}")
        folders.append(str(folder))
        enc = new("Permission is granted, free of charge", return_tensors="pt")
        with torch.no_grad():
            expect[str(folder)] = (enc["input_ids"][0].tolist(), model(**enc).logits[0, -1], len(new))
    r = subprocess.run([sys.executable, "-c", FRESH, *folders], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for folder, (ids, logits, size) in expect.items():
        g = got[folder]
        assert not g["engine"] and g["ids"] == ids and g["vocab"] == size
        assert torch.allclose(torch.tensor(g["logits"]), logits, atol=1e-5)
        assert len(g["new"]) > 0 and all(0 <= i < size for i in g["new"])
        assert g["text"].startswith("Permission is granted, free of charge")


# ---- 5. unsupported tokenizers fail clearly -----------------------------------------------------
def _fast(model, pre=None):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(model)
    if pre is not None:
        t.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


def _unsupported():
    from tokenizers import models, pre_tokenizers
    from transformers import ByT5Tokenizer

    return {"wordpiece": _fast(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]")),
            "unigram": _fast(models.Unigram([("[UNK]", 0.0), ("a", -1.0), ("b", -2.0)], 0)),
            "char-bpe": _fast(models.BPE({"[UNK]": 0, "a": 1, "b": 2, "ab": 3}, [("a", "b")], unk_token="[UNK]"),
                              pre_tokenizers.Whitespace()),
            "slow": ByT5Tokenizer()}


@pytest.mark.parametrize("name", ["wordpiece", "unigram", "char-bpe", "slow"])
def test_unsupported_tokenizers_fail_clearly(name):
    tok = _unsupported()[name]
    m = tiny.model("llama", vocab=max(len(tok), 8))
    with pytest.raises(MinigptError, match="not supported for vocabulary pruning") as e:
        vocab.prune_vocabulary(m, tok, torch.ones(len(tok), dtype=torch.long), 0.0)
    assert "embedding_threshold = -1" in e.value.fix
    assert m.get_input_embeddings().weight.shape[0] == max(len(tok), 8)  # untouched


def test_missing_counts_fail_clearly():
    with pytest.raises(MinigptError, match="token counts"):
        vocab.prune_vocabulary(tiny.model("llama"), tiny.tokenizer(), None, 0.0)


# ---- 6. the prune stage --------------------------------------------------------------------------
def test_prune_stage_reports_and_later_stages_use_the_new_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from engine import config as config_mod
    from engine.run import pipeline
    from engine.run import session

    tok = byte_level()
    folder = tmp_path / "base"
    tiny.model("llama", vocab=len(tok) + PAD_ROWS).save_pretrained(folder)
    tok.save_pretrained(folder)
    docs = tmp_path / "docs.jsonl"
    paras = tiny.TEXT.split(". ")  # English only: the code and accented tokens go
    docs.write_text("\n".join(json.dumps({"text": ". ".join(paras[i:i + 4])}) for i in range(0, len(paras), 4)))
    cfg = config_mod.from_dict({
        "model": {"source": str(folder)}, "data": {"source": str(docs)},
        "calibrate": {"block_size": 32, "max_tokens": 512},
        "prune": {"rule": "ratio", "ratio": 0.3, "embedding_threshold": 0.0},
        "evaluate": {"block_size": 32, "max_tokens": 256}})
    s = session.create(cfg, tmp_path / "sessions")
    res = pipeline.run(s)
    v = res["vocab"]
    assert v["tokenizer_before"] == len(tok) and v["rows_before"] == len(tok) + PAD_ROWS
    assert v["rows_after"] == v["tokenizer_after"] < len(tok)
    assert 0.0 < v["coverage"] <= 1.0 and v["bpb_before"] > 0 and v["bpb_after"] > 0
    assert v["params_saved"] == (v["rows_before"] - v["rows_after"]) * 32  # tied llama, hidden 32
    assert res["prune"]["params_before"] - res["prune"]["params_after"] > v["params_saved"]  # + the MLP neurons
    metrics = {(e["model"], e["name"]): e["value"] for e in s.events() if e["type"] == "metric"}
    assert metrics[("pruned", "vocab_size")] == v["rows_after"]
    assert metrics[("pruned", "vocab_coverage")] == v["coverage"]
    assert metrics[("base", "vocab_bpb")] == round(v["bpb_before"], 6)
    saved = AutoTokenizer.from_pretrained(s.model_dir)
    assert len(saved) == v["tokenizer_after"]
    assert res["models"]["pruned"]["params"] == res["prune"]["params_after"]  # evaluated the saved, new-vocab model
    assert s.status() == "done"


def tiny_gemma3_on_disk(tmp_path):
    """(tokenizer, model folder, corpus file): a tiny Gemma 3 with the byte-fallback tokenizer saved
    as a model source, and CORPUS as documents of three sentences each."""
    tok = byte_fallback()
    folder = tmp_path / "base"
    tiny.model("gemma3", vocab=len(tok) + PAD_ROWS).save_pretrained(folder)
    tok.save_pretrained(folder)
    docs = tmp_path / "docs.jsonl"
    paras = CORPUS.split(". ")
    docs.write_text("\n".join(json.dumps({"text": ". ".join(paras[i:i + 3])}) for i in range(0, len(paras), 3)))
    return tok, folder, docs


def test_the_heldout_rule_runs_in_the_prune_stage_on_gemma3(tmp_path):
    """prune.vocab_rule = "heldout" on a tiny Gemma 3: the cut is sized on held-back finetune
    documents, the candidates tried and the choice are reported, and the saved tokenizer holds it."""
    from transformers import AutoTokenizer

    from engine import config as config_mod
    from engine.run import pipeline
    from engine.run import session

    tok, folder, docs = tiny_gemma3_on_disk(tmp_path)
    cfg = config_mod.from_dict({
        "model": {"source": str(folder)}, "data": {"source": str(docs)},
        "calibrate": {"block_size": 32, "max_tokens": 512},
        "prune": {"rule": "ratio", "ratio": 0.3, "embedding_threshold": 0.0, "vocab_rule": "heldout",
                  "vocab_tolerance": 0.5, "vocab_validation_tokens": 64},
        "evaluate": {"block_size": 32, "max_tokens": 256}})
    s = session.create(cfg, tmp_path / "sessions")
    res = pipeline.run(s)
    v = res["vocab"]
    h = v["heldout"]
    assert v["rule"] == "heldout" and h["candidates"] and h["validation_documents"] >= 1
    assert h["prior_weight"] == pytest.approx(0.3)  # the model's expected counts smoothed the ranking
    assert h["chosen_rows"] == v["rows_after"] < v["rows_before"]
    tried = [c["rows"] for c in h["candidates"]]
    assert tried == sorted(tried) and h["candidates"][-1]["rows"] == v["rows_after"]
    assert h["within_tolerance"] == (h["candidates"][-1]["rise"] <= 0.5)
    assert len(AutoTokenizer.from_pretrained(s.model_dir)) == v["tokenizer_after"]
    assert s.status() == "done"


@pytest.mark.parametrize("kind", KINDS)
def test_the_ranking_without_prior_is_the_frequency_rule(kind):
    """No prior (or weight 0) ranks by domain frequency alone: its top (seen-count) ids are ε_emb = 0's set."""
    tok = KINDS[kind]()
    rows = len(tok) + PAD_ROWS
    c = counts_for(tok, rows)
    m = tiny.model("llama", vocab=rows)
    seen = int((c > 0).sum())
    eps0 = vocab.plan(tok, c, 0.0, m).keep
    assert torch.equal(vocab.ranked_plan(tok, c, seen, m, vocab.ranking(tok, c)).keep, eps0)
    q = torch.rand(rows, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(vocab.ranked_plan(tok, c, seen, m, vocab.ranking(tok, c, q, weight=0.0)).keep, eps0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_prior_ranks_unseen_tokens_the_model_expects_ahead_of_tokens_seen_once(kind):
    """score = count + weight · N · q: an unseen token whose prior share exceeds one count comes
    ahead of a token seen once; one below it does not; unseen tokens follow the model's order;
    sizes are met from below and the cut still round-trips any text."""
    tok = KINDS[kind]()
    rows = len(tok) + PAD_ROWS
    c = counts_for(tok, rows)
    m = tiny.model("llama", vocab=rows)
    plain = vocab._bpe_tokens(tok)
    unseen = [i for i in range(min(rows, plain.numel())) if plain[i] and c[i] == 0]
    k = float(c[c > 0].min())  # the rarest seen tokens' count (1 on most of these tokenizers)
    once = [i for i in range(c.numel()) if c[i] == k]
    assert len(unseen) >= 3 and once
    n, w = float(c.sum()) / k, 0.3  # in units of k counts
    q = torch.zeros(rows, dtype=torch.float64)
    hi, mid, lo = unseen[:3]
    q[hi], q[mid], q[lo] = 3.0 / (w * n), 2.0 / (w * n), 0.5 / (w * n)  # 3k, 2k and 0.5k pseudo-counts
    q[once[0]] = 0.1 / (w * n)
    q[int(c.argmax())] = 1.0 - float(q.sum())  # the rest on the most frequent token: q sums to 1
    order = vocab.ranking(tok, c, q * 1000.0, weight=w).tolist()  # any scale: the prior is normalised
    pos = {i: k for k, i in enumerate(order)}
    assert pos[hi] < pos[mid] < pos[once[0]] < pos[lo]  # 3k > 2k > k + 0.1k > 0.5k
    assert all(pos[i] < pos[lo] for i in once[1:])  # k > 0.5k
    assert all(i not in pos or pos[i] >= len(order) - (~plain).sum() for i in range(plain.numel()) if not plain[i])
    target = int(vocab.plan(tok, c, 0.0, m).keep.numel())
    p = vocab.plan_of_size(tok, c, target, m, vocab.ranking(tok, c, q, weight=w))
    assert target - 40 <= p.keep.numel() <= target
    new = vocab.prune_tokenizer(tok, p)  # still encodes and round-trips any text
    for text in TEXTS[:6]:
        assert new.decode(new(text, add_special_tokens=False)["input_ids"]) == \
            tok.decode(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_negative_prior_weight_ranks_expected_mass_as_a_cost(kind):
    """score = count − |weight| · N · q: of tokens counted equally, the one the model expects more
    (which holds more probability mass at every position) ranks later, and one whose cost exceeds
    its count falls behind an unseen token the model never expects."""
    tok = KINDS[kind]()
    rows = len(tok) + PAD_ROWS
    c = counts_for(tok, rows)
    plain = vocab._bpe_tokens(tok)
    seen = [i for i in range(min(c.numel(), plain.numel())) if c[i] > 0 and plain[i]]
    k = min(float(c[i]) for i in seen if sum(1 for j in seen if c[j] == c[i]) >= 3)  # 3 tokens counted k times
    once = [i for i in seen if c[i] == k]
    unseen = [i for i in range(min(rows, plain.numel())) if plain[i] and c[i] == 0]
    assert len(once) >= 3 and unseen
    n, w = float(c.sum()), -0.2
    q = torch.full((rows,), 1e-12, dtype=torch.float64)
    a, b, heavy = once[:3]
    q[a], q[b], q[heavy] = 0.1 * k / (-w * n), 0.5 * k / (-w * n), 2.0 * k / (-w * n)  # cost 0.1k, 0.5k, 2k
    q[int(c.argmax())] = 1.0 - float(q.sum())
    pos = {i: j for j, i in enumerate(vocab.ranking(tok, c, q, weight=w).tolist())}
    assert pos[a] < pos[b] < pos[unseen[0]] and pos[heavy] > pos[unseen[0]]  # 0.9k > 0.5k > ~0 > −k


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_expected_counts_are_the_summed_next_token_distributions(family):
    """The prior is Σ over positions of softmax(logits): the chunked-head sum equals the direct one
    (Gemma 3: its logit soft-cap included)."""
    rows = 300
    m = tiny.model(family, vocab=rows).eval()
    blocks = torch.randint(0, rows, (5, 24), generator=torch.Generator().manual_seed(1))
    got = vocab.expected_counts(m, blocks, 2, rows)
    with torch.no_grad():
        want = torch.softmax(m(input_ids=blocks).logits.double(), -1).sum((0, 1))
    assert got.dtype == torch.float64 and got.shape == (rows,)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert abs(float(got.sum()) - blocks.numel()) < 1e-3
    first = vocab.expected_counts(m, blocks, 2, rows, max_tokens=30)  # the first blocks holding 30 tokens: 2
    assert torch.allclose(first, vocab.expected_counts(m, blocks[:2], 2, rows), rtol=0, atol=0)


def test_a_special_token_past_the_embedding_rows_is_dropped():
    """Like Gemma 3's <image_soft_token> (id 262,144 beside 262,144 text rows): the model can never
    embed it, so the pruned tokenizer leaves it out instead of refusing."""
    import copy

    tok = copy.deepcopy(byte_fallback())
    rows = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    assert len(tok) == rows + 1
    m = tiny.model("llama", vocab=rows)
    p = vocab.plan(tok, counts_for(tok, rows), 0.0, m)
    assert p.reasons["special_past_rows_dropped"] == 1 and int(p.keep.max()) < rows
    new = vocab.prune_tokenizer(tok, p)
    assert "<image_soft_token>" not in new.get_vocab() and len(new) == p.keep.numel()


def test_reserved_placeholders_are_dropped_where_the_family_reserves_them(tmp_path):
    """Gemma 3's tokenizer holds 6,242 untrained `<unusedN>` special tokens: its adapter names the
    pattern, so they leave with the other unused ids (a seen one stays); a llama model, whose
    family reserves other names, keeps them as special; the cut tokenizer round-trips and the
    folder reloads with stock AutoTokenizer."""
    import copy

    from transformers import AutoTokenizer

    tok = copy.deepcopy(byte_fallback())
    base = len(tok)
    tok.add_tokens([f"<unused{i}>" for i in range(10)], special_tokens=True)  # added, flagged special, unnamed
    unused = [tok.convert_tokens_to_ids(f"<unused{i}>") for i in range(10)]
    assert len(tok) == base + 10 and min(unused) >= base
    rows = len(tok)
    c = counts_for(tok, rows)
    c[unused[3]] = 2  # the domain's text used one of them: it stays as any seen token would
    gemma, llama = tiny.model("gemma3", vocab=rows), tiny.model("llama", vocab=rows)
    named = set(tok.all_special_ids)
    pg, pl = vocab.plan(tok, c, 0.0, gemma), vocab.plan(tok, c, 0.0, llama)
    kept_g, kept_l = set(pg.keep.tolist()), set(pl.keep.tolist())
    reserved = {i for i in unused if i not in named}
    assert reserved and pg.reasons["reserved_dropped"] == len(reserved - {unused[3]})
    assert kept_g & reserved == {unused[3]} & reserved and reserved <= kept_l
    assert named & set(range(rows)) <= kept_g  # bos/eos/unk/pad and any named one stay
    new = vocab.prune_tokenizer(tok, pg)
    for text in TEXTS:
        assert new.decode(new(text, add_special_tokens=False)["input_ids"]) == \
            tok.decode(tok(text, add_special_tokens=False)["input_ids"])
    new.save_pretrained(tmp_path)
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == pg.new_tokenizer_size


def test_a_row_budget_cuts_the_ranking_in_the_prune_stage(tmp_path):
    """prune.vocab_rows: the held-out rule's ranking (prior included) cut to at most that many rows,
    with no sizing on the validation documents; the saved tokenizer holds the cut."""
    from transformers import AutoTokenizer

    from engine import config as config_mod
    from engine.run import pipeline
    from engine.run import session

    tok, folder, docs = tiny_gemma3_on_disk(tmp_path)
    rows = len(tok) - 40
    cfg = config_mod.from_dict({
        "model": {"source": str(folder)}, "data": {"source": str(docs)},
        "calibrate": {"block_size": 32, "max_tokens": 512}, "finetune": {"enabled": False},
        "prune": {"rule": "ratio", "ratio": 0.0, "embedding_threshold": 0.0, "vocab_rule": "heldout",
                  "vocab_rows": rows, "vocab_validation_tokens": 64},  # the vocabulary alone
        "evaluate": {"block_size": 32, "max_tokens": 256}})
    s = session.create(cfg, tmp_path / "sessions")
    v = pipeline.run(s)["vocab"]
    h = v["heldout"]
    assert h["rows_asked"] == rows and h["candidates"] == [] and h["prior_weight"] == pytest.approx(0.3)
    assert rows - 40 <= v["rows_after"] == h["chosen_rows"] <= rows
    assert s.results()["models"]["pruned"]["params"] < s.results()["models"]["base"]["params"]
    assert len(AutoTokenizer.from_pretrained(s.model_dir)) == v["tokenizer_after"]


def test_a_bad_vocab_rule_is_a_one_line_error():
    from engine import config as config_mod

    with pytest.raises(MinigptError, match="prune.vocab_rule"):
        config_mod.from_dict({"prune": {"vocab_rule": "magic"}})
    with pytest.raises(MinigptError, match="vocab_tolerance"):
        config_mod.from_dict({"prune": {"vocab_tolerance": 2.0}})
    with pytest.raises(MinigptError, match="vocab_rows.*heldout"):
        config_mod.from_dict({"prune": {"vocab_rows": 100}})
    with pytest.raises(MinigptError, match="vocab_prior"):
        config_mod.from_dict({"prune": {"vocab_prior": -1.5}})
    assert config_mod.from_dict({"prune": {"vocab_prior": -0.15}}).prune.vocab_prior == -0.15  # a cost


# ---- 7. SmolLM2 (slow) ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_vocabulary_pruning_is_exact_on_kept_text():
    from engine import config as config_mod
    from engine.data import domain as data
    from engine.models import load as models

    model, tok, _ = models.load(config_mod.ModelConfig())
    orig_head = model.get_output_embeddings().weight.detach().clone()
    dcfg = config_mod.DataConfig(source="builtin:licenses")
    parts = data.split_documents(data.load_documents(dcfg), dcfg)
    train = data.tokenize(tok, parts["calibrate"][:20])
    counts = calibrate.token_counts(train, model.get_input_embeddings().weight.shape[0])
    x_old = train[:128].view(1, -1)
    with torch.no_grad():
        ref = model(x_old).logits
    p = vocab.plan(tok, counts, 0.0, model)
    model, new, info = vocab.prune_vocabulary(model, tok, counts, 0.0)
    assert info["tokenizer_before"] == 49152 and 1000 < info["tokenizer_after"] < 20000
    assert info["params_saved"] == (49152 - info["rows_after"]) * 576  # tied: one 576-wide row per token
    assert torch.equal(model.get_output_embeddings().weight, orig_head[p.keep])
    o2n = p.old2new()
    x_new = torch.tensor([[o2n[i] for i in x_old[0].tolist()]])
    with torch.no_grad():
        got = model(x_new).logits.log_softmax(-1)
    assert (ref[..., p.keep].log_softmax(-1) - got).abs().max().item() <= 1e-5
    for text in TEXTS + fuzz_texts(20) + parts["evaluate"][:2]:
        assert new.decode(new(text)["input_ids"]) == text
    same = 0  # held-out words made of kept tokens only: as many as 600, wherever the split puts them
    for word in (w for doc in parts["evaluate"] for w in doc.split(" ")):  # the corpus moves with installs
        a = tok(word)["input_ids"]
        if all(i in o2n for i in a):
            assert new(word)["input_ids"] == [o2n[i] for i in a], word
            same += 1
            if same >= 600:
                break
    assert same > 500
    assert new.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


@pytest.mark.process
def test_vocab_cost_prices_the_cut_alone_on_the_sessions_own_bytes(tmp_path):
    """scripts/vocab_cost.py: the session's unpruned model with only its vocabulary cut. The ε_emb
    = 0 row is the cut the prune stage makes (the same rows and the same held-out bits per byte
    as the session's own vocab record); a row budget ranked both ways keeps at most that many rows."""
    import ft_case
    from engine.run import pipeline

    cfg = ft_case.config(tmp_path, "llama", prune={"embedding_threshold": 0.0, "ratio": 0.0},
                         finetune={"enabled": False})
    s = ft_case.session(tmp_path, "vc", cfg)
    with ft_case.single_thread():
        res = pipeline.run(s, stages=["baseline", "calibrate", "prune"])
    script = Path(__file__).resolve().parent.parent / "scripts" / "vocab_cost.py"
    out = tmp_path / "cost.json"
    r = subprocess.run([sys.executable, str(script), str(s.path), "--rows", "316", "--prior", "0.3", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    seen, freq, prior = rows
    assert seen["rows"] == res["vocab"]["rows_after"] and seen["params_removed"] == res["vocab"]["params_saved"]
    assert seen["bpb_uncut"] == pytest.approx(res["models"]["base"]["bpb"], rel=1e-5)
    assert seen["rows"] <= freq["rows"] <= 316 and prior["rows"] <= 316
    assert freq["coverage"] >= seen["coverage"] and all(x["bpb"] > 0 for x in rows)
    bad = subprocess.run([sys.executable, str(script), str(s.path), "--rows", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--rows" in bad.stderr
