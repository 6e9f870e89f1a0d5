"""Saving and loading Mini-GPTs.

A saved model is a normal HF folder (safetensors + config + tokenizer). The per-layer
MLP widths are recorded in config.json as `minigpt_mlp_widths`. Uniform widths are
also written to the family's own width field, so stock `from_pretrained` loads them;
non-uniform widths (which stock transformers cannot load: it fails, or silently
re-initialises the MLPs with `ignore_mismatched_sizes`) load through `load_model`.
Mask-mode pruning keeps every shape and stores its keep-masks beside the weights
(`save_masks` / `load_masks`). Every write goes through `engine.atomic`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from engine.models import adapters as adapters_mod
from engine import atomic
from engine.errors import MinigptError

WIDTHS_KEY = "minigpt_mlp_widths"
MASKS_FILE = "minigpt_masks.safetensors"
HEADS_KEY = "minigpt_heads"  # [query heads, key/value heads] per layer (engine/prune/heads.py)
# structural vocabulary pruning: the kept ids of the model it was pruned from, in new-id order
# (new id i is old id keep[i]); distillation maps the student's ids to its teacher's with it
VOCAB_KEEP_FILE = "minigpt_vocab_keep.safetensors"


def is_minigpt_model(source: str) -> bool:
    cfg = Path(source) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return WIDTHS_KEY in json.loads(cfg.read_text())
    except ValueError:
        return False


def save_model(model, tokenizer, folder: str | os.PathLike, meta: dict | None = None,
               masks: dict | None = None, vocab_keep=None) -> Path:
    """Write model + tokenizer (+ mask-mode keep-masks, + the kept-vocabulary map of a pruned
    vocabulary) as one folder, atomically (temp folder, fsync, rename; a dead writer's temp is
    removed). An existing folder is replaced whole."""
    folder = Path(folder)
    adapter = adapters_mod.for_model(model)
    widths = adapter.widths()
    cfg = model.config
    adapter.set_config_width(cfg, widths[0] if len(set(widths)) == 1 else max(widths))
    setattr(cfg, WIDTHS_KEY, widths)
    setattr(cfg, HEADS_KEY, adapter.head_counts())
    if meta:
        setattr(cfg, "minigpt", meta)
    model.hf_quantizer = None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if masks:
            save_masks(masks, tmp)
        if vocab_keep is not None:
            save_vocab_keep(vocab_keep, tmp)

    return atomic.write_dir(folder, write)


def save_vocab_keep(keep, folder: str | os.PathLike) -> Path:
    """Write the kept-vocabulary map (new id i = old id keep[i]) into `folder`, atomically."""
    from safetensors.torch import save_file

    t = torch.as_tensor(keep, dtype=torch.int64).to("cpu").contiguous()
    return atomic.write_with(Path(folder) / VOCAB_KEEP_FILE, lambda tmp: save_file({"keep": t}, str(tmp)))


def load_vocab_keep(folder: str | os.PathLike) -> torch.Tensor | None:
    """The kept-vocabulary map saved in `folder` (None: the vocabulary was not pruned)."""
    from safetensors.torch import load_file

    path = Path(folder) / VOCAB_KEEP_FILE
    return load_file(str(path))["keep"] if path.exists() else None


def save_masks(masks: dict, folder: str | os.PathLike) -> Path:
    """Write mask-mode keep-masks ({parameter name: bool tensor}) into `folder`, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.to("cpu").to(torch.uint8).contiguous() for k, v in masks.items()}
    return atomic.write_with(Path(folder) / MASKS_FILE, lambda tmp: save_file(tensors, str(tmp)))


def load_masks(folder: str | os.PathLike) -> dict:
    """The keep-masks saved in `folder` ({} when there are none)."""
    from safetensors.torch import load_file

    path = Path(folder) / MASKS_FILE
    return {k: v.bool() for k, v in load_file(str(path)).items()} if path.exists() else {}


def load_model(folder: str | os.PathLike, dtype=torch.float32, device="cpu"):
    """Load a saved Mini-GPT, whatever its per-layer widths and head counts; logits equal the saved model's."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise MinigptError(f"cannot read saved model {folder}: {e}", "re-export the model") from None
    adapter_cls = adapters_mod.for_config(config)
    widths = getattr(config, WIDTHS_KEY, None)
    heads = getattr(config, HEADS_KEY, None)
    stock_heads = heads is None or all(list(h) == list(adapter_cls.config_heads(config)) for h in heads)
    if (widths is None or len(set(widths)) == 1) and stock_heads:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_cls(model)
    for m, w in zip(adapter.mlps(), widths or []):
        _resize(m, int(w), dtype)
    if not stock_heads:
        for att, (n, kv) in zip(adapter.attentions(), heads):
            _resize_heads(adapter, att, int(n), int(kv), dtype)
    files = sorted(f for f in folder.glob("*.safetensors") if f.name not in (MASKS_FILE, VOCAB_KEEP_FILE))
    if not files:
        raise MinigptError(f"no safetensors weights in {folder}", "re-export the model")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if adapter.is_head_key(k) and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise MinigptError(f"saved model {folder} does not match its config "
                           f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})",
                           "re-export the model")
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def _resize(m: adapters_mod.MLP, width: int, dtype) -> None:
    """Give an MLP's projections the saved width (weights are loaded right after)."""
    for p in m.ins:
        _new_shape(m.owner, p, width, p.out_axis, dtype)
    _new_shape(m.owner, m.out, width, m.out.in_axis, dtype)
    m.record_width(width)


def _resize_heads(adapter, att: adapters_mod.Attention, n: int, kv: int, dtype) -> None:
    """Give an attention module the saved head counts (weights are loaded right after)."""
    d = att.head_dim
    if att.qkv is not None:
        _new_shape(att.owner, att.qkv, 3 * n * d, att.qkv.out_axis, dtype)
    else:
        for p, rows in ((att.q, n * d), (att.k, kv * d), (att.v, kv * d)):
            _new_shape(att.owner, p, rows, p.out_axis, dtype)
    _new_shape(att.owner, att.o, n * d, att.o.in_axis, dtype)
    adapter.set_heads(att, n, kv)


def _new_shape(owner, proj: adapters_mod.Proj, width: int, axis: int, dtype) -> None:
    mod = proj.module
    shape = list(mod.weight.shape)
    shape[axis] = width
    mod.weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
    if getattr(mod, "bias", None) is not None and axis == proj.out_axis:
        mod.bias = torch.nn.Parameter(torch.empty(width, dtype=dtype))
    proj.sync_shape()
