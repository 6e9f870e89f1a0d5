"""Layer-by-layer pruning: each layer is calibrated on the outputs of the already pruned ones.

One-shot pruning scores and compensates every layer on the activations of the *full*
model, so later layers are fitted to inputs they will never see. Here the decoder
layers run one at a time on cached hidden states (Wanda/SparseGPT's sequential mode):
for layer l, collect its MLP statistics, choose its neurons, compensate, and produce
the inputs of layer l + 1 (the layer's output minus its old MLP output plus the new one:
no second pass). Compensation aims at the *unpruned* model's layer output, computed
alongside, so each layer also repairs what the layers before it lost. Cost: about two
forward passes over the calibration tokens; memory: two residual streams and one layer's
activations (tokens × (2 hidden + width) × 4 bytes).

Each layer's call arguments (masks, rotary embeddings, positional args) are captured
from one real forward pass per batch shape, so no family-specific code runs the layers.
"""

from __future__ import annotations

import torch

from engine.models import adapters as adapters_mod
from engine.prune import compensate
from engine.prune import criteria
from engine.prune.calibrate import Calibrator, Stats


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
          damping: float, seed: int = 0, progress=None, correct: bool = True) -> list[torch.Tensor]:
    """Choose and compensate each layer's neurons in order; returns the kept indices per layer.

    The model is changed in place: the dropped columns of each `out` are zeroed and the
    kept ones compensated, so it computes the pruned function at full width. With
    `correct`, compensation targets the *unpruned* model's layer output (the MLP output
    that puts the residual stream back where the full model has it), so each layer also
    repairs the error the layers before it left, as far as its kept neurons can.
    """
    adapter = adapters_mod.for_model(model)
    layers, mlps = adapter.layers(), adapter.mlps()
    if method == "bias":
        compensate.ensure_out_bias(model)
    residual = adapter.residual_after_mlp
    correct = correct and method != "none" and residual
    gram = method == "lstsq" or criterion in criteria.NEEDS_GRAM
    batches = [blocks[i:i + batch_size] for i in range(0, blocks.shape[0], batch_size)]
    hidden, calls = capture(model, batches)
    full = list(hidden) if correct else None  # the unpruned model's residual stream
    acc_dtype = torch.float64 if mlps[0].out.module.weight.dtype == torch.float64 else torch.float32
    keep_all = []
    for i, (layer, mlp) in enumerate(zip(layers, mlps)):
        target_out = [run_layer(layer, h, c[i]) for h, c in zip(full, calls)] if correct else None
        cal = Calibrator(model, linears=False, gram=gram, layers=[i])
        cross = t_sum = None
        io: dict = {}
        xs, rest = [], []  # per batch: the MLP's activations, the layer output minus the MLP output
        hooks = []
        if residual:
            hooks.append(mlp.out.module.register_forward_pre_hook(lambda m, a: io.__setitem__("x", a[0])))
            hooks.append(mlp.out.module.register_forward_hook(lambda m, a, o: io.__setitem__("y", o)))
        try:
            with cal:
                for b, (h, c) in enumerate(zip(hidden, calls)):
                    out = run_layer(layer, h, c[i])
                    if not residual:
                        continue
                    xs.append(io["x"])
                    rest.append(out - io["y"].reshape(out.shape))
                    if correct:  # t: the MLP output that would give the full model's layer output
                        x = io["x"].reshape(-1, io["x"].shape[-1]).to(acc_dtype)
                        t = (target_out[b] - rest[-1]).reshape(x.shape[0], -1).to(acc_dtype)
                        ct = (t.t() @ x).double().cpu()
                        cross = ct if cross is None else cross.add_(ct)
                        ts = t.sum(0).double().cpu()
                        t_sum = ts if t_sum is None else t_sum.add_(ts)
        finally:
            for hk in hooks:
                hk.remove()
        n = int(blocks.numel())
        cal.n_tokens = n
        stats = Stats(cal.state(), n)
        scores = criteria.layer_scores(mlp, stats, i, criterion, seed, damping)
        k = min(int(keep_counts[i]), mlp.width)
        keep = torch.sort(torch.argsort(scores, descending=True, stable=True)[:k]).values
        target = (cross / n, t_sum / n) if correct else None
        compensate.compensate_layer(mlp, keep, stats, i, method, damping, target=target)
        if residual:  # only `out` changed: the new output is the rest plus the new MLP output
            hidden = [r + mlp.out.module(x).reshape(r.shape) for r, x in zip(rest, xs)]
        else:
            hidden = [run_layer(layer, h, c[i]) for h, c in zip(hidden, calls)]
        if correct:
            full = target_out
        keep_all.append(keep)
        if progress:
            progress(i + 1, len(layers))
    return keep_all
