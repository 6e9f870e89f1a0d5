"""Removing attention heads, GQA-aware (Minitron's head axis, FLAP's compensation).

Query head h of a layer writes features h·d … (h+1)·d of o_proj's input and reads key/value
head h // group. A plan keeps, per layer, some whole key/value groups and the same number of
query heads in every kept group, so repeat_kv still pairs them: q, k and v lose the rows of
the removed heads, o_proj loses their columns, and the attention module is told its new
counts (`Adapter.set_heads`). Whole groups go first when the cut is a multiple of the group
size, else the same number of query heads from every group (as `engine.prune.budget` counts).

One count in every layer goes into the family's config fields (num_attention_heads,
num_key_value_heads, an explicit head_dim), so stock transformers loads it where the family
reads head_dim from its config (`Adapter.heads_in_config`: Llama, Mistral, Qwen, Phi) and its
config validation accepts it (transformers 5 wants hidden_size % num_attention_heads == 0:
SmolLM2's 576 takes 9, 6 or 3 heads; `Adapter.can_store_heads`).
Per-layer counts, and any head cut of a family that derives head_dim from the hidden size
(OPT, GPT-2), are recorded as `minigpt_heads` ([query, kv] per layer) and load through
`engine.models.export.load_model`.

Compensation, at full width before slicing (so mask mode gets it too): `lstsq` refits the
kept o_proj columns (and its bias, where it has one) to the full output on the calibration
activations, from the Gram matrix of o_proj's input, as compensate.py refits down_proj;
`bias` (FLAP) adds W_P E[x_P] to o_proj's bias (families whose o_proj has one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import MinigptError
from engine.models import adapters as adapters_mod
from engine.models.export import HEADS_KEY
from engine.prune import structure

CRITERIA = ("norm", "wanda")
MODES = ("uniform", "per_layer")
COMPENSATION = ("none", "bias", "lstsq")


@dataclass
class Plan:
    """Query heads kept per layer (sorted indices into the layer's current heads)."""

    keep: list[torch.Tensor]
    heads_before: list[list[int]]  # [query, kv] per layer

    def kept_groups(self, layer: int) -> torch.Tensor:
        n, kv = self.heads_before[layer]
        return torch.unique(self.keep[layer] // (n // kv))

    @property
    def heads_after(self) -> list[list[int]]:
        return [[int(k.numel()), int(self.kept_groups(i).numel())] for i, k in enumerate(self.keep)]


def shape(n_heads: int, n_kv: int, cut: int) -> tuple[int, int]:
    """(query heads, kv groups) kept when `cut` query heads go: whole groups when the cut is a
    multiple of the group size, else the same number from every group (at least one each)."""
    group = n_heads // n_kv
    cut = max(0, int(cut))
    if cut == 0:
        return n_heads, n_kv
    if cut % group == 0 and cut < n_heads:
        return n_heads - cut, n_kv - cut // group
    per_group = -(-cut // n_kv)
    return n_kv * max(1, group - per_group), n_kv


# ---- scores ------------------------------------------------------------------------------
def scores(model, stats: dict, criterion: str = "norm") -> list[torch.Tensor]:
    """Per layer, one score per query head (float64; low scores go first).

    "norm": mean ‖head output‖ over tokens (Minitron). "wanda": Σ over the head's o_proj
    columns of |W| × the input's rms (Wanda's |W|·‖x‖ on o_proj)."""
    if criterion not in CRITERIA:
        raise MinigptError(f"prune.head_criterion = {criterion!r} is not valid", f"use one of: {', '.join(CRITERIA)}")
    n = structure.n_tokens(stats)
    out = []
    for a in adapters_mod.for_model(model).attentions():
        if criterion == "norm":
            out.append(stats[f"attn.{a.layer}.head_norm"].double() / n)
            continue
        rms = (stats[f"attn.{a.layer}.sq"].double() / n).sqrt()
        w = a.o.module.weight.detach().double().cpu()
        w = w.t() if a.o.transposed else w  # [out, heads·d]
        col = w.abs().sum(0) * rms
        out.append(col.view(a.n_heads, a.head_dim).sum(1))
    return out


# ---- selection ---------------------------------------------------------------------------
def _pick(score: torch.Tensor, n_heads: int, n_kv: int, q_kept: int, kv_kept: int) -> torch.Tensor:
    """The best `kv_kept` groups, keeping the best q_kept/kv_kept query heads of each."""
    group = n_heads // n_kv
    per = q_kept // kv_kept
    s = score.view(n_kv, group)
    top = torch.sort(s, dim=1, descending=True, stable=True)
    group_score = top.values[:, :per].sum(1)
    groups = torch.argsort(group_score, descending=True, stable=True)[:kv_kept]
    heads = [int(g) * group + int(j) for g in groups for j in top.indices[g, :per]]
    return torch.tensor(sorted(heads), dtype=torch.long)


def select(model, scores_: list[torch.Tensor], ratio: float, mode: str = "uniform") -> Plan:
    """Heads to keep when `ratio` of the query heads go. "uniform": the same (query, kv) counts in
    every layer; "per_layer": the cut follows the global ranking of scores (each normalised by
    its layer's mean), snapped per layer to a GQA shape (at least one group, one head)."""
    if mode not in MODES:
        raise MinigptError(f"prune.head_mode = {mode!r} is not valid", f"use one of: {', '.join(MODES)}")
    if not 0.0 <= ratio < 1.0:
        raise MinigptError(f"prune.head_ratio = {ratio:g} is outside [0, 1)", "set a fraction such as 0.25")
    adapter = adapters_mod.check_axis(model, "heads")
    counts = adapter.head_counts()
    if mode == "uniform":
        cuts = [int(round(ratio * n)) for n, _ in counts]
    else:
        norm = [s / s.mean().clamp_min(1e-30) for s in scores_]
        flat = torch.cat(norm)
        n_remove = int(round(ratio * flat.numel()))
        order = torch.argsort(flat, stable=True)[:n_remove]
        offsets = torch.tensor([0] + [n for n, _ in counts]).cumsum(0)
        cuts = [int(((order >= offsets[i]) & (order < offsets[i + 1])).sum()) for i in range(len(counts))]
        cuts = [min(c, n - 1) for c, (n, _) in zip(cuts, counts)]  # `shape` keeps >= 1 group
    keep = []
    for s, (n, kv), cut in zip(scores_, counts, cuts):
        q_kept, kv_kept = shape(n, kv, cut)
        keep.append(_pick(s.double(), n, kv, q_kept, kv_kept))
    return Plan(keep, [list(c) for c in counts])


# ---- compensation, slicing, masks --------------------------------------------------------
def _rows(heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    return (offset + heads.view(-1, 1) * head_dim + torch.arange(head_dim).view(1, -1)).flatten()


def _check(plan: Plan, att: adapters_mod.Attention) -> tuple[torch.Tensor, torch.Tensor]:
    keep = plan.keep[att.layer].long().cpu()
    n, kv = att.n_heads, att.n_kv
    if [n, kv] != list(plan.heads_before[att.layer]):
        raise MinigptError(f"the head plan is for {plan.heads_before[att.layer]} heads, layer {att.layer} has {[n, kv]}",
                           "select heads on the model as it is now")
    if keep.numel() == 0:
        raise MinigptError(f"the head plan leaves layer {att.layer} without heads", "lower prune.head_ratio")
    groups, per = torch.unique(keep // att.group, return_counts=True)
    if len(set(per.tolist())) != 1:
        raise MinigptError(f"layer {att.layer} keeps {per.tolist()} query heads in its kv groups: repeat_kv needs "
                           "the same number in every kept group", "build the plan with engine.prune.heads.select")
    return keep, groups


@torch.no_grad()
def compensate(model, plan: Plan, stats: dict | None, method: str = "lstsq", damping: float = 1e-3) -> None:
    """Rewrite o_proj so that the kept heads approximate the full output; zero the removed
    heads' columns (full width, in place)."""
    from engine.prune.compensate import solve

    if method not in COMPENSATION:
        raise MinigptError(f"head compensation {method!r} is not valid", f"use one of: {', '.join(COMPENSATION)}")
    if method != "none" and stats is None:
        raise MinigptError(f"head compensation {method!r} needs calibration statistics",
                           "collect them with engine.prune.structure.collect, or use compensation = \"none\"")
    for att in adapters_mod.for_model(model).attentions():
        keep, _ = _check(plan, att)
        if keep.numel() == att.n_heads:
            continue
        cols = _rows(keep, att.head_dim)
        dropped = torch.ones(att.n_heads * att.head_dim, dtype=torch.bool)
        dropped[cols] = False
        p = att.o.module.weight
        w = (p.detach().t() if att.o.transposed else p.detach()).double().cpu()  # [out, heads·d]
        bias = att.o.bias
        if method == "bias":
            if bias is None:
                raise MinigptError(f"bias compensation of heads needs an o_proj bias, which {att.name} lacks",
                                   "use compensation = \"lstsq\" or \"none\"")
            mean = structure.attn_mean(stats, att.layer)
            bias.data.add_((w[:, dropped] @ mean[dropped]).to(bias))
        elif method == "lstsq":
            gram = structure.attn_gram(stats, att.layer)
            if gram is None:
                raise MinigptError("least-squares head compensation needs the Gram matrix of o_proj's input",
                                   "collect statistics with gram=True")
            w_k, db = solve(w, gram, structure.attn_mean(stats, att.layer), cols, damping,
                            with_bias=bias is not None)
            w[:, cols] = w_k
            if db is not None:
                bias.data.add_(db.to(bias))
        w[:, dropped] = 0.0
        p.data.copy_((w.t() if att.o.transposed else w).to(p))


def _slice(proj: adapters_mod.Proj, idx: torch.Tensor, axis: int) -> None:
    from engine.prune.mlp import _slice_proj

    _slice_proj(proj, idx, axis)


def _qkv_rows(att: adapters_mod.Attention, keep: torch.Tensor, groups: torch.Tensor) -> dict:
    """{projection: its output rows to keep}: q rows of the kept heads, k/v rows of the kept groups."""
    d = att.head_dim
    if att.qkv is not None:  # [q | k | v], no GQA: groups == heads
        e = att.n_heads * d
        return {"qkv": torch.cat([_rows(keep, d), _rows(keep, d, e), _rows(keep, d, 2 * e)])}
    return {"q": _rows(keep, d), "k": _rows(groups, d), "v": _rows(groups, d)}


def apply(model, plan: Plan, stats: dict | None = None, compensation: str = "lstsq", damping: float = 1e-3) -> None:
    """Compensate, then remove the heads outside the plan for real (in place)."""
    adapter = adapters_mod.check_axis(model, "heads")
    compensate(model, plan, stats, compensation, damping)
    for att in adapter.attentions():
        keep, groups = _check(plan, att)
        if keep.numel() == att.n_heads:
            continue
        for name, rows in _qkv_rows(att, keep, groups).items():
            proj = getattr(att, name)
            _slice(proj, rows, proj.out_axis)
        _slice(att.o, _rows(keep, att.head_dim), att.o.in_axis)
        adapter.set_heads(att, int(keep.numel()), int(groups.numel()))
    record(model)


def record(model) -> None:
    """Write the model's head counts into its config: the family's fields when every layer has
    the same counts and the family reads them (stock loading), and `minigpt_heads` per layer."""
    adapter = adapters_mod.for_model(model)
    counts = adapter.head_counts()
    cfg = model.config
    if len({tuple(c) for c in counts}) == 1 and adapter.can_store_heads(cfg, counts[0][0]):
        adapter.set_config_heads(cfg, *counts[0])
    setattr(cfg, HEADS_KEY, counts)


def masks(model, plan: Plan) -> dict[str, torch.Tensor]:
    """The same cut as boolean keep-masks, shaped like each parameter (mask mode; tests)."""
    from engine.prune.mlp import _expand

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for att in adapters_mod.for_model(model).attentions():
        keep, groups = _check(plan, att)
        for name, rows in _qkv_rows(att, keep, groups).items():
            proj = getattr(att, name)
            sel = torch.zeros(proj.out_features, dtype=torch.bool)
            sel[rows] = True
            out[names[id(proj.module.weight)]] = _expand(sel, proj.module.weight.shape, proj.out_axis)
            if proj.bias is not None:
                out[names[id(proj.bias)]] = sel.clone()
        sel = torch.zeros(att.o.in_features, dtype=torch.bool)
        sel[_rows(keep, att.head_dim)] = True
        out[names[id(att.o.module.weight)]] = _expand(sel, att.o.module.weight.shape, att.o.in_axis)
    return out
