"""Sensitivity-guided allocation: how much each layer can lose, measured on calibration loss.

For every layer alone we prune a probe fraction (same criterion and compensation as the
real run) and measure the rise in calibration loss, Δ_l. Modelling each layer's damage
as Δ_l(r) = c_l · r² (c_l = Δ_l / probe²) and layers as additive, the ratios that remove
the requested share of neurons at the least total damage are r_l ∝ w_l / c_l
(Lagrange), capped so no layer is cut below its minimum width or beyond `max_ratio`.
"""

from __future__ import annotations

import torch

from . import adapters as adapters_mod
from . import compensate, criteria
from .calibrate import Stats
from .errors import MinigptError


@torch.no_grad()
def measure(model, stats: Stats, blocks: torch.Tensor, criterion: str, method: str, damping: float,
            probe: float, batch_size: int = 4, seed: int = 0, progress=None) -> list[float]:
    """Δ calibration loss (nats/token) when only layer l loses `probe` of its neurons.

    The model is restored after each trial (bias compensation may leave zero biases).
    """
    from .evaluate import perplexity

    ids = blocks.flatten()
    bs = blocks.shape[1]

    def nll() -> float:
        return perplexity(model, ids, bs, 0, batch_size)["nll"]

    if method == "bias":
        compensate.ensure_out_bias(model)
    mlps = adapters_mod.for_model(model).mlps()
    base = nll()
    out = []
    for i, m in enumerate(mlps):
        scores = criteria.layer_scores(m, stats, i, criterion, seed, damping)
        k = max(1, m.width - int(round(probe * m.width)))
        keep = torch.sort(torch.argsort(scores, descending=True, stable=True)[:k]).values
        w = m.out.module.weight.data.clone()
        b = None if m.out.bias is None else m.out.bias.data.clone()
        compensate.compensate_layer(m, keep, stats, i, method, damping)
        out.append(nll() - base)
        m.out.module.weight.data.copy_(w)
        if b is not None:
            m.out.bias.data.copy_(b)
        if progress:
            progress(i + 1, len(mlps))
    return out


def allocate(sens: list[float], widths: list[int], ratio: float, probe: float, min_keep: int,
             max_ratio: float) -> list[int]:
    """Neurons to keep per layer: minimise Σ c_l r_l² subject to Σ w_l r_l = ratio · Σ w_l."""
    w = torch.tensor(widths, dtype=torch.float64)
    c = torch.tensor(sens, dtype=torch.float64).clamp_min(1e-9) / probe ** 2
    cap = torch.minimum(1.0 - min_keep / w, torch.full_like(w, max_ratio)).clamp_min(0.0)
    target = ratio * float(w.sum())
    if target > float((cap * w).sum()) + 1e-9:
        raise MinigptError(f"prune.ratio = {ratio:g} cannot be reached with every layer pruned at most "
                           f"{max_ratio:g}", "lower prune.ratio or raise prune.sensitivity_max_ratio")
    lo, hi = 0.0, 1.0
    while float((torch.minimum(cap, hi * w / c) * w).sum()) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((torch.minimum(cap, mid * w / c) * w).sum()) < target:
            lo = mid
        else:
            hi = mid
    remove = torch.minimum(cap, hi * w / c) * w
    n = remove.floor()
    # largest remainders take the leftover neurons, so the total is exactly the target
    extra = int(round(target)) - int(n.sum())
    for j in torch.argsort(remove - n, descending=True, stable=True)[:max(extra, 0)].tolist():
        n[j] += 1
    return [int(wi) - int(ni) for wi, ni in zip(widths, n)]
