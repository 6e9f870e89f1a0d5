"""Vocabulary pruning for real: a smaller BPE tokenizer and embedding/LM-head rows to match.

The paper zeroes the embedding rows of tokens that are rare in the domain (mask mode,
`prune.embedding_masks`), which keeps every shape. Here the pruned tokens leave the
tokenizer and the model: the BPE vocab and merges are filtered, ids renumbered
contiguously (kept tokens stay in their original order), and the embedding, the LM head
(tied or not, bias included) and the special-token ids in the config follow. The result
is a standard HF folder that stock `AutoTokenizer` / `AutoModelForCausalLM` load.

Which tokens stay (`plan`): frequency > ε_emb in the domain's training text, special
tokens, what the tokenizer needs to encode any text (the 256-symbol byte-level alphabet,
or the `<0xNN>` byte-fallback tokens and unk), and every token in the merge derivation of
a kept token. The derivation is the one BPE itself follows on the token's own characters
(lowest merge rank first, leftmost on ties): wherever a token ends up in an encoding, no
merge crossed its edges, so its span was built exactly as in isolation. Hence the pruned
tokenizer produces, for text the original tokenized into kept tokens only, exactly the
original tokens (renumbered): every merge the original applied survives, with the same
relative rank, and the merges that were dropped never fired. Elsewhere a dropped merge
leaves its pair split.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.models import size
from engine.errors import MinigptError
from engine.evaluate import perplexity

SUPPORTED = "byte-level BPE (GPT-2 style: SmolLM2, OPT, Phi) or BPE with byte fallback (Llama style)"
_ID_LISTS = ("suppress_tokens", "begin_suppress_tokens")


# ---- the keep rule shared with mask mode ----------------------------------------------
def protected_ids(tokenizer, model=None) -> set[int]:
    """Ids never pruned: the tokenizer's special tokens and the ids the model's configs name.

    Added special tokens that the model's family reserves as untrained placeholders (its
    adapter's `reserved_tokens`, e.g. Gemma 3's 6,242 `<unusedN>`) are not protected unless the
    tokenizer or a config names them: like any other token, they stay only if the domain uses them."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} - reserved_ids(tokenizer, model)
    if model is not None:
        for cfg in (model.config, getattr(model, "generation_config", None)):
            for _, value in _config_ids(cfg):
                ids.update(value if isinstance(value, list) else [value])
    return {int(i) for i in ids if i is not None and int(i) >= 0}


def reserved_ids(tokenizer, model) -> set[int]:
    """The added special tokens the model's family reserves as placeholders (adapter
    `reserved_tokens`), minus any the tokenizer names (bos, eos, pad, ...)."""
    if model is None:
        return set()
    import re

    from engine.models import adapters

    try:
        pattern = adapters.for_config(model.config).reserved_tokens
    except MinigptError:  # a family the adapters do not know: protect every special token
        return set()
    if not pattern:
        return set()
    rx = re.compile(pattern)
    named = set(tokenizer.all_special_ids)
    return {i for i, t in tokenizer.added_tokens_decoder.items()
            if t.special and i not in named and rx.fullmatch(str(t.content))}


def domain_keep(tokenizer, counts: torch.Tensor, threshold: float, model=None) -> torch.Tensor:
    """The paper's rule over the tokenizer's ids: keep frequency > ε_emb, and special tokens.

    Frequencies are counts / total (ε_emb = 0 drops exactly the tokens never seen).
    "Special" is `protected_ids`: a superset of the paper's named ones (pad/bos/eos/unk/...)
    that also holds added tokens flagged special (chat markers) and the config's ids.
    """
    n = len(tokenizer)
    keep = _frequent(counts, threshold, n)
    for i in protected_ids(tokenizer, model):
        if i < n:
            keep[i] = True
    return keep


def _frequent(counts: torch.Tensor, threshold: float, n: int) -> torch.Tensor:
    """freq > threshold for ids [0, n), freq = count / total count."""
    c = torch.zeros(n, dtype=torch.float64)
    m = min(n, counts.numel())
    c[:m] = counts.flatten()[:m].double()
    return c / counts.sum().clamp_min(1).double() > threshold


# ---- the structural plan -----------------------------------------------------------------
@dataclass
class VocabPlan:
    """Kept old ids in new-id order (new id i is old id keep[i]), and why they were kept."""

    keep: torch.Tensor
    tokenizer_size: int  # len(tokenizer) before
    rows: int  # embedding rows before (may exceed the tokenizer: padding rows)
    new_tokenizer_size: int
    reasons: dict  # frequent / special / encoding / ancestors: ids each rule added to the previous ones

    def old2new(self) -> dict[int, int]:
        return {int(o): n for n, o in enumerate(self.keep.tolist())}


def tokenizer_json(tokenizer) -> dict:
    """The backend `tokenizers` JSON of a supported tokenizer (clear error otherwise)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        raise MinigptError(f"tokenizer {type(tokenizer).__name__} (slow, no tokenizers backend) is not supported "
                           "for vocabulary pruning", f"use a model with a fast tokenizer: {SUPPORTED}; "
                           "or set prune.embedding_threshold = -1 (or prune.mode = \"mask\")")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    kind = model.get("type")
    why = None
    if kind != "BPE":
        why = f"a {kind} tokenizer"
    elif model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        why = "a BPE tokenizer with subword prefixes/suffixes"
    elif model.get("dropout"):
        why = "a BPE tokenizer with dropout"
    elif not model.get("byte_fallback") and not _has_byte_level(tj.get("pre_tokenizer")):
        why = "a BPE tokenizer without byte-level alphabet or byte fallback (it could not encode every text)"
    if why:
        raise MinigptError(f"{why} is not supported for vocabulary pruning",
                           f"supported: {SUPPORTED}; or set prune.embedding_threshold = -1 "
                           "(or prune.mode = \"mask\", which keeps the vocabulary)")
    return tj


def plan(tokenizer, counts: torch.Tensor, threshold: float, model, chosen: torch.Tensor | None = None) -> VocabPlan:
    """Which ids stay: frequent (or `chosen`, a bool mask over ids, when given: the held-out rule's
    top tokens), special, needed to encode any text, and their merge ancestors."""
    tj = tokenizer_json(tokenizer)
    bpe = tj["model"]
    vocab: dict[str, int] = bpe["vocab"]
    added = {t["id"] for t in tj.get("added_tokens", [])}
    token_ids = set(vocab.values()) | added
    n_ids = max(len(tokenizer), max(token_ids) + 1)
    rows = model.get_input_embeddings().weight.shape[0]
    is_token = torch.zeros(max(n_ids, rows), dtype=torch.bool)
    is_token[sorted(token_ids)] = True
    keep = torch.zeros_like(is_token)
    if chosen is None:
        keep[:n_ids] = _frequent(counts, threshold, n_ids) & is_token[:n_ids]
    else:
        m = min(n_ids, chosen.numel())
        keep[:m] = chosen[:m].bool() & is_token[:m]
    reasons = {"frequent" if chosen is None else "ranked": int(keep.sum())}

    post = _post_processor_ids(tj.get("post_processor"))
    special = protected_ids(tokenizer, model) | post
    outside = sorted(i for i in special if rows <= i < n_ids and is_token[i])
    if any(i in post for i in outside):  # the tokenizer itself inserts it: every encoding would break
        raise MinigptError(f"special token id {min(i for i in outside if i in post)} is outside the model's "
                           f"{rows} embedding rows", "fix the tokenizer/model pair, or set prune.embedding_threshold = -1")
    # others (Gemma 3's <image_soft_token>, id 262,144 beside 262,144 text rows) the model could
    # never embed: they leave the pruned tokenizer with the other ids past the rows
    reasons["special"] = _add(keep, {i for i in special if i < rows})

    needed = set()
    if _has_byte_level(tj.get("pre_tokenizer")):
        from tokenizers.pre_tokenizers import ByteLevel

        needed |= {vocab[ch] for ch in ByteLevel.alphabet() if ch in vocab}
    if bpe.get("byte_fallback"):
        needed |= {vocab[f"<0x{b:02X}>"] for b in range(256) if f"<0x{b:02X}>" in vocab}
    if bpe.get("unk_token") in vocab:
        needed.add(vocab[bpe["unk_token"]])
    reasons["encoding"] = _add(keep, needed)

    ranks = {tuple(_pair(mg)): r for r, mg in enumerate(bpe["merges"])}
    id2tok = {i: t for t, i in vocab.items()}
    ancestors = set()
    for i in torch.nonzero(keep).flatten().tolist():
        tok = id2tok.get(i)
        if tok is not None and i not in added and len(tok) > 1:  # added tokens are matched before BPE
            ancestors |= {vocab[s] for s in derivation(tok, ranks, vocab)}
    reasons["ancestors"] = _add(keep, ancestors)

    keep[rows:] = False  # ids the model cannot embed (never the post-processor's: checked above)
    reserved = reserved_ids(tokenizer, model)
    if reserved:
        reasons["reserved_dropped"] = sum(1 for i in reserved if i < rows and not keep[i])
    if outside:
        reasons["special_past_rows_dropped"] = len(outside)
    kept = torch.nonzero(keep).flatten()
    return VocabPlan(kept, len(tokenizer), rows, int(is_token[kept].sum()), reasons)


def derivation(token: str, ranks: dict, vocab: dict) -> list[str]:
    """The symbols BPE builds on the way to `token` from its characters (leaves included).

    Returns [] when BPE does not produce `token` from its own characters (such a token
    never appears in any encoding, so nothing below it is needed).
    """
    syms = list(token)
    if any(s not in vocab for s in syms):
        return []
    seen = list(syms)
    while len(syms) > 1:
        best, at = None, -1
        for i in range(len(syms) - 1):
            r = ranks.get((syms[i], syms[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        syms[at:at + 2] = [syms[at] + syms[at + 1]]
        seen.append(syms[at])
    return seen if syms == [token] else []


def _add(keep: torch.Tensor, ids: set[int]) -> int:
    """Set `ids` in `keep`; return how many were not kept already."""
    idx = torch.tensor(sorted(i for i in ids if 0 <= i < keep.numel()), dtype=torch.long)
    if idx.numel() == 0:
        return 0
    new = int((~keep[idx]).sum())
    keep[idx] = True
    return new


def _pair(merge) -> list[str]:
    return merge.split(" ", 1) if isinstance(merge, str) else list(merge)


def _has_byte_level(node) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in node.get("pretokenizers", []) or [])


def _post_processor_ids(node) -> set[int]:
    if not isinstance(node, dict):
        return set()
    t = node.get("type")
    if t == "Sequence":
        return set().union(*[_post_processor_ids(p) for p in node.get("processors", [])])
    if t == "TemplateProcessing":
        return {int(i) for s in node.get("special_tokens", {}).values() for i in s.get("ids", [])}
    if t in ("BertProcessing", "RobertaProcessing"):
        return {int(node["sep"][1]), int(node["cls"][1])}
    return set()


# ---- the held-out keep rule: the domain's counts, smoothed by the model's own expectation ---------
RULES = ("seen", "heldout")
PRIOR_WEIGHT = 0.3  # the prior's mass, as a share of the counted tokens (prune.vocab_prior; < 0: a cost)
SIZE_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)  # candidate cuts, × the tokens the domain used


@torch.no_grad()
def expected_counts(model, blocks: torch.Tensor, batch_size: int, rows: int, max_tokens: int = 0, progress=None,
                    dist=None) -> torch.Tensor:
    """Per id, the model's next-token probability summed over every position of `blocks` (float64;
    with `max_tokens`, of the first blocks holding that many tokens, one block at least):
    the counts the model expects the domain's text to hold. Unlike the counts, it is non-zero for
    the words the domain has not said yet but will ('preventing', 'trivial' in docstrings), in
    proportion to how plausible the model finds them in this domain's contexts. The LM head runs
    a chunk of rows at a time (a 262k vocabulary never materialises tokens × vocabulary). With
    `dist`, batch i runs on rank i % world and the sums are all-reduced."""
    from engine.evaluate.perplexity import decoder_and_head, head_chunk

    if max_tokens:
        blocks = blocks[: max(1, -(-max_tokens // blocks.shape[1]))]
    device = next(model.parameters()).device
    acc = torch.zeros(rows, dtype=torch.float64, device=device)
    dec, head = decoder_and_head(model)
    batches = list(blocks.split(max(1, batch_size)))
    mine = range(dist.rank, len(batches), dist.world) if dist is not None and dist.on else range(len(batches))
    t0, done = time.perf_counter(), 0
    for i in mine:
        b = batches[i].to(device)
        if dec is None:
            parts = [model(input_ids=b, use_cache=False).logits.reshape(-1, model.config.vocab_size)]
        else:
            h = dec(input_ids=b, use_cache=False).last_hidden_state
            parts = (head(x) for x in h.reshape(-1, h.shape[-1]).split(head_chunk(head)))
        for logits in parts:
            p = torch.softmax(logits.float(), dim=-1).sum(0, dtype=torch.float64)
            acc[: p.numel()] += p[:rows]
        done += b.numel()
        if progress:
            dt = time.perf_counter() - t0
            progress(done, blocks.numel() // (dist.world if dist is not None and dist.on else 1), done / dt if dt > 0 else 0.0)
    if dist is not None and dist.on:
        dist.all_sum([acc])
    return acc.cpu()


def _bpe_tokens(tokenizer) -> torch.Tensor:
    """Per id: a token of the BPE model itself (added tokens are matched before BPE: kept only
    when special)."""
    vocab = tokenizer_json(tokenizer)["model"]["vocab"]
    n = max(len(tokenizer), max(vocab.values()) + 1)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[sorted(vocab.values())] = True
    return mask


def ranking(tokenizer, counts: torch.Tensor, expected: torch.Tensor | None = None,
            weight: float = PRIOR_WEIGHT) -> torch.Tensor:
    """Ids in keep order (best first): by count + weight · N · q, where q is the model's expected
    distribution (`expected_counts`, normalised) and N the counted tokens, so the prior holds
    `weight` × as many pseudo-counts as the domain's text. Without `expected` (or with weight 0) it
    is the domain's frequency alone (ε_emb's order). With it, a token the counted text never used
    but the model finds likely here comes in ahead of one the text used once: a cut can cover what
    the domain will say next. A negative weight reads the expectation as a cost instead: every kept
    row holds probability mass at every position, which the renormalised cut would give back, so a
    rarely counted token the model expects often goes first (where the counted text already covers
    the domain, as licences do, that is the better trade; docs/results/gemma3_270m.md)."""
    ok = _bpe_tokens(tokenizer)
    n = max(ok.numel(), counts.numel())
    score = torch.zeros(n, dtype=torch.float64)
    score[: counts.numel()] = counts.flatten().double()
    if expected is not None and weight != 0 and float(expected.sum()) > 0:
        q = expected.flatten().double() / expected.sum().double()
        m = min(n, q.numel())
        score[:m] += weight * float(score.sum()) * q[:m]
    score[: ok.numel()][~ok] = -math.inf  # last, whatever the weight's sign
    score[ok.numel():] = -math.inf
    return torch.argsort(score, descending=True, stable=True)


def ranked_plan(tokenizer, counts: torch.Tensor, n_ranked: int, model, order: torch.Tensor | None = None) -> VocabPlan:
    """The plan keeping the `n_ranked` best ids of `ranking` (then special, encoding, ancestors)."""
    order = ranking(tokenizer, counts) if order is None else order
    chosen = torch.zeros(order.numel(), dtype=torch.bool)
    chosen[order[:max(0, int(n_ranked))]] = True
    return plan(tokenizer, counts, 0.0, model, chosen=chosen)


def plan_of_size(tokenizer, counts: torch.Tensor, rows: int, model, order: torch.Tensor | None = None) -> VocabPlan:
    """The ranked plan whose kept rows are closest to `rows` from below (the closure of ancestors
    makes the size a step function of the ranked count; found by bisection)."""
    order = ranking(tokenizer, counts) if order is None else order
    lo, hi = 0, int(order.numel())
    best = ranked_plan(tokenizer, counts, 0, model, order)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p = ranked_plan(tokenizer, counts, mid, model, order)
        if p.keep.numel() <= rows:
            lo, best = mid, p
        else:
            hi = mid - 1
    return best


def choose_cut(model, tokenizer, counts: torch.Tensor, validation: list[str], eval_cfg, tolerance: float,
               expected: torch.Tensor | None = None, weight: float = PRIOR_WEIGHT,
               progress=None) -> tuple[VocabPlan, dict]:
    """The held-out rule: the smallest ranked cut whose bits per byte on `validation` (documents the
    counts did not see) is within `tolerance` (relative) of the unpruned model's; the cut sizes tried
    are SIZE_FACTORS × the number of distinct tokens the counted text used. Each candidate is sliced
    on a copy and scored in full. Returns the plan and a table of every candidate tried."""
    import copy

    if not validation:
        raise MinigptError("the held-out vocabulary rule has no validation documents",
                           "use a corpus with more documents, or prune.vocab_rule = \"seen\"")
    order = ranking(tokenizer, counts, expected, weight)
    seen = int((counts > 0).sum())
    base = _bpb(model, tokenizer, validation, eval_cfg)
    table = {"validation_bytes": base["bytes"], "validation_documents": len(validation), "tolerance": tolerance,
             "prior_weight": weight if expected is not None else 0.0, "seen_tokens": seen, "bpb_base": base["bpb"], "candidates": []}
    rows_total = model.get_input_embeddings().weight.shape[0]
    chosen, done = None, set()
    for f in SIZE_FACTORS:
        n = min(int(round(f * seen)), int(order.numel()))
        if n in done:
            continue
        done.add(n)
        p = ranked_plan(tokenizer, counts, n, model, order)
        if p.keep.numel() >= rows_total:
            break
        m = copy.deepcopy(model)
        tok = prune_tokenizer(tokenizer, p)
        slice_model(m, p)
        got = _bpb(m, tok, validation, eval_cfg)
        del m
        rise = got["bpb"] / base["bpb"] - 1
        table["candidates"].append({"ranked": n, "rows": int(p.keep.numel()), "bpb": got["bpb"], "rise": rise})
        if progress:
            progress(len(table["candidates"]), len(SIZE_FACTORS), 0.0)
        if rise <= tolerance:
            chosen = p
            break
    if chosen is None:  # no candidate within tolerance: the one that cost least
        best = min(table["candidates"], key=lambda c: c["rise"]) if table["candidates"] else None
        chosen = ranked_plan(tokenizer, counts, best["ranked"] if best else int(order.numel()), model, order)
        table["within_tolerance"] = False
    else:
        table["within_tolerance"] = True
    table["chosen_rows"] = int(chosen.keep.numel())
    return chosen, table


# ---- the rebuilt tokenizer --------------------------------------------------------------------
def prune_tokenizer(tokenizer, p: VocabPlan):
    """A new tokenizer of the same class holding only the kept tokens, loaded the stock way.

    The original is saved, its tokenizer.json rewritten (vocab, merges, added tokens,
    post-processor and padding ids), and the folder reloaded with `AutoTokenizer`, so
    what we return is exactly what a user gets from the exported folder.
    """
    from transformers import AutoTokenizer

    tj = tokenizer_json(tokenizer)
    o2n = p.old2new()
    bpe = tj["model"]
    bpe["vocab"] = {t: o2n[i] for t, i in sorted(bpe["vocab"].items(), key=lambda kv: kv[1]) if i in o2n}
    kept = bpe["vocab"]
    bpe["merges"] = [mg for mg in bpe["merges"] if _merge_kept(_pair(mg), kept)]
    tj["added_tokens"] = [{**t, "id": o2n[t["id"]]} for t in tj.get("added_tokens", []) if t["id"] in o2n]
    tj["post_processor"] = _remap_post_processor(tj.get("post_processor"), o2n)
    if tj.get("padding") and tj["padding"].get("pad_id") is not None:
        tj["padding"]["pad_id"] = o2n.get(tj["padding"]["pad_id"], 0)
    with tempfile.TemporaryDirectory(prefix="minigpt-vocab-") as d:
        tokenizer.save_pretrained(d)
        Path(d, "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
        kept_text = set(kept) | {t["content"] for t in tj["added_tokens"]}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            cfg_path = Path(d, name)
            if not cfg_path.exists():
                continue
            tc = json.loads(cfg_path.read_text(encoding="utf-8"))
            if isinstance(tc.get("added_tokens_decoder"), dict):
                tc["added_tokens_decoder"] = {str(o2n[int(k)]): v for k, v in tc["added_tokens_decoder"].items()
                                              if int(k) in o2n}
            for key in ("additional_special_tokens", "extra_special_tokens"):  # lists the loader would re-add
                if isinstance(tc.get(key), list):
                    tc[key] = [t for t in tc[key] if (t.get("content") if isinstance(t, dict) else t) in kept_text]
            cfg_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2), encoding="utf-8")
        new = AutoTokenizer.from_pretrained(d)
    new.name_or_path = tokenizer.name_or_path
    expected = {**kept, **{t["content"]: t["id"] for t in tj["added_tokens"]}}
    if new.get_vocab() != expected or len(new) != p.new_tokenizer_size:
        raise RuntimeError(f"rebuilt {type(new).__name__} does not hold the planned vocabulary "
                           f"({len(new)} tokens, planned {p.new_tokenizer_size})")
    return new


def _merge_kept(pair: list[str], kept: dict) -> bool:
    a, b = pair
    return a in kept and b in kept and a + b in kept


def _remap_post_processor(node, o2n: dict[int, int]):
    if not isinstance(node, dict):
        return node
    node = dict(node)
    t = node.get("type")
    if t == "Sequence":
        node["processors"] = [_remap_post_processor(p, o2n) for p in node.get("processors", [])]
    elif t == "TemplateProcessing":
        node["special_tokens"] = {k: {**s, "ids": [o2n[int(i)] for i in s.get("ids", [])]}
                                  for k, s in node.get("special_tokens", {}).items()}
    elif t in ("BertProcessing", "RobertaProcessing"):
        node["sep"] = [node["sep"][0], o2n[int(node["sep"][1])]]
        node["cls"] = [node["cls"][0], o2n[int(node["cls"][1])]]
    return node


# ---- the sliced model --------------------------------------------------------------------------
@torch.no_grad()
def slice_model(model, p: VocabPlan) -> None:
    """Keep embedding and LM-head rows `p.keep` (in that order), in place; fix config ids."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    idx = p.keep.to(emb.weight.device)
    o2n = p.old2new()
    emb.weight = torch.nn.Parameter(emb.weight.data.index_select(0, idx).clone(),
                                    requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = int(idx.numel())
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = o2n.get(int(emb.padding_idx))
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            head.weight = torch.nn.Parameter(head.weight.data.index_select(0, idx.to(head.weight.device)).clone(),
                                             requires_grad=head.weight.requires_grad)
        if getattr(head, "bias", None) is not None:
            head.bias = torch.nn.Parameter(head.bias.data.index_select(0, idx.to(head.bias.device)).clone(),
                                           requires_grad=head.bias.requires_grad)
        if hasattr(head, "out_features"):
            head.out_features = int(idx.numel())
    old = p.rows
    for mod in model.modules():  # e.g. LlamaModel.vocab_size mirrors the config
        if isinstance(getattr(mod, "vocab_size", None), int) and mod.vocab_size == old:
            mod.vocab_size = int(idx.numel())
    model.config.vocab_size = int(idx.numel())
    for cfg in (model.config, getattr(model, "generation_config", None)):
        for name, value in _config_ids(cfg):
            setattr(cfg, name, _remap_ids(value, o2n, old))


def _config_ids(cfg):
    """(name, value) of a config's token-id fields: *_token_id(s), suppress lists."""
    if cfg is None:
        return []
    out = []
    for name, value in vars(cfg).items():
        if not (name.endswith(("_token_id", "_token_ids")) or name in _ID_LISTS):
            continue
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
            out.append((name, value))
    return out


def _remap_ids(value, o2n: dict[int, int], rows: int):
    """Kept ids get their new number; ids that were out of range before stay as they were."""
    if isinstance(value, list):
        return [_remap_ids(v, o2n, rows) for v in value]
    if 0 <= value < rows:
        return o2n[value]  # protected ids are always kept
    return value


# ---- the whole step ---------------------------------------------------------------------------
def prune_vocabulary(model, tokenizer, counts: torch.Tensor | None, threshold: float,
                     held_out: list[str] | None = None, eval_cfg=None, the_plan: VocabPlan | None = None):
    """Structural vocabulary pruning: returns (model sliced in place, new tokenizer, info).

    Given the held-out documents and the evaluation settings (`EvaluateConfig`: block size,
    stride, batch size, and `max_tokens`, which caps the documents), it also measures the
    coverage (share of their original tokens that are kept) and bits per byte before and
    after. Token ids change: the caller re-tokenizes whatever it holds. `the_plan` (the held-out
    rule's `choose_cut`) replaces the ε_emb threshold's plan.
    """
    if counts is None:
        raise MinigptError("the calibration statistics hold no token counts",
                           "rerun the calibrate stage: minigpt calibrate SESSION --redo")
    p = the_plan if the_plan is not None else plan(tokenizer, counts, threshold, model)
    info = {"threshold": threshold, "tokenizer_before": p.tokenizer_size, "tokenizer_after": p.new_tokenizer_size,
            "rows_before": p.rows, "rows_after": int(p.keep.numel()), "kept_because": p.reasons,
            "params_before": size.count_params(model)}
    measure = held_out is not None and eval_cfg is not None
    if measure:
        texts = held_out_texts(tokenizer, held_out, eval_cfg.max_tokens)
        info["coverage"] = coverage(tokenizer, texts, p)
        before = _bpb(model, tokenizer, texts, eval_cfg)
    new_tok = prune_tokenizer(tokenizer, p)
    slice_model(model, p)
    info["params_after"] = size.count_params(model)
    info["params_saved"] = info["params_before"] - info["params_after"]
    if measure:
        after = _bpb(model, new_tok, texts, eval_cfg)
        info.update(bpb_before=before["bpb"], bpb_after=after["bpb"], eval_tokens_before=before["tokens"],
                    eval_tokens_after=after["tokens"], bpb_protocol=after["protocol"])
    return model, new_tok, info


def coverage(tokenizer, texts: list[str], p: VocabPlan) -> float:
    """Share of the texts' tokens (original tokenizer) that are kept as single tokens."""
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    if not ids:
        return 1.0
    kept = torch.zeros(max(p.rows, p.tokenizer_size, max(ids) + 1), dtype=torch.bool)
    kept[p.keep] = True
    return round(float(kept[torch.tensor(ids)].float().mean()), 6)


def held_out_texts(tokenizer, texts: list[str], max_tokens: int) -> list[str]:
    """The held-out documents, in order, cut after `max_tokens` tokens in all (0 = all)."""
    if not max_tokens:
        return [t for t in texts if t]
    out, left = [], max_tokens
    for t in texts:
        if left <= 0:
            break
        enc = tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        out.append(t if n <= left else t[: enc["offset_mapping"][left - 1][1]])
        left -= n + 1  # + the separator that starts each document
    return [t for t in out if t]


def _bpb(model, tokenizer, texts: list[str], e) -> dict:
    return perplexity.bits_per_byte(model, tokenizer, texts, e.block_size, stride=e.stride, batch_size=e.batch_size)
