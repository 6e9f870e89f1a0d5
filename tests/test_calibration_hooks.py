"""The calibration hooks' shortcuts (shared Σ|x| per input tensor, reused buffers) change
no bit of the statistics: compare with the plain formulas computed by independent hooks."""

import pytest
import torch

import tiny
from engine.prune.calibrate import _linear_modules, calibrate
from engine.models import adapters


def _reference(model, blocks, batch):
    """Every statistic computed afresh per hook, the straightforward way."""
    acc, handles = {}, []

    def add(key, v):
        acc[key] = acc[key] + v.double() if key in acc else v.double()

    for m in adapters.for_model(model).mlps():
        def pre(mod, args, layer=m.layer):
            x = args[0]
            x = (x if x.dtype == torch.float64 else x.float()).reshape(-1, x.shape[-1])
            add(f"mlp.{layer}.abs", x.abs().sum(0))
            add(f"mlp.{layer}.sum", x.sum(0))
            add(f"mlp.{layer}.sq", (x * x).sum(0))
        handles.append(m.out.module.register_forward_pre_hook(pre))
    for name, mod in _linear_modules(model):
        def post(mod, args, out, name=name):
            add(f"linear.{name}.in_abs", args[0].float().abs().reshape(-1, args[0].shape[-1]).sum(0))
            add(f"linear.{name}.out_abs", out.float().abs().reshape(-1, out.shape[-1]).sum(0))
        handles.append(mod.register_forward_hook(post))
    with torch.no_grad():
        for i in range(0, blocks.shape[0], batch):
            model(input_ids=blocks[i:i + batch], use_cache=False)
    for h in handles:
        h.remove()
    return acc


@pytest.mark.parametrize("family,dtype", [(f, torch.float32) for f in tiny.FAMILIES]
                         + [("llama", torch.float64), ("qwen2", torch.bfloat16)])
def test_hook_statistics_are_bit_identical(family, dtype):
    model = tiny.model(family).to(dtype)
    blocks = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(0))
    ref = _reference(model, blocks, 2)
    got = calibrate(model, blocks, 2).t
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
