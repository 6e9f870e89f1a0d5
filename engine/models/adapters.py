"""Per-architecture adapters: where each part of a model lives.

Everything else in the engine is architecture-agnostic and talks to models only through
an adapter (SliceGPT's design). Adding a family means writing one subclass and listing
its `model_types`.

Convention: the MLP's *neurons* are the intermediate features. They are produced by the
`ins` projections (gate+up, fc1, c_fc: one output feature each) and consumed by `out`
(down, fc2, c_proj: one input feature each). The neuron's activation is the input of
`out`, for gated and plain MLPs alike, so a single forward pre-hook on `out` records the
paper's score for every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.errors import MinigptError


@dataclass
class Proj:
    """A linear map, nn.Linear ([out, in] weight) or GPT-2's Conv1D ([in, out] weight)."""

    name: str
    module: object
    transposed: bool = False  # True for Conv1D

    @property
    def out_axis(self) -> int:
        return 1 if self.transposed else 0

    @property
    def in_axis(self) -> int:
        return 0 if self.transposed else 1

    @property
    def bias(self):
        return getattr(self.module, "bias", None)


@dataclass
class MLP:
    layer: int
    name: str  # module path of the MLP container (for reports)
    owner: object  # the module holding the projections as attributes
    ins: list  # [Proj] producing the neurons (gate, up) / (fc1) / (c_fc)
    out: Proj  # consuming the neurons (down / fc2 / c_proj)
    act_name: str  # attribute of the activation module on `owner`

    @property
    def width(self) -> int:
        w = self.out.module.weight
        return w.shape[self.out.in_axis]


class Adapter:
    model_types: ClassVar[tuple] = ()
    family: ClassVar[str] = ""
    width_key: ClassVar[str] = "intermediate_size"  # the config field of the MLP width
    gated: ClassVar[bool] = False
    layers_path: ClassVar[str] = "model.layers"
    mlp_attr: ClassVar[str] = "mlp"  # attribute of the decoder layer holding the MLP ("" = the layer itself)
    in_names: ClassVar[tuple] = ("fc1",)
    out_name: ClassVar[str] = "fc2"
    act_attr: ClassVar[str] = "activation_fn"
    attn_attr: ClassVar[str] = "self_attn"
    attn_names: ClassVar[tuple] = ("q_proj", "k_proj", "v_proj", "o_proj")
    embed_path: ClassVar[str] = "model.embed_tokens"
    transposed: ClassVar[bool] = False

    def __init__(self, model):
        self.model = model

    # ---- navigation -----------------------------------------------------------
    def layers(self) -> list:
        return list(_get(self.model, self.layers_path))

    def mlps(self) -> list[MLP]:
        out = []
        for i, layer in enumerate(self.layers()):
            owner = getattr(layer, self.mlp_attr) if self.mlp_attr else layer
            name = f"{self.layers_path}.{i}" + (f".{self.mlp_attr}" if self.mlp_attr else "")
            out.append(MLP(
                layer=i, name=name, owner=owner,
                ins=[Proj(f"{name}.{n}", getattr(owner, n), self.transposed) for n in self.in_names],
                out=Proj(f"{name}.{self.out_name}", getattr(owner, self.out_name), self.transposed),
                act_name=self.act_attr,
            ))
        return out

    def attention(self, i: int) -> list[Proj]:
        attn = getattr(self.layers()[i], self.attn_attr)
        return [Proj(f"{self.layers_path}.{i}.{self.attn_attr}.{n}", getattr(attn, n), self.transposed)
                for n in self.attn_names]

    def embeddings(self):
        return self.model.get_input_embeddings()

    def lm_head(self):
        return self.model.get_output_embeddings()

    def widths(self) -> list[int]:
        return [m.width for m in self.mlps()]

    # ---- config ---------------------------------------------------------------
    @classmethod
    def config_width(cls, config) -> int:
        return int(getattr(config, cls.width_key))

    @classmethod
    def set_config_width(cls, config, width: int) -> None:
        setattr(config, cls.width_key, int(width))


class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2/3: gated SiLU MLP (gate_proj, up_proj -> down_proj)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    family = "llama"
    gated = True
    in_names = ("gate_proj", "up_proj")
    out_name = "down_proj"
    act_attr = "act_fn"


class OPTAdapter(Adapter):
    """OPT: ReLU MLP whose fc1/fc2 sit directly on the decoder layer."""

    model_types = ("opt",)
    family = "opt"
    width_key = "ffn_dim"
    layers_path = "model.decoder.layers"
    mlp_attr = ""
    attn_names = ("q_proj", "k_proj", "v_proj", "out_proj")
    embed_path = "model.decoder.embed_tokens"


class PhiAdapter(Adapter):
    """Phi-1/1.5/2: GELU MLP (fc1 -> fc2), attention output named `dense`."""

    model_types = ("phi",)
    family = "phi"
    attn_names = ("q_proj", "k_proj", "v_proj", "dense")


class GPT2Adapter(Adapter):
    """GPT-2: Conv1D projections (weights stored [in, out]), fused c_attn."""

    model_types = ("gpt2",)
    family = "gpt2"
    width_key = "n_inner"
    layers_path = "transformer.h"
    in_names = ("c_fc",)
    out_name = "c_proj"
    act_attr = "act"
    attn_attr = "attn"
    attn_names = ("c_attn", "c_proj")
    embed_path = "transformer.wte"
    transposed = True

    @classmethod
    def config_width(cls, config) -> int:
        return int(config.n_inner or 4 * config.n_embd)


ADAPTERS: tuple = (LlamaAdapter, OPTAdapter, PhiAdapter, GPT2Adapter)


def supported() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def for_config(config) -> type[Adapter]:
    mt = getattr(config, "model_type", None)
    for a in ADAPTERS:
        if mt in a.model_types:
            return a
    raise MinigptError(f"architecture {mt!r} is not supported",
                       f"supported model types: {', '.join(supported())} (add one by writing an adapter in engine/models/adapters.py)")


def for_model(model) -> Adapter:
    return for_config(model.config)(model)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
