"""Removing hidden (residual-stream) channels: one channel set for the whole model (Minitron).

A channel is one coordinate of the residual stream: a column of the token embedding (and of
a tied LM head), one entry of every norm, an input column of every projection that reads the
stream (q, k, v, gate, up, the LM head) and an output row of every projection that writes it
(o_proj, down_proj, with their bias entries). The adapter lists them
(`Adapter.residual_readers` / `residual_writers` / `norms`). The result has one width
everywhere, so stock `AutoModelForCausalLM` loads it (config.hidden_size shrinks; head_dim
is written explicitly, since the stock fallback hidden // heads would change).

RMSNorm divides by the rms over the channels it sees: with n' of n channels left, the norm
gains (weight, or 1 + weight for Gemma: `Adapter.norm_offset`) are multiplied by sqrt(n/n') and the epsilon (config and modules) by n/n', so
removing channels that are zero leaves every norm's output, and so the logits, unchanged.
Where the config's epsilon also serves norms off the residual stream (Qwen3's per-head q/k
norms) it is left as it is: then the cut is exact up to a relative change of about
eps·(n/n' − 1)/(2·mean x²).

Gemma multiplies the embedding by sqrt(hidden_size) of its config: its adapter's `set_hidden`
folds the change of that factor into the embedding rows (and out of the final norm's gain when
the LM head is tied), so the embedding output stays as it was (checked after every cut) and the
result still loads stock.

Families whose norms are LayerNorm (OPT, Phi, GPT-2: the mean is subtracted over every channel,
so no rescaling makes a cut exact) are refused with a one-line error naming the supported ones.
Scores: the mean |norm(x)| per channel over every norm output that feeds a projection
(`engine.prune.structure.collect`: hidden.abs).
"""

from __future__ import annotations

import math

import torch

from engine.errors import MinigptError
from engine.models import adapters as adapters_mod
from engine.prune import structure


def scores(model, stats: dict) -> torch.Tensor:
    """One score per hidden channel (float64): mean |norm output| over tokens and norms."""
    adapters_mod.check_axis(model, "hidden")
    return stats["hidden.abs"].double() / (structure.n_tokens(stats) * max(int(stats["hidden.norms"]), 1))


def round_to(model) -> int:
    """The multiple the kept width must be, so the config still validates (transformers 5 wants
    hidden_size % num_attention_heads == 0; SmolLM2: 9)."""
    adapter = adapters_mod.for_model(model)
    return int(getattr(model.config, adapter.heads_key))


def select(scores_: torch.Tensor, ratio: float, round_to: int = 1) -> torch.Tensor:
    """The channels to keep (sorted) when `ratio` of them go; the kept count is rounded down
    to a multiple of `round_to` (at least `round_to`), as engine.prune.budget counts."""
    if not 0.0 <= ratio < 1.0:
        raise MinigptError(f"prune.hidden_ratio = {ratio:g} is outside [0, 1)", "set a fraction such as 0.1")
    n = int(scores_.numel())
    k = n - int(round(ratio * n))
    k = min(n, max(round_to, (k // round_to) * round_to))
    order = torch.argsort(scores_, descending=True, stable=True)[:k]
    return torch.sort(order).values


def _slice_param(mod, name: str, idx: torch.Tensor, axis: int, scale: float = 1.0, offset: float = 0.0) -> None:
    """Slice `mod.name` to `idx` along `axis`; the gain (offset + value) is multiplied by `scale`."""
    p = getattr(mod, name)
    t = p.data.index_select(axis, idx.to(p.device)).clone()
    if scale != 1.0:
        t.add_(offset).mul_(scale).sub_(offset)
    setattr(mod, name, torch.nn.Parameter(t, requires_grad=p.requires_grad))


def _scale_eps(model, adapter, norms, factor: float) -> None:
    """eps' = eps·n/n' makes sqrt(mean' + eps') = sqrt(n/n')·sqrt(mean + eps) exactly. The config
    holds one epsilon for every norm, so only when every norm of the model is a residual one
    (no per-head q/k norms sharing the field); else the epsilon stays (see the module notes)."""
    attr, key = adapter.norm_eps_attr, adapter.norm_eps_key
    if adapter.norm_kind != "rms" or not attr or not key:
        return
    residual = {id(m) for _, m in norms}
    if any(hasattr(m, attr) and id(m) not in residual for m in model.modules()):
        return
    eps = float(getattr(model.config, key)) * factor
    setattr(model.config, key, eps)
    for _, m in norms:
        setattr(m, attr, eps)


@torch.no_grad()
def apply(model, keep: torch.Tensor) -> None:
    """Keep only the hidden channels `keep` (in place), everywhere on the residual stream."""
    from engine.prune.mlp import _slice_proj

    adapter = adapters_mod.check_axis(model, "hidden")
    cfg = model.config
    n = adapter.config_hidden(cfg)
    keep = torch.as_tensor(keep, dtype=torch.long).cpu()
    if keep.numel() == 0 or int(keep.max()) >= n or int(keep.min()) < 0 or torch.unique(keep).numel() != keep.numel():
        raise MinigptError(f"the hidden-channel plan must be distinct ids in [0, {n})", "build it with hidden.select")
    keep = torch.sort(keep).values
    k = int(keep.numel())
    if k == n:
        return
    heads = round_to(model)
    if k % heads:
        raise MinigptError(f"a hidden width of {k} is not a multiple of the config's {heads} attention heads "
                           "(transformers refuses such a config)",
                           f"round the kept width to a multiple of {heads}: hidden.select(..., round_to={heads})")
    emb, head = adapter.embeddings(), model.get_output_embeddings()
    probe = torch.arange(min(8, emb.weight.shape[0]), device=emb.weight.device)
    emb0 = emb(probe).index_select(1, keep.to(probe.device))  # the kept channels' embedding output
    tied = head is not None and head.weight is emb.weight
    readers = adapter.residual_readers()
    writers = adapter.residual_writers()
    norms = adapter.norms()
    _slice_param(emb, "weight", keep, 1)
    for p in readers:
        if tied and p.module is head:
            continue
        _slice_proj(p, keep, p.in_axis)
    if tied:
        head.weight = emb.weight
        head.in_features = k
    for p in writers:
        _slice_proj(p, keep, p.out_axis)
    scale = math.sqrt(n / k) if adapter.norm_kind == "rms" else 1.0
    for _, mod in norms:
        _slice_param(mod, "weight", keep, 0, scale, adapter.norm_offset)
        if getattr(mod, "bias", None) is not None:
            _slice_param(mod, "bias", keep, 0)
    _scale_eps(model, adapter, norms, n / k)
    adapter.set_hidden(k)
    if not torch.allclose(emb(probe), emb0, rtol=1e-5, atol=1e-6 * float(emb0.abs().max().clamp_min(1))):
        raise MinigptError(f"{adapter.architecture}'s embedding output changed with the hidden width "
                           "(a scale computed from hidden_size)",
                           "give its adapter a set_hidden that keeps the original scale")
