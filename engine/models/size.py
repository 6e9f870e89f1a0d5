"""Parameter counts: stored (structural pruning shrinks it) and nonzero (mask pruning zeroes)."""

from __future__ import annotations


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model) -> int:
    import torch

    return sum(int(torch.count_nonzero(p)) for p in model.parameters())
