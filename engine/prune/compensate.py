"""Compensating for removed MLP neurons by changing the weights that stay.

An MLP's output is y = W x + b, x the neurons' activations (input of down_proj/fc2/c_proj).
Removing the neurons P and keeping K changes it by W_P x_P. Two fixes, both closed-form
from calibration statistics and applied to `out` only, so the saved model keeps its
architecture:

* `bias` (FLAP): b += W_P E[x_P]. The mean output is reproduced exactly; only the
  fluctuation of the removed neurons is lost.
* `lstsq`: refit the kept columns (and the bias, when the projection has one) to
  reproduce the full output on the calibration activations,
  [W_K' c] = W E[x zᵀ] (E[z zᵀ] + λ)⁻¹ with z = [x_K; 1], λ = damping · mean diag E[x_K x_Kᵀ]
  (the constant is not damped). It needs the Gram matrix E[x xᵀ] from calibration.

Bias compensation needs an output bias on every MLP. Where a family has none by default,
its adapter's config switch (`Adapter.mlp_bias_switch`) turns them on with zero biases
(the compensation then lands in `out`), which stock transformers loads; families without
such a switch refuse `bias`.

Every function here works at the full width: the pruned columns of `out` are zeroed, so
the model already computes the pruned function; structural slicing or masks follow.
"""

from __future__ import annotations

import torch

from engine.models import adapters as adapters_mod
from engine.prune.calibrate import Stats
from engine.errors import MinigptError

METHODS = ("none", "bias", "lstsq")


def needs_gram(prune_cfg) -> bool:
    """Whether calibration must collect Gram matrices (sequential mode recomputes its own)."""
    from engine.prune.criteria import NEEDS_GRAM

    return prune_cfg.criterion in NEEDS_GRAM or (prune_cfg.compensation == "lstsq" and not prune_cfg.sequential)


def has_out_bias(mlp: adapters_mod.MLP) -> bool:
    return mlp.out.bias is not None


def ensure_out_bias(model) -> None:
    """Give every MLP an output bias (zeros: the function is unchanged), or fail clearly."""
    adapter = adapters_mod.for_model(model)
    if all(has_out_bias(m) for m in adapter.mlps()):
        return
    if adapter.mlp_bias_switch is None:
        raise MinigptError(f"bias compensation needs an MLP output bias, which {adapter.architecture} models "
                           "cannot store", "use prune.compensation = \"lstsq\" or \"none\" for this model")
    adapter.add_mlp_biases()


def _weight(mlp: adapters_mod.MLP) -> torch.Tensor:
    w = mlp.out.module.weight.detach()
    return (w.t() if mlp.out.transposed else w).double().cpu()


def _set_weight(mlp: adapters_mod.MLP, w: torch.Tensor) -> None:
    p = mlp.out.module.weight
    p.data.copy_((w.t() if mlp.out.transposed else w).to(p.dtype))


def solve(w: torch.Tensor, gram: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor, damping: float,
          with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares refit of the kept columns to the full output W x: (W_K' [out, k], bias change or None).

    w [out, width], gram = E[x xᵀ] [width, width], mean = E[x] [width]; all float64.
    """
    return solve_target(w @ gram.index_select(1, keep), w @ mean, gram, mean, keep, damping, with_bias)


def solve_target(cross: torch.Tensor, target_mean: torch.Tensor, gram: torch.Tensor, mean: torch.Tensor,
                 keep: torch.Tensor, damping: float, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least squares for any target t: min E‖t − W_K' x_K − c‖², given cross = E[t x_Kᵀ] [out, k]
    and target_mean = E[t]. Returns (W_K', c or None)."""
    k = keep.numel()
    g_kk = gram.index_select(0, keep).index_select(1, keep)
    lam = damping * float(g_kk.diagonal().mean().clamp_min(1e-30)) if k else 0.0
    if with_bias:
        a = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        a[:k, :k] = g_kk
        a[:k, k] = a[k, :k] = mean[keep]
        a[k, k] = 1.0
        rhs = torch.cat([cross, target_mean.unsqueeze(1)], 1)
    else:
        a = g_kk.clone()
        rhs = cross
    a.diagonal()[:k] += lam
    try:
        sol = torch.linalg.solve(a, rhs.t()).t()  # a is symmetric
    except RuntimeError:  # torch raises _LinAlgError (a RuntimeError) on singular systems
        raise MinigptError("the least-squares system is singular (kept neurons are linearly dependent)",
                           "raise prune.damping (e.g. 0.01)") from None
    return (sol[:, :k], sol[:, k]) if with_bias else (sol, None)


@torch.no_grad()
def compensate_layer(mlp: adapters_mod.MLP, keep: torch.Tensor, stats: Stats, layer: int, method: str,
                     damping: float, target: tuple | None = None) -> None:
    """Rewrite `out` so the layer with only `keep` approximates the full layer (in place).

    `target` = (E[t xᵀ] [out, width], E[t] [out]) replaces the full layer's own output
    (W x + b) as what to reproduce: sequential mode passes the output that would put the
    residual stream back on the unpruned model's.
    """
    if method not in METHODS:
        raise MinigptError(f"prune.compensation = {method!r} is not valid", f"use one of: {', '.join(METHODS)}")
    keep = keep.cpu().long()
    w = _weight(mlp)
    width = w.shape[1]
    dropped = torch.ones(width, dtype=torch.bool)
    dropped[keep] = False
    bias = mlp.out.bias
    b0 = None if bias is None else bias.detach().double().cpu()
    mean = stats.mlp_mean(layer).double()
    if method == "bias" and (dropped.any() or target is not None):
        if bias is None:
            raise MinigptError("bias compensation needs an output bias on the MLP", "call ensure_out_bias first")
        if target is None:  # b += W_P E[x_P]
            new_b = b0 + w[:, dropped] @ mean[dropped]
        else:  # the constant that best reproduces t with the kept columns as they are
            new_b = target[1] - w[:, keep] @ mean[keep]
        bias.data.copy_(new_b.to(bias.dtype))
    elif method == "lstsq" and (dropped.any() or target is not None):
        gram = stats.mlp_gram(layer)
        if gram is None:
            raise MinigptError("least-squares compensation needs the Gram matrix of the MLP activations",
                               "recalibrate (the Gram matrix is collected when prune.compensation = \"lstsq\")")
        if target is None:
            w_k, db = solve(w, gram, mean, keep, damping, with_bias=bias is not None)
            new_b = None if bias is None else b0 + db
        else:  # without an output bias there is no constant to fit: new_b stays None
            cross, t_mean = target
            w_k, new_b = solve_target(cross.index_select(1, keep), t_mean, gram, mean, keep, damping,
                                      with_bias=bias is not None)
        w[:, keep] = w_k
        if new_b is not None:
            bias.data.copy_(new_b.to(bias.dtype))
    w[:, dropped] = 0.0
    _set_weight(mlp, w)


def apply(model, keep: list[torch.Tensor], stats: Stats, method: str, damping: float) -> None:
    """Compensate every MLP for the neurons outside `keep` (one index tensor per layer)."""
    if method == "bias":
        ensure_out_bias(model)
    for i, (m, k) in enumerate(zip(adapters_mod.for_model(model).mlps(), keep)):
        compensate_layer(m, k, stats, i, method, damping)
