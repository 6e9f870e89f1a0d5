"""Removing whole decoder blocks (ShortGPT's depth axis).

Blocks are ranked by block influence, the mean over tokens of 1 − cos(block input, block
output) (`engine.prune.structure.collect`: block.influence), or by the measured rise of the
loss on held-out blocks when each is removed alone (`loss_rise`, a probe: the model is put
back after each). `apply` removes blocks for real: the block list shrinks, the config's layer
count and its per-layer lists (layer_types, the recorded MLP widths and head counts) follow,
and every module's `layer_idx` (the KV cache's slot) is renumbered. The result loads with
stock `AutoModelForCausalLM` when the rest of the model does.
"""

from __future__ import annotations

import contextlib
import time

import torch

from engine.errors import MinigptError
from engine.models import adapters as adapters_mod
from engine.models.export import HEADS_KEY, WIDTHS_KEY
from engine.prune import structure

CRITERIA = ("influence", "loss")


def influence(stats: dict) -> list[float]:
    """Per block, the mean over tokens of 1 − cos(block input, block output)."""
    n = structure.n_tokens(stats)
    return [float(v) / n for v in stats["block.influence"].double()]


@torch.no_grad()
def _loss(model, blocks: torch.Tensor, batch_size: int, tick=None) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, blocks.shape[0], batch_size):
        ids = blocks[s:s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        tgt = ids[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                         reduction="sum"))
        count += tgt.numel()
        if tick:
            tick(ids.numel())
    return total / max(count, 1)


def loss_rise(model, blocks: torch.Tensor, batch_size: int, progress=None) -> list[float]:
    """Per block, held-out loss (nats per token) with that block removed alone, minus the full
    model's. The model is restored after each probe. `progress(done, total, tokens_per_s)` counts
    forward tokens over the (layers + 1) passes."""
    if blocks.numel() == 0:
        raise MinigptError("no held-out tokens for the depth probe", "use a larger corpus")
    adapter = adapters_mod.for_model(model)
    n_layers = len(adapter.layers())
    total = blocks.numel() * (n_layers + 1)
    state = {"done": 0, "t0": time.perf_counter()}

    def tick(n):
        state["done"] += n
        if progress:
            dt = time.perf_counter() - state["t0"]
            progress(state["done"], total, state["done"] / dt if dt > 0 else 0.0)

    base = _loss(model, blocks, batch_size, tick)
    out = []
    for i in range(n_layers):
        with removed(model, [i]):
            out.append(_loss(model, blocks, batch_size, tick) - base)
    return out


def select(scores: list[float], n: int) -> list[int]:
    """The `n` blocks with the lowest scores (least influence / least loss rise), sorted."""
    if not 0 <= n < len(scores):
        raise MinigptError(f"prune.depth = {n} must leave at least one of the {len(scores)} blocks",
                           f"set prune.depth between 0 and {len(scores) - 1}")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:n])


def _renumber(layers: list) -> None:
    for i, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i


def _per_layer_keys(adapter) -> tuple:
    return (*adapter.layer_list_keys, WIDTHS_KEY, HEADS_KEY)


def apply(model, drop: list[int]) -> None:
    """Remove the blocks `drop` (indices into the current blocks), in place."""
    adapter = adapters_mod.check_axis(model, "depth")
    why = adapter.depth_refusal()
    if why:
        raise MinigptError(f"blocks of this {adapter.architecture} model cannot be removed: {why}",
                           "leave prune.depth at 0")
    layers = adapter.layers()
    n = len(layers)
    drop = sorted({int(i) for i in drop})
    if any(i < 0 or i >= n for i in drop) or len(drop) >= n:
        raise MinigptError(f"cannot drop blocks {drop} of {n}", f"drop distinct blocks in [0, {n}), keeping one")
    if not drop:
        return
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    adapter.set_layers(kept)
    _renumber(kept)
    cfg = model.config
    setattr(cfg, adapter.layers_key, len(kept))
    for key in _per_layer_keys(adapter):
        v = getattr(cfg, key, None)
        if isinstance(v, (list, tuple)) and len(v) == n:
            setattr(cfg, key, [x for i, x in enumerate(v) if i not in drop])


@contextlib.contextmanager
def removed(model, drop: list[int]):
    """The model with blocks `drop` removed, put back as it was on exit (a probe)."""
    adapter = adapters_mod.for_model(model)
    layers = adapter.layers()
    cfg = model.config
    saved = {k: getattr(cfg, k) for k in (adapter.layers_key, *_per_layer_keys(adapter)) if hasattr(cfg, k)}
    apply(model, drop)
    try:
        yield model
    finally:
        adapter.set_layers(layers)
        _renumber(layers)
        for k, v in saved.items():
            setattr(cfg, k, v)
