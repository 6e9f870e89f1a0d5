"""Perplexity and bits per byte against plain Hugging Face reference computations."""

from __future__ import annotations

import math

import pytest
import torch

from engine.evaluate import perplexity as evaluate
from engine.errors import MinigptError
import tiny


@pytest.fixture(scope="module")
def model():
    return tiny.model("llama")


@pytest.fixture(scope="module")
def ids():
    tok = tiny.tokenizer()
    return torch.tensor(tok(tiny.TEXT[:1500])["input_ids"], dtype=torch.long)


def _hf_blocks(model, ids, block):
    """Plain HF: each non-overlapping block scored by `labels=input_ids`."""
    losses = []
    with torch.no_grad():
        for i in range(ids.numel() // block):
            x = ids[i * block:(i + 1) * block][None]
            losses.append(float(model(input_ids=x, labels=x).loss))
    return math.exp(sum(losses) / len(losses))


def _hf_doc_sliding(model, ids, max_length, stride, exact=False):
    """The loop from HF's "Perplexity of fixed-length models" guide, verbatim.

    exact=True counts the scored tokens exactly (the guide subtracts one label per
    window, which is right only for the first window)."""
    seq_len = ids.numel()
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    with torch.no_grad():
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc
            input_ids = ids[begin_loc:end_loc][None]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            loss = model(input_ids, labels=target_ids).loss
            num_valid = int((target_ids != -100).sum())
            n = int((target_ids[:, 1:] != -100).sum()) if exact else num_valid - 1
            nll_sum += float(loss) * n
            n_tokens += n
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
    return math.exp(nll_sum / n_tokens)


def test_blocks_match_plain_hf(model, ids):
    ours = evaluate.perplexity(model, ids, block_size=64, stride=0, batch_size=3)
    ref = _hf_blocks(model, ids, 64)
    assert ours["ppl"] == pytest.approx(ref, rel=1e-5)
    assert ours["tokens"] == (ids.numel() // 64) * 63
    assert ours["protocol"] == {"metric": "ppl", "block_size": 64, "stride": 0, "tokens": ours["tokens"],
                                "windows": ids.numel() // 64}


@pytest.mark.parametrize("stride", [16, 40, 64])
def test_sliding_window_matches_hf_guide(model, ids, stride):
    ours = evaluate.perplexity(model, ids, block_size=64, stride=stride, batch_size=4)
    exact = _hf_doc_sliding(model, ids, 64, stride, exact=True)
    guide = _hf_doc_sliding(model, ids, 64, stride)
    assert ours["ppl"] == pytest.approx(exact, rel=1e-5)
    assert ours["ppl"] == pytest.approx(guide, rel=1e-3)  # the guide's off-by-one weighting
    if stride < 64:  # a stride of a whole block leaves each window's first token unscored, as in the guide
        assert ours["tokens"] == ids.numel() - 1


def test_sliding_window_context_helps(model, ids):
    # a model that attends must score differently with more context: windows really slide
    a = evaluate.perplexity(model, ids, block_size=64, stride=16)["nll"]
    b = evaluate.perplexity(model, ids, block_size=64, stride=64)["nll"]
    assert a != pytest.approx(b, rel=1e-6)


def test_batching_does_not_change_scores(model, ids):
    one = evaluate.perplexity(model, ids, 48, 20, batch_size=1)
    many = evaluate.perplexity(model, ids, 48, 20, batch_size=5)
    assert one["nll"] == pytest.approx(many["nll"], rel=1e-5)


@pytest.mark.parametrize("n,block,stride", [(100, 10, 0), (101, 10, 3), (57, 8, 8), (9, 9, 0), (300, 64, 17)])
def test_cover_windows_score_every_token_once(n, block, stride):
    hits = [0] * n
    for s, e, first in evaluate._windows(n, block, stride, cover=True):
        assert e - s <= block and first >= 1
        for p in range(s + first, e):
            hits[p] += 1
    assert hits == [0] + [1] * (n - 1)


def test_bad_protocols_fail_clearly(model, ids):
    with pytest.raises(MinigptError, match="stride"):
        evaluate.perplexity(model, ids, 32, stride=40)
    with pytest.raises(MinigptError, match="fewer than one block"):
        evaluate.perplexity(model, ids[:10], 32)


def test_bits_per_byte_equals_per_document_reference(model):
    tok = tiny.tokenizer()
    texts = ["The licence grants permission to copy.", "A class defines methods and attributes; é ü.",
             "Permission is hereby granted, free of charge."]
    ours = evaluate.bits_per_byte(model, tok, texts, block_size=128)
    nll, n_tok = 0.0, 0
    with torch.no_grad():
        for t in texts:
            x = torch.tensor([[tok.eos_token_id] + tok(t, add_special_tokens=False)["input_ids"]])
            n = x.shape[1] - 1
            nll += float(model(input_ids=x, labels=x).loss) * n
            n_tok += n
    n_bytes = sum(len(t.encode()) for t in texts)
    assert n_bytes > sum(len(t) for t in texts)  # non-ASCII: bytes, not characters
    assert ours["bytes"] == n_bytes and ours["tokens"] == n_tok
    assert ours["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert ours["nll_bits"] == pytest.approx(nll / math.log(2), rel=1e-5)


def test_bits_per_byte_scores_every_token_with_small_blocks(model):
    tok = tiny.tokenizer()
    texts = [tiny.TEXT[:400], tiny.TEXT[400:900]]
    n_tok = sum(len(r) for r in tok(texts, add_special_tokens=False)["input_ids"])
    for stride in (0, 7):
        r = evaluate.bits_per_byte(model, tok, texts, block_size=16, stride=stride, batch_size=3)
        assert r["tokens"] == n_tok
        assert r["protocol"] == {"metric": "bpb", "block_size": 16, "stride": stride, "documents": 2,
                                 "bytes": 900}
    # more context per token (sliding) gives a different total than 1-token-overlap blocks
    a = evaluate.bits_per_byte(model, tok, texts, block_size=16)["bpb"]
    b = evaluate.bits_per_byte(model, tok, texts, block_size=16, stride=4)["bpb"]
    assert a != pytest.approx(b, rel=1e-6)


def test_comparable_lists_differences():
    a = {"metric": "ppl", "block_size": 512, "stride": 0, "tokens": 1000, "windows": 2}
    assert evaluate.comparable(a, dict(a)) == []
    assert evaluate.comparable(a, {**a, "windows": 9}) == []  # derived, not a protocol choice
    diff = evaluate.comparable(a, {**a, "block_size": 1024, "stride": 256})
    assert diff == ["block_size: 512 vs 1024", "stride: 0 vs 256"]
    assert evaluate.comparable(a, {k: v for k, v in a.items() if k != "stride"}) == ["stride: 0 vs (unset)"]
    assert evaluate.comparable(a, None) == ["a protocol is missing"]
    assert evaluate.comparable({**a, "metric": "bpb"}, a)[0] == "metric: bpb vs ppl"
