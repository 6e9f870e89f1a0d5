"""Layer-by-layer pruning: each layer is calibrated on the outputs of the already pruned ones.

One-shot pruning scores and compensates every layer on the activations of the *full*
model, so later layers are fitted to inputs they will never see. Here the decoder
layers run one at a time on cached hidden states (Wanda/SparseGPT's sequential mode):
for layer l, collect its MLP statistics, choose its neurons, compensate, then rerun it
to produce the inputs of layer l + 1. Cost: about two forward passes over the
calibration tokens, plus the hidden states (tokens × hidden × 4 bytes) in memory.

Each layer's call arguments (masks, rotary embeddings, positional args) are captured
from one real forward pass per batch shape, so no family-specific code runs the layers.
"""

from __future__ import annotations

import torch

from . import adapters as adapters_mod
from . import compensate, criteria
from .calibrate import Calibrator, Stats


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model, batches: list[torch.Tensor]):
    """Layer-0 inputs of every batch, and each layer's other call arguments per batch shape."""
    layers = adapters_mod.for_model(model).layers()
    device = next(model.parameters()).device
    calls: dict[tuple, list] = {}
    hidden: list[torch.Tensor] = []

    def record(store):
        def hook(module, args, kwargs):
            store.append((args, kwargs))
        return hook

    for b in batches:
        shape = tuple(b.shape)
        if shape not in calls:  # one full pass records every layer's arguments
            store: list = []
            hs = [layer.register_forward_pre_hook(record(store), with_kwargs=True) for layer in layers]
            try:
                model(input_ids=b.to(device), use_cache=False)
            finally:
                for h in hs:
                    h.remove()
            calls[shape] = [(a[1:], k) for a, k in store]
            hidden.append(store[0][0][0])
            continue
        first: list = []

        def stop(module, args, kwargs):
            first.append(args[0])
            raise _Stop

        h = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            model(input_ids=b.to(device), use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
        hidden.append(first[0])
    return hidden, [calls[tuple(b.shape)] for b in batches]


def run_layer(layer, hidden: torch.Tensor, call) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prune(model, keep_counts: list[int], blocks: torch.Tensor, batch_size: int, criterion: str, method: str,
          damping: float, seed: int = 0, progress=None) -> list[torch.Tensor]:
    """Choose and compensate each layer's neurons in order; returns the kept indices per layer.

    The model is changed in place: the dropped columns of each `out` are zeroed and the
    kept ones compensated, so it computes the pruned function at full width.
    """
    adapter = adapters_mod.for_model(model)
    layers, mlps = adapter.layers(), adapter.mlps()
    if method == "bias":
        compensate.ensure_out_bias(model)
    gram = method == "lstsq" or criterion in criteria.NEEDS_GRAM
    batches = [blocks[i:i + batch_size] for i in range(0, blocks.shape[0], batch_size)]
    hidden, calls = capture(model, batches)
    keep_all = []
    for i, (layer, mlp) in enumerate(zip(layers, mlps)):
        cal = Calibrator(model, linears=False, gram=gram, layers=[i])
        with cal:
            for h, c in zip(hidden, calls):
                run_layer(layer, h, c[i])
        cal.n_tokens = int(blocks.numel())
        stats = Stats(cal.state(), cal.n_tokens)
        scores = criteria.layer_scores(mlp, stats, i, criterion, seed, damping)
        k = min(int(keep_counts[i]), mlp.width)
        keep = torch.sort(torch.argsort(scores, descending=True, stable=True)[:k]).values
        compensate.compensate_layer(mlp, keep, stats, i, method, damping)
        hidden = [run_layer(layer, h, c[i]) for h, c in zip(hidden, calls)]
        keep_all.append(keep)
        if progress:
            progress(i + 1, len(layers))
    return keep_all
