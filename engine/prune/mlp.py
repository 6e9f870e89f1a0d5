"""Choosing and removing MLP neurons (structural), or zeroing them (mask, the paper's way).

Structural pruning slices the tensors: gate/up (fc1, c_fc) lose rows with their bias
entries, down (fc2, c_proj) loses columns. Mask mode keeps every shape and zeroes the
same weights, which reproduces the paper and gives identical logits for the same neurons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.models import adapters as adapters_mod
from engine.models.size import count_nonzero, count_params
from engine.prune.calibrate import Stats
from engine.config import PruneConfig
from engine.errors import MinigptError


# ---- scores ------------------------------------------------------------------------
def neuron_scores(model, stats: Stats, criterion: str = "paper", seed: int = 0,
                  damping: float = 0.01) -> list[torch.Tensor]:
    """One score per MLP neuron and layer; low scores are pruned first."""
    from engine.prune import criteria

    return criteria.scores(model, stats, criterion, seed, damping)


# ---- selection ---------------------------------------------------------------------
@dataclass
class Plan:
    """Neurons kept per MLP layer (sorted indices into the current width)."""

    keep: list[torch.Tensor]
    widths_before: list[int]

    @property
    def widths_after(self) -> list[int]:
        return [int(k.numel()) for k in self.keep]


def select(model, stats: Stats, cfg: PruneConfig, seed: int = 0, sensitivities: list[float] | None = None) -> Plan:
    """Neurons to keep. `sensitivities` (engine.prune.sensitivity.measure) drive allocation = "sensitivity"."""
    adapter = adapters_mod.for_model(model)
    mlps = adapter.mlps()
    widths = [m.width for m in mlps]
    scores = neuron_scores(model, stats, cfg.criterion, seed, cfg.damping)
    if cfg.rule == "threshold":
        prune = [s <= cfg.activation_threshold for s in scores]
        if cfg.linear_threshold >= 0:
            for i, m in enumerate(mlps):
                for p in m.ins:
                    out = stats.linear_out(p.name)
                    if out is not None:
                        prune[i] |= out.to(prune[i].device) <= cfg.linear_threshold
        keep_n = [int((~p).sum()) for p in prune]
        order = [torch.argsort(s, descending=True, stable=True) for s in scores]
        keep = []
        for i, (p, s) in enumerate(zip(prune, scores)):
            keep.append(torch.nonzero(~p).flatten())
    else:
        keep_n = _ratio_counts(scores, widths, cfg, sensitivities)
        order = [torch.argsort(s, descending=True, stable=True) for s in scores]
        keep = [o[:k] for o, k in zip(order, keep_n)]
    # minimum width and rounding
    floors = []
    for i, (k, o, w) in enumerate(zip(keep, order, widths)):
        n = k.numel()
        if n < cfg.min_keep:
            if not cfg.allow_layer_collapse:
                what = (f"activation_threshold = {cfg.activation_threshold:g}" if cfg.rule == "threshold"
                        else f"ratio = {cfg.ratio:g}")
                raise MinigptError(
                    f"prune.{what} would leave layer {i} ({mlps[i].name}) with {n} of {w} neurons (minimum {cfg.min_keep})",
                    "lower the threshold, or set prune.allow_layer_collapse = true to keep the top min_keep neurons")
            k = o[: min(cfg.min_keep, w)]
        floors.append(k)
    targets = _rounded([k.numel() for k in floors], widths, cfg)
    final = []
    for k, o, target in zip(floors, order, targets):
        n = k.numel()
        if target > n:  # rounding up adds back the best-scoring pruned neurons
            kept = set(k.tolist())
            extra = [j for j in o.tolist() if j not in kept][: target - n]
            k = torch.tensor(sorted(kept | set(extra)), dtype=torch.long)
        elif target < n:  # rounding down (ratio rule) drops the lowest-scoring kept ones
            kept = set(k.tolist())
            k = torch.tensor([j for j in o.tolist() if j in kept][:target], dtype=torch.long)
        final.append(torch.sort(k).values)
    return Plan(final, widths)


def _rounded(counts: list[int], widths: list[int], cfg: PruneConfig) -> list[int]:
    """Kept widths as multiples of `round_to`. The threshold rule rounds every layer up (a
    neuron over the threshold is never dropped). The ratio rule keeps its promise: layers are
    rounded up or down by largest remainder so the total stays within round_to / 2 of what the
    ratio asks (rounding 30% per layer up to multiples of 256 kept 79% of SmolLM2's neurons).
    With `allocation = "per_layer"` each layer rounds to its nearest multiple on its own, so one
    ratio on equal widths stays one width (stock transformers loads it)."""
    r = max(1, cfg.round_to)
    up = [min(w, int(math.ceil(n / r) * r)) for n, w in zip(counts, widths)]
    if r == 1 or cfg.rule != "ratio":
        return up
    least = [min(w, int(math.ceil(min(cfg.min_keep, w) / r) * r)) for w in widths]
    if cfg.allocation == "per_layer":
        return [min(w, max(lo, int(math.floor(n / r + 0.5)) * r)) for n, w, lo in zip(counts, widths, least)]
    out = [max(lo, (n // r) * r) for n, lo in zip(counts, least)]
    left = int(math.floor(sum(counts) / r + 0.5)) * r - sum(out)  # half up, not to even
    for i in sorted(range(len(counts)), key=lambda i: (-(counts[i] - out[i]), i)):
        if left <= 0:
            break
        if up[i] > out[i]:
            left -= up[i] - out[i]
            out[i] = up[i]
    return out


def _ratio_counts(scores, widths, cfg: PruneConfig, sensitivities=None) -> list[int]:
    if cfg.allocation == "per_layer":
        return [w - int(round(cfg.ratio * w)) for w in widths]
    if cfg.allocation == "sensitivity":
        from engine.prune import sensitivity

        if sensitivities is None:
            raise MinigptError("prune.allocation = \"sensitivity\" needs measured layer sensitivities",
                               "measure them with engine.prune.sensitivity.measure (the prune stage does)")
        return sensitivity.allocate(sensitivities, widths, cfg.ratio, cfg.sensitivity_probe, cfg.min_keep,
                                    cfg.sensitivity_spread)
    # global: rank scores normalised by their layer mean (layers differ in scale)
    norm = torch.cat([s / s.mean().clamp_min(1e-12) for s in scores])
    n_remove = int(round(cfg.ratio * norm.numel()))
    if n_remove == 0:
        return list(widths)
    cut = torch.sort(norm).values[n_remove - 1]
    counts, start, removed = [], 0, 0
    below = [(s / s.mean().clamp_min(1e-12)) <= cut for s in scores]
    # ties at the cut could over-remove; trim them in layer order
    excess = int(sum(b.sum() for b in below)) - n_remove
    for b, w in zip(below, widths):
        r = int(b.sum())
        if excess > 0:
            d = min(excess, r)
            r -= d
            excess -= d
        counts.append(w - r)
    return counts


def plan_from_masks(keep: list[torch.Tensor], widths: list[int]) -> Plan:
    return Plan([torch.sort(k).values for k in keep], widths)


def sensitivities_for(model, stats: Stats, cfg: PruneConfig, calib=None, batch_size: int = 4, seed: int = 0,
                      progress=None, dist=None) -> list[float] | None:
    """Each layer's measured loss rise when `sensitivity_probe` of it is pruned (sensitivity
    allocation only; None otherwise). It depends on the criterion and compensation, not on the
    ratio, so a budget search measures it once for all its candidates."""
    if cfg.rule != "ratio" or cfg.allocation != "sensitivity":
        return None
    from engine.prune import sensitivity

    b = calib() if callable(calib) else calib
    if b is None or b.numel() == 0:
        raise MinigptError("sensitivity allocation needs calibration tokens",
                           "run the calibrate stage on a corpus with at least one block")
    n = max(1, -(-cfg.sensitivity_tokens // b.shape[1]))
    return sensitivity.measure(model, stats, b[:n], cfg.criterion, cfg.compensation, cfg.damping,
                               cfg.sensitivity_probe, batch_size, seed,
                               progress=progress and (lambda d, t: progress("sensitivity", d, t)), dist=dist)


def select_and_compensate(model, stats: Stats, cfg: PruneConfig, calib=None, batch_size: int = 4, seed: int = 0,
                          progress=None, sensitivities: list[float] | None = None, dist=None) -> Plan:
    """Choose the neurons (any allocation) and compensate the kept ones, in place at full width.

    The step before `apply_structural` / `mlp_masks`, shared by the prune stage and the
    sweep. `calib` ([blocks, block_size] ids, or a function returning them) is needed
    only by sensitivity allocation and sequential mode. `progress(what, done, total)`.
    `sensitivities` reuses an earlier `sensitivity.measure` (same criterion and compensation).
    `dist`: sensitivities are measured split over the ranks (`sensitivity.measure`).
    """
    from engine.prune import compensate

    def blocks():
        b = calib() if callable(calib) else calib
        if b is None or b.numel() == 0:
            raise MinigptError("sensitivity allocation and sequential pruning need calibration tokens",
                               "run the calibrate stage on a corpus with at least one block")
        return b

    if not cfg.sequential and compensate.needs_gram(cfg) and not stats.has_gram():
        raise MinigptError(f"prune.compensation = {cfg.compensation!r} / criterion {cfg.criterion!r} needs the "
                           "Gram matrix of the MLP activations, which this calibration lacks",
                           "recalibrate with the new prune settings: minigpt calibrate SESSION --set ...")
    sens = sensitivities if sensitivities is not None else sensitivities_for(model, stats, cfg, blocks, batch_size,
                                                                             seed, progress, dist=dist)
    plan = select(model, stats, cfg, seed, sens)
    if cfg.sequential:
        from engine.prune import sequential

        keep = sequential.prune(model, plan.widths_after, blocks(), batch_size, cfg.criterion, cfg.compensation,
                                cfg.damping, seed, progress=progress and (lambda d, t: progress("sequential", d, t)))
        plan = plan_from_masks(keep, plan.widths_before)
    elif cfg.compensation != "none":
        compensate.apply(model, plan.keep, stats, cfg.compensation, cfg.damping)
    return plan


# ---- application -------------------------------------------------------------------
def _param_count(mods) -> int:
    return sum(p.numel() for m in mods for p in m.parameters(recurse=False))


def _slice_proj(proj: adapters_mod.Proj, idx: torch.Tensor, axis: int):
    """Replace proj.module's weight/bias with the slices along `axis` (in place on the module)."""
    mod = proj.module
    w = mod.weight.data.index_select(axis, idx.to(mod.weight.device)).clone()
    mod.weight = torch.nn.Parameter(w, requires_grad=mod.weight.requires_grad)
    b = getattr(mod, "bias", None)
    if b is not None and axis == proj.out_axis:
        mod.bias = torch.nn.Parameter(b.data.index_select(0, idx.to(b.device)).clone(), requires_grad=b.requires_grad)
    proj.sync_shape()


def apply_structural(model, plan: Plan) -> None:
    adapter = adapters_mod.for_model(model)
    for m, keep in zip(adapter.mlps(), plan.keep):
        if keep.numel() == m.width:
            continue
        for p in m.ins:
            _slice_proj(p, keep, p.out_axis)
        _slice_proj(m.out, keep, m.out.in_axis)
        m.record_width(int(keep.numel()))
    widths = adapter.widths()
    if len(set(widths)) == 1:
        adapter.set_config_width(model.config, widths[0])


def mlp_masks(model, plan: Plan) -> dict[str, torch.Tensor]:
    """Boolean keep-masks for every MLP parameter, shaped like the parameter."""
    adapter = adapters_mod.for_model(model)
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {}
    for m, keep in zip(adapter.mlps(), plan.keep):
        sel = torch.zeros(m.width, dtype=torch.bool)
        sel[keep] = True
        for p in m.ins:
            w = p.module.weight
            masks[names[id(w)]] = _expand(sel, w.shape, p.out_axis)
            if p.bias is not None:
                masks[names[id(p.bias)]] = sel.clone()
        w = m.out.module.weight
        masks[names[id(w)]] = _expand(sel, w.shape, m.out.in_axis)
    return masks


def _expand(sel: torch.Tensor, shape, axis: int) -> torch.Tensor:
    view = [1, 1]
    view[axis] = -1
    return sel.view(view).expand(shape).clone()


def linear_masks(model, stats: Stats, threshold: float) -> dict[str, torch.Tensor]:
    """The paper's linear rule (mask mode): zero input columns and output rows whose mean |x| <= ε."""
    masks = {}
    canonical = {id(p): n for n, p in model.named_parameters()}  # a tied lm_head's weight is the embedding's
    for proj in adapters_mod.for_model(model).linears():
        name, mod = proj.name, proj.module
        xin, xout = stats.linear_in(name), stats.linear_out(name)
        if xin is None:
            continue
        w = mod.weight
        keep = torch.ones(w.shape, dtype=torch.bool)
        keep &= _expand(xin > threshold, w.shape, proj.in_axis)
        keep &= _expand(xout > threshold, w.shape, proj.out_axis)
        key = canonical.get(id(w), f"{name}.weight")
        masks[key] = masks[key] & keep if key in masks else keep
        if getattr(mod, "bias", None) is not None:
            masks[f"{name}.bias"] = xout > threshold
    return masks


def embedding_masks(model, tokenizer, counts: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """The paper's embedding rule (mask mode): zero rows of tokens with frequency <= ε_emb.

    The keep rule is `vocab.domain_keep`, shared with structural vocabulary pruning. Only
    the tokenizer's ids are candidates: padding rows past it are never zeroed (the
    paper's histogram spans the tokenizer's vocabulary only).
    """
    from engine.prune.vocab import domain_keep

    keep = domain_keep(tokenizer, counts, threshold, model)
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {}
    for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
        if mod is None:
            continue
        w = mod.weight
        sel = torch.ones(w.shape[0], dtype=torch.bool)
        n = min(keep.numel(), w.shape[0])
        sel[:n] = keep[:n]
        masks[names[id(w)]] = sel.view(-1, 1).expand(w.shape).clone()
    return masks


def merge_masks(*dicts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out[k] & v if k in out else v
    return out


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        p = params[name]
        p.mul_(keep.to(device=p.device, dtype=p.dtype))


# ---- report ------------------------------------------------------------------------
def layer_report(model, widths_before: list[int], params_before_total: int, mode: str,
                 mlp_params_before: list[int], heads_before: list | None = None, hidden_before: int | None = None,
                 dropped: list[int] | None = None) -> dict:
    """Per-layer rows (MLP neurons and parameters, query heads, kv heads (= GQA groups), each as
    X_before / X_after; `dropped` for removed blocks) and whole-model totals (the same pairs
    summed, hidden_before / hidden_after, `dropped_blocks`: the removed blocks).

    Lists "before" are indexed by the original blocks; `dropped` names the blocks removed
    (engine.prune.depth), which appear as rows with nothing left. `heads_before`: [query, kv]
    per original block (default: as now, for blocks that remain)."""
    adapter = adapters_mod.for_model(model)
    dropped = sorted(set(dropped or []))
    n_before = len(widths_before)
    originals = [i for i in range(n_before) if i not in dropped]
    heads_now = _heads_now(adapter, mode)
    if heads_before is None:
        heads_before = [None] * n_before
        for orig, h in zip(originals, adapter.head_counts()):  # the stored shapes
            heads_before[orig] = h
    lp = adapter.layers_path
    hidden_now = adapter.config_hidden(model.config)
    hidden_b = int(hidden_before if hidden_before is not None else hidden_now)
    by_orig = {}
    for m, orig, h in zip(adapter.mlps(), originals, heads_now):
        mods = [p.module for p in m.ins] + [m.out.module]
        if mode == "mask":
            sel = m.out.module.weight.abs().sum(m.out.out_axis) != 0
            after = int(sel.sum())
            pa = sum(int(torch.count_nonzero(p)) for mod in mods for p in mod.parameters(recurse=False))
        else:
            after = m.width
            pa = _param_count(mods)
        name = m.name.replace(f"{lp}.{m.layer}", f"{lp}.{orig}", 1)
        by_orig[orig] = (name, after, pa, h)
    rows = []
    for i in range(n_before):
        wb, pb, hb = widths_before[i], mlp_params_before[i], heads_before[i] or [None, None]
        if i in by_orig:
            name, after, pa, ha = by_orig[i]
        else:
            name, after, pa, ha = f"{lp}.{i}", 0, 0, [0, 0]
        rows.append({"layer": i, "module": name, "neurons_before": wb, "neurons_after": after,
                     "params_before": pb, "params_after": pa,
                     "pct_removed": round(100.0 * (pb - pa) / pb, 2) if pb else 0.0,
                     "heads_before": hb[0], "heads_after": ha[0], "kv_before": hb[1], "kv_after": ha[1],
                     "dropped": i in dropped})
    total_after = count_nonzero(model) if mode == "mask" else count_params(model)
    totals = {"params_before": params_before_total, "params_after": total_after,
              "pct_removed": round(100.0 * (params_before_total - total_after) / params_before_total, 2),
              "neurons_before": sum(widths_before), "neurons_after": sum(r["neurons_after"] for r in rows),
              "heads_before": sum(r["heads_before"] or 0 for r in rows),
              "heads_after": sum(r["heads_after"] or 0 for r in rows),
              "kv_before": sum(r["kv_before"] or 0 for r in rows),
              "kv_after": sum(r["kv_after"] or 0 for r in rows),
              "hidden_before": hidden_b, "hidden_after": hidden_now, "dropped_blocks": dropped}
    if mode == "mask":
        totals["nonzero_params_after"] = total_after
        totals["stored_params"] = count_params(model)
    return {"mode": mode, "rows": rows, "totals": totals}


def _heads_now(adapter, mode: str) -> list[list[int]]:
    """[query heads, kv groups] per current block; mask mode counts heads with a nonzero o_proj column."""
    if mode != "mask":
        return adapter.head_counts()
    out = []
    for a in adapter.attentions():
        w = a.o.module.weight
        w = w.t() if a.o.transposed else w
        alive = w.abs().sum(0).view(a.n_heads, a.head_dim).sum(1) != 0
        groups = int(alive.view(a.n_kv, -1).any(1).sum()) if a.n_kv else 0
        out.append([int(alive.sum()), groups])
    return out


def mlp_param_counts(model, nonzero: bool = False) -> list[int]:
    """Parameters of each MLP (nonzero ones only with `nonzero`: the mask mode's measure)."""
    adapter = adapters_mod.for_model(model)
    if not nonzero:
        return [_param_count([p.module for p in m.ins] + [m.out.module]) for m in adapter.mlps()]
    return [sum(int(torch.count_nonzero(t)) for mod in [p.module for p in m.ins] + [m.out.module]
                for t in mod.parameters(recurse=False)) for m in adapter.mlps()]
