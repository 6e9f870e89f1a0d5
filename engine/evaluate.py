"""Held-out evaluation: perplexity (token-level) on document-disjoint held-out text."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, block_size: int, stride: int = 0, batch_size: int = 4,
               progress=None) -> dict:
    """Token-level perplexity of a 1-D id stream.

    stride = 0: non-overlapping blocks (each block's first token is not predicted).
    stride > 0: sliding windows of `block_size` advanced by `stride`; each window scores
    only the tokens not scored before, with up to block_size - stride tokens of context.
    """
    device = next(model.parameters()).device
    ids = ids.flatten()
    windows = []  # (start, end, first scored position within the window)
    if stride <= 0:
        n = ids.numel() // block_size
        windows = [(i * block_size, (i + 1) * block_size, 1) for i in range(n)]
    else:
        prev_end = 0
        for start in range(0, max(ids.numel() - 1, 1), stride):
            end = min(start + block_size, ids.numel())
            if end - start < 2:
                break
            windows.append((start, end, max(prev_end - start, 1)))
            prev_end = end
            if end == ids.numel():
                break
    if not windows:
        raise ValueError(f"{ids.numel()} held-out tokens are fewer than one block of {block_size}")
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for b in range(0, len(windows), batch_size):
        group = windows[b:b + batch_size]
        L = max(e - s for s, e, _ in group)
        x = torch.zeros(len(group), L, dtype=torch.long)
        mask = torch.zeros(len(group), L, dtype=torch.long)
        labels = torch.full((len(group), L), -100, dtype=torch.long)
        for r, (s, e, first) in enumerate(group):
            x[r, : e - s] = ids[s:e]
            mask[r, : e - s] = 1
            labels[r, first: e - s] = ids[s + first: e]
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False).logits
        lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1).to(device), ignore_index=-100, reduction="sum")
        nll += float(lp)
        count += int((labels[:, 1:] != -100).sum())
        if progress:
            dt = time.perf_counter() - t0
            done = sum(e - s for s, e, _ in windows[: b + len(group)])
            progress(done, sum(e - s for s, e, _ in windows), done / dt if dt else 0.0)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "protocol": {"block_size": block_size, "stride": stride, "tokens": count, "windows": len(windows)}}
