"""One calibration pass for the structural axes: attention heads, hidden channels, whole blocks.

`collect` runs the calibration blocks through the model with hooks and returns plain
tensors (sums over every token; divide by `n_tokens`):

* `attn.{i}.abs`, `attn.{i}.sum`, `attn.{i}.sq` [n_heads·head_dim]: Σ|x|, Σx, Σx² per feature of
  o_proj's input (the heads' outputs, concatenated), `attn.{i}.head_norm` [n_heads]:
  Σ‖head output‖ over tokens (Minitron's head score), `attn.{i}.gram`: Σ x xᵀ (the
  o_proj least-squares refit, as compensate.py refits down_proj);
* `hidden.abs` [hidden]: Σ|norm(x)| per channel over every norm output that feeds a
  projection, `hidden.norms`: how many norms that sums over (Minitron's embedding score is
  hidden.abs / (n_tokens · hidden.norms));
* `block.influence` [layers]: Σ over tokens of 1 − cos(block input, block output) (ShortGPT);
* `n_tokens`.

Hooks never return a value (a returned value would replace the module's input or output).
"""

from __future__ import annotations

import time

import torch

from engine.errors import MinigptError
from engine.models import adapters as adapters_mod


def _hidden_in(args, kwargs):
    x = args[0] if args else kwargs.get("hidden_states")
    return x


def _hidden_out(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def collect(model, blocks: torch.Tensor, batch_size: int, progress=None, gram: bool = True,
            dist=None) -> dict[str, torch.Tensor]:
    """Statistics for heads.scores / hidden.scores / depth.influence and the o_proj refit.

    `blocks` [n, block_size] token ids; `progress(done_tokens, total_tokens, tokens_per_s)`.
    `dist` (an `engine.distributed.Dist`): batch j runs on rank j % world and every sum is
    all-reduced, so each rank returns the statistics of all the blocks.
    """
    if blocks.numel() == 0:
        raise MinigptError("no calibration tokens", "use a larger corpus or a smaller calibrate.block_size")
    adapter = adapters_mod.for_model(model)
    atts = adapter.attentions()
    norms = adapter.norms()
    layers = adapter.layers()
    f64 = torch.float64
    acc: dict[str, torch.Tensor] = {}
    for a in atts:
        w = a.n_heads * a.head_dim
        for k in ("abs", "sum", "sq"):
            acc[f"attn.{a.layer}.{k}"] = torch.zeros(w, dtype=f64)
        acc[f"attn.{a.layer}.head_norm"] = torch.zeros(a.n_heads, dtype=f64)
        if gram:
            acc[f"attn.{a.layer}.gram"] = torch.zeros(w, w, dtype=f64)
    hidden = adapter.config_hidden(model.config)
    acc["hidden.abs"] = torch.zeros(hidden, dtype=f64)
    acc["block.influence"] = torch.zeros(len(layers), dtype=f64)
    handles = []

    def o_hook(a):
        pre = f"attn.{a.layer}."

        def hook(module, args):  # reduced on the model's device, in float64, then summed on the CPU
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(f64)
            acc[pre + "abs"].add_(x.abs().sum(0).cpu())
            acc[pre + "sum"].add_(x.sum(0).cpu())
            acc[pre + "sq"].add_((x * x).sum(0).cpu())
            acc[pre + "head_norm"].add_(x.view(x.shape[0], -1, a.head_dim).norm(dim=-1).sum(0).cpu())
            if gram:
                acc[pre + "gram"].add_((x.t() @ x).cpu())

        return hook

    def norm_hook(module, args, output):
        y = _hidden_out(output).detach()
        acc["hidden.abs"].add_(y.reshape(-1, y.shape[-1]).to(f64).abs().sum(0).cpu())

    def block_hook(i):
        def hook(module, args, kwargs, output):
            x = _hidden_in(args, kwargs).detach()
            y = _hidden_out(output).detach()
            x, y = x.reshape(-1, x.shape[-1]).to(f64), y.reshape(-1, y.shape[-1]).to(f64)
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
            acc["block.influence"][i] += float((1.0 - cos).sum())

        return hook

    try:
        for a in atts:
            handles.append(a.o.module.register_forward_pre_hook(o_hook(a)))
        for _, mod in norms:
            handles.append(mod.register_forward_hook(norm_hook))
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        device = next(model.parameters()).device
        total, done, t0 = blocks.numel(), 0, time.perf_counter()
        starts = list(range(0, blocks.shape[0], batch_size))
        for s in (dist.shard(starts) if dist is not None else starts):
            batch = blocks[s:s + batch_size]
            model(input_ids=batch.to(device), use_cache=False)
            done += batch.numel()
            if progress:
                dt = time.perf_counter() - t0
                w = dist.world if dist is not None else 1  # this rank's share × world: near enough
                progress(min(total, done * w), total, done * w / dt if dt > 0 else 0.0)
    finally:
        for h in handles:
            h.remove()
    if dist is not None and dist.on:
        dist.all_sum(acc.values())
    acc["hidden.norms"] = torch.tensor(len(norms), dtype=torch.long)
    acc["n_tokens"] = torch.tensor(int(blocks.numel()), dtype=torch.long)
    return acc


def n_tokens(stats: dict) -> int:
    return int(stats["n_tokens"])


def attn_mean(stats: dict, layer: int) -> torch.Tensor:
    """E[x] of o_proj's input (float64)."""
    return stats[f"attn.{layer}.sum"].double() / n_tokens(stats)


def attn_gram(stats: dict, layer: int) -> torch.Tensor | None:
    """E[x xᵀ] of o_proj's input (float64), or None when not collected."""
    g = stats.get(f"attn.{layer}.gram")
    return None if g is None else g.double() / n_tokens(stats)
