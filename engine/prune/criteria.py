"""Neuron importance criteria. Each maps calibration statistics to one score per MLP neuron.

Low scores are pruned first. `paper` (the default) is the Mini-GPTs score, mean
|activation| over the calibration tokens. The others estimate how much the layer's
output changes when the neuron goes, under each compensation:

* `wanda`: ‖W_out[:, j]‖ · ‖x_j‖₂ — the output energy lost when nothing compensates;
* `fluctuation` (FLAP): Var(x_j) · ‖W_out[:, j]‖² — what is left once the neuron's mean
  is folded into the bias (bias compensation);
* `obs`: ‖W_out[:, j]‖² / [G⁻¹]_jj — the error left after the other neurons are refit by
  least squares (optimal brain surgeon for one input column; needs the Gram matrix).

`magnitude` (data-free) and `random` (seeded) are the baselines.
"""

from __future__ import annotations

import torch

from engine.models import adapters as adapters_mod
from engine.prune.calibrate import Stats
from engine.errors import MinigptError

NEEDS_GRAM = ("obs",)


def _out_cols(mlp: adapters_mod.MLP) -> torch.Tensor:
    """down_proj/fc2 weight as [hidden_out, neurons], whatever the module layout."""
    w = mlp.out.module.weight.detach()
    return (w.t() if mlp.out.transposed else w).double()


def _paper(mlp, stats: Stats, layer: int, seed: int, damping: float) -> torch.Tensor:
    return stats.mlp_mean_abs(layer)


def _rms(mlp, stats: Stats, layer: int, seed: int, damping: float) -> torch.Tensor:
    return stats.mlp_mean_sq(layer).clamp_min(0).sqrt()


def _random(mlp, stats: Stats, layer: int, seed: int, damping: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.rand(mlp.width, generator=g, dtype=torch.float64)


def _magnitude(mlp, stats: Stats, layer: int, seed: int, damping: float) -> torch.Tensor:
    sq = _out_cols(mlp).pow(2).sum(0)
    for p in mlp.ins:
        w = p.module.weight.detach().double()
        sq = sq + w.pow(2).sum(p.in_axis)
    return sq.sqrt()


def _wanda(mlp, stats: Stats, layer: int, seed: int, damping: float) -> torch.Tensor:
    return _out_cols(mlp).norm(dim=0).cpu() * stats.mlp_mean_sq(layer).clamp_min(0).sqrt()


def _fluctuation(mlp, stats: Stats, layer: int, seed: int, damping: float) -> torch.Tensor:
    var = (stats.mlp_mean_sq(layer) - stats.mlp_mean(layer).pow(2)).clamp_min(0)
    return var * _out_cols(mlp).pow(2).sum(0).cpu()


def _obs(mlp, stats: Stats, layer: int, seed: int, damping: float) -> torch.Tensor:
    g = stats.mlp_gram(layer)
    if g is None:
        raise MinigptError("prune.criterion = 'obs' needs the Gram matrix of the MLP activations",
                           "recalibrate with it (minigpt calibrate SESSION; it is collected for obs/lstsq)")
    g = g.double().clone()
    g.diagonal().add_(max(damping, 1e-6) * float(g.diagonal().mean().clamp_min(1e-12)))
    hinv_diag = torch.cholesky_inverse(torch.linalg.cholesky(g)).diagonal()
    return _out_cols(mlp).pow(2).sum(0).cpu() / hinv_diag


CRITERIA = {"paper": _paper, "rms": _rms, "random": _random, "magnitude": _magnitude, "wanda": _wanda,
            "fluctuation": _fluctuation, "obs": _obs}


def layer_scores(mlp: adapters_mod.MLP, stats: Stats, layer: int, criterion: str, seed: int = 0,
                 damping: float = 0.01) -> torch.Tensor:
    if criterion not in CRITERIA:
        raise MinigptError(f"unknown pruning criterion {criterion!r}", f"use one of: {', '.join(CRITERIA)}")
    return CRITERIA[criterion](mlp, stats, layer, seed, damping).double().cpu()


def scores(model, stats: Stats, criterion: str, seed: int = 0, damping: float = 0.01) -> list[torch.Tensor]:
    """One float64 score per neuron, for every MLP layer of `model` (in layer order)."""
    mlps = adapters_mod.for_model(model).mlps()
    return [layer_scores(mlps[i], stats, i, criterion, seed, damping) for i in stats.mlp_layers()]
