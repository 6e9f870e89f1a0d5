"""Neuron importance criteria. Each maps calibration statistics to one score per MLP neuron.

`paper` (the default) is the Mini-GPTs score: mean |activation| over calibration tokens.
"""

from __future__ import annotations

import torch

from .calibrate import Stats
from .errors import MinigptError


def _paper(model, stats: Stats) -> list[torch.Tensor]:
    return [stats.mlp_mean_abs(i).float() for i in stats.mlp_layers()]


CRITERIA = {"paper": _paper}


def scores(model, stats: Stats, criterion: str) -> list[torch.Tensor]:
    if criterion not in CRITERIA:
        raise MinigptError(f"unknown pruning criterion {criterion!r}", f"use one of: {', '.join(CRITERIA)}")
    return CRITERIA[criterion](model, stats)
