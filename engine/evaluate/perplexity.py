"""Held-out evaluation: token-level perplexity, bits per byte, MCQ accuracy, and protocols.

Every number is returned with its protocol (block size, stride, items, scoring rule), and
`comparable` lists how two protocols differ, so a compare view never sets a 512-token
perplexity beside a 2048-token one without saying so.

Windows follow Hugging Face's documented sliding-window method ("Perplexity of
fixed-length models"): windows of `block_size` advanced by `stride`, each scoring only
the tokens no earlier window scored. One difference, on purpose: the doc weights each
window's mean loss by (scored - 1) tokens, an off-by-one for every window after the
first; we sum exact per-token losses, so the mean is over exactly the scored tokens.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from engine.errors import MinigptError

LN2 = math.log(2.0)


def _windows(n: int, block_size: int, stride: int, cover: bool) -> list[tuple[int, int, int]]:
    """(start, end, first scored index within the window) over a stream of n tokens.

    stride > 0: HF's sliding windows; every token but the stream's first is scored once.
    stride = 0, cover=False: non-overlapping blocks (the paper's protocol); each block's
    first token is context only and the tail shorter than a block is dropped.
    stride = 0, cover=True: blocks that overlap by one token (the previous block's last
    token is the next one's context), so every token but the first is scored once.
    """
    if block_size < 2:
        raise MinigptError(f"evaluation block size {block_size} is too small", "use a block size of at least 2")
    if stride > block_size:
        raise MinigptError(f"evaluate.stride = {stride} exceeds the block size {block_size}, so tokens "
                           "between windows would never be scored", "use 0 < stride <= block_size, or 0")
    if stride <= 0 and not cover:
        return [(i * block_size, (i + 1) * block_size, 1) for i in range(n // block_size)]
    step = stride if stride > 0 else block_size - 1
    if cover:
        step = min(step, block_size - 1)
    out, prev_end = [], 0
    for start in range(0, max(n - 1, 1), step):
        end = min(start + block_size, n)
        if end - start < 2:
            break
        out.append((start, end, max(prev_end - start, 1)))
        prev_end = end
        if end == n:
            break
    return out


HEAD_CHUNK_ELEMENTS = 1 << 26  # logits per LM-head chunk: 256 MB in fp32 (Gemma's 262k vocabulary: 256 rows)


class CappedHead(torch.nn.Module):
    """The LM head followed by the family's logit soft-cap (cap·tanh(z / cap)), as the model's
    own forward applies it (`Adapter.logit_softcap`)."""

    def __init__(self, head, cap: float):
        super().__init__()
        self.head, self.cap = head, float(cap)

    @property
    def weight(self):
        return self.head.weight

    def forward(self, h):
        return torch.tanh(self.head(h) / self.cap) * self.cap


def decoder_and_head(model):
    """The transformer body and the LM head, so that logits are computed only where a
    log-probability is wanted, a chunk of rows at a time. (None, None) when the model does
    not expose them. A family's logit soft-cap is part of the returned head."""
    from engine.models import adapters

    try:
        dec, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None, None
    if dec is None or dec is model or head is None:
        return None, None
    try:
        cap = adapters.for_model(model).logit_softcap()
    except MinigptError:  # a model no adapter knows (a test double): no cap
        cap = None
    return dec, (CappedHead(head, cap) if cap else head)


def head_chunk(head) -> int:
    """Rows per LM-head chunk: at most HEAD_CHUNK_ELEMENTS logits (between 16 and 1024 rows), so
    a 262k vocabulary never materialises tokens × vocabulary at once. SmolLM2 (49k): 1024."""
    rows = int(head.weight.shape[0])
    return max(16, min(1024, HEAD_CHUNK_ELEMENTS // max(rows, 1)))


def head_nll(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Per-row -log p(target) of LM-head logits, `chunk` rows at a time (default `head_chunk`;
    smaller chunks re-read the head's weight, 113 MB for SmolLM2, 671 MB for Gemma 3 270M, once
    per chunk)."""
    chunk = chunk or head_chunk(head)
    out = [F.cross_entropy(head(h).float(), t, reduction="none") for h, t in zip(hidden.split(chunk), targets.split(chunk))]
    return torch.cat(out) if out else hidden.new_zeros(0)


@torch.no_grad()
def _score_stream(model, ids: torch.Tensor, windows, batch_size: int, scored: torch.Tensor | None = None,
                  progress=None, dist=None) -> tuple[float, int]:
    """Summed next-token NLL (nats) and count over the windows' scored positions.

    `scored` (bool, same length as ids) excludes positions from scoring (e.g. document
    separators) while keeping them as context. `dist` (an `engine.distributed.Dist`): batch j
    of windows runs on rank j % world and the sums are all-reduced (every rank returns the total).
    """
    device = next(model.parameters()).device
    dec, head = decoder_and_head(model)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    total = sum(e - s for s, e, _ in windows)
    done = 0
    starts = list(range(0, len(windows), max(1, batch_size)))
    for b in (dist.shard(starts) if dist is not None else starts):
        group = windows[b:b + batch_size]
        L = max(e - s for s, e, _ in group)
        x = torch.zeros(len(group), L, dtype=torch.long)
        mask = torch.zeros(len(group), L, dtype=torch.long)
        labels = torch.full((len(group), L), -100, dtype=torch.long)
        for r, (s, e, first) in enumerate(group):
            x[r, : e - s] = ids[s:e]
            mask[r, : e - s] = 1
            lab = ids[s + first: e].clone()
            if scored is not None:
                lab[~scored[s + first: e]] = -100
            labels[r, first: e - s] = lab
        target = labels[:, 1:].to(device)
        keep = target != -100
        # no mask when no row is padded: the model then takes its plain causal path
        kw = dict(input_ids=x.to(device), attention_mask=None if bool(mask.all()) else mask.to(device),
                  use_cache=False)
        if dec is not None:
            hidden = dec(**kw).last_hidden_state[:, :-1][keep]
            nll += float(head_nll(head, hidden, target[keep]).sum())
        else:
            logits = model(**kw).logits[:, :-1]
            nll += float(F.cross_entropy(logits[keep].float(), target[keep], reduction="sum"))
        count += int(keep.sum())
        done += sum(e - s for s, e, _ in group)
        if progress:
            dt = time.perf_counter() - t0
            w = dist.world if dist is not None else 1  # this rank's share × world: near enough
            progress(min(total, done * w), total, done * w / dt if dt else 0.0)
    if dist is not None and dist.on:
        nll, count = dist.sum_floats(nll, count)
        count = int(count)
    return nll, count


def _cap_block(model, block_size: int) -> int:
    from engine.models.adapters import model_context

    return max(2, min(block_size, model_context(model)))


def perplexity(model, ids: torch.Tensor, block_size: int, stride: int = 0, batch_size: int = 4,
               progress=None, dist=None) -> dict:
    """Token-level perplexity of a 1-D id stream.

    stride = 0: non-overlapping blocks (each block's first token is not predicted).
    stride > 0: sliding windows of `block_size` advanced by `stride`; each window scores
    only the tokens not scored before, with up to block_size - stride tokens of context.
    """
    ids = ids.flatten()
    block_size = _cap_block(model, block_size)
    windows = _windows(ids.numel(), block_size, stride, cover=False)
    if not windows:
        raise MinigptError(f"{ids.numel()} held-out tokens are fewer than one block of {block_size}",
                           "lower evaluate.block_size or use more held-out text")
    nll, count = _score_stream(model, ids, windows, batch_size, progress=progress, dist=dist)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "protocol": {"metric": "ppl", "block_size": block_size, "stride": stride, "tokens": count,
                         "windows": len(windows)}}


def bits_per_byte(model, tokenizer, texts: list[str], block_size: int, stride: int = 0,
                  batch_size: int = 4, progress=None, dist=None) -> dict:
    """Bits per UTF-8 byte of raw text: comparable across tokenizers (e.g. a pruned vocabulary).

    Each document is tokenized and scored on its own (no special tokens, no context from
    other documents), after the EOS (or BOS) token, which is context only. Every document
    token is scored exactly once (stride = 0: blocks overlapping by one token; stride > 0:
    sliding windows). The total NLL in bits is divided by the documents' byte count.
    """
    texts = [t for t in texts if t]
    block_size = _cap_block(model, block_size)
    if stride >= block_size:
        stride = 0  # same windows: a stride of a whole block would leave window-first tokens unscored
    if not texts:
        raise MinigptError("no text to evaluate bits per byte on", "give at least one non-empty document")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if sep is None:
        raise MinigptError("the tokenizer has neither an EOS nor a BOS token to start documents with",
                           "use a tokenizer with an EOS token")
    stream, keep, windows = [], [], []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        # each document is scored on its own: its windows never reach into another one
        doc = [sep] + list(row)
        windows += [(len(stream) + s, len(stream) + e, f) for s, e, f in _windows(len(doc), block_size, stride, True)]
        stream += doc
        keep += [False] + [True] * len(row)
    ids = torch.tensor(stream, dtype=torch.long)
    scored = torch.tensor(keep, dtype=torch.bool)
    windows.sort(key=lambda w: w[1] - w[0])  # similar lengths per batch: less padding
    nll, count = _score_stream(model, ids, windows, batch_size, scored=scored, progress=progress, dist=dist)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    bits = nll / LN2
    return {"bpb": bits / n_bytes, "nll_bits": bits, "bytes": n_bytes, "tokens": count,
            "ppl": math.exp(nll / count) if count else float("nan"),
            "protocol": {"metric": "bpb", "block_size": block_size, "stride": stride,
                         "documents": len(texts), "bytes": n_bytes}}


# ---- protocols ------------------------------------------------------------------------------
_INFORMATIONAL = {"windows", "seconds"}  # derived or incidental: never make numbers incomparable


def comparable(protocol_a: dict | None, protocol_b: dict | None) -> list[str]:
    """How two protocols differ, as readable lines (empty list: the numbers compare).

    Keys present in only one protocol count as differences too: a number measured
    without a stated stride is not known to be comparable with one that states it.
    """
    a, b = protocol_a or {}, protocol_b or {}
    if not a or not b:
        return ["a protocol is missing"] if (a or b) else []
    out = []
    for key in sorted(set(a) | set(b), key=lambda k: (k != "metric", k)):
        if key in _INFORMATIONAL:
            continue
        va, vb = a.get(key, "(unset)"), b.get(key, "(unset)")
        if va != vb:
            out.append(f"{key}: {_fmt(va)} vs {_fmt(vb)}")
    return out


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


# ---- multiple-choice questions (the pipeline's hook) -----------------------------------------
