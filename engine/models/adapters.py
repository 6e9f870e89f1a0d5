"""Per-architecture adapters: where each part of a model lives, and every other family fact.

Everything else in the engine is architecture-agnostic and talks to models only through
an adapter (SliceGPT's design): module names, GPT-2's transposed Conv1D layout, the
config fields of the MLP width and of the context length, the switch that gives an MLP
biases, what LoRA must be told about the layout, and the block structure sequential
pruning relies on. Adding a family means writing one subclass and listing its
`model_types`; `tests/test_family_facts.py` fails if a family name or a model type
appears anywhere else in `engine/`.

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

DEFAULT_CONTEXT = 2048  # tokens, when a config names no context length
GGUF_BYTE_LEVEL_BPE = "gpt2"  # llama.cpp's tokenizer model for byte-level BPE, named after GPT-2's


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

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[self.in_axis]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[self.out_axis]

    def sync_shape(self) -> None:
        """Record the weight's current shape on the module, after its weight was replaced."""
        mod = self.module
        if self.transposed:  # Conv1D keeps nf = output features
            mod.nf = mod.weight.shape[1]
        else:
            mod.out_features, mod.in_features = mod.weight.shape


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

    def record_width(self, width: int) -> None:
        """Tell the MLP module its new width, where it keeps one (Llama-style `intermediate_size`)."""
        if hasattr(self.owner, "intermediate_size"):
            self.owner.intermediate_size = int(width)


@dataclass
class Attention:
    """One layer's attention, as head pruning sees it. The heads' outputs are concatenated in
    the input of `o` (head h: features h*head_dim ... (h+1)*head_dim); query head h reads
    key/value head h // group (GQA's repeat_kv). `q`, `k`, `v` are separate projections, or
    None where the family fuses them (`qkv`: GPT-2's c_attn, [q | k | v] along its outputs)."""

    layer: int
    name: str  # module path of the attention module
    owner: object  # the attention module
    q: Proj | None
    k: Proj | None
    v: Proj | None
    qkv: Proj | None
    o: Proj
    head_dim: int

    @property
    def n_heads(self) -> int:
        return self.o.in_features // self.head_dim

    @property
    def n_kv(self) -> int:
        if self.qkv is not None:
            return self.n_heads  # fused families have no GQA
        return self.k.out_features // self.head_dim

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // max(self.n_kv, 1)


@dataclass
class GgufSpec:
    """A model as llama.cpp sees it (engine/models/gguf.py writes it). Tensors are the model's
    own, in HF layout ([out, in]); per-layer head counts follow from the q/k row counts
    (0 rows: attention removed), the MLP width from ffn_down's columns (0: MLP removed)."""

    arch: str  # llama.cpp architecture for one shape in every layer
    per_layer_arch: str | None  # ... for per-layer widths and head counts (None: none)
    rope_interleave: bool  # q/k rows permuted from HF's rotate-half order to llama.cpp's pairs
    context_length: int
    hidden: int
    head_dim: int
    n_head: int
    n_kv: int
    norm_eps: float
    rope_theta: float
    embed: object
    out_norm: object
    head: object | None  # None: tied to the embedding
    layers: list  # per layer {llama.cpp tensor suffix: tensor}
    name: str = ""


class Adapter:
    model_types: ClassVar[tuple] = ()
    family: ClassVar[str] = ""
    width_key: ClassVar[str] = "intermediate_size"  # the config field of the MLP width
    context_keys: ClassVar[tuple] = ("max_position_embeddings",)  # config fields of the context length
    bias_switches: ClassVar[dict] = {}  # model type -> config flag that gives every MLP projection a bias
    gated: ClassVar[bool] = False
    layers_path: ClassVar[str] = "model.layers"
    mlp_attr: ClassVar[str] = "mlp"  # attribute of the decoder layer holding the MLP ("" = the layer itself)
    in_names: ClassVar[tuple] = ("fc1",)
    out_name: ClassVar[str] = "fc2"
    act_attr: ClassVar[str] = "activation_fn"
    attn_attr: ClassVar[str] = "self_attn"
    attn_names: ClassVar[tuple] = ("q_proj", "k_proj", "v_proj", "o_proj")
    embed_path: ClassVar[str] = "model.embed_tokens"
    head_path: ClassVar[str] = "lm_head"
    transposed: ClassVar[bool] = False
    # ---- compression axes (engine/prune/heads.py, hidden.py, depth.py) ----
    axes: ClassVar[tuple] = ("mlp", "heads", "depth", "vocab")  # what this family can prune
    gqa: ClassVar[bool] = True  # separate k/v projections with their own head count
    heads_in_config: ClassVar[bool] = True  # a uniform head count loads stock (the model reads config.head_dim)
    heads_key: ClassVar[str] = "num_attention_heads"
    kv_heads_key: ClassVar[str | None] = "num_key_value_heads"
    head_dim_key: ClassVar[str | None] = "head_dim"
    layers_key: ClassVar[str] = "num_hidden_layers"
    layer_list_keys: ClassVar[tuple] = ("layer_types",)  # config lists with one entry per block
    # the norms whose outputs feed projections: per block (attribute names) and the final one
    norm_kind: ClassVar[str] = "layer"  # "rms" (RMSNorm) | "layer" (LayerNorm)
    block_norms: ClassVar[tuple] = ()
    final_norm_path: ClassVar[str] = ""
    norm_eps_key: ClassVar[str] = ""  # config field of the norms' epsilon
    norm_eps_attr: ClassVar[str] = ""  # ... and the norm module's attribute holding it
    norm_offset: ClassVar[float] = 0.0  # a norm's gain is (offset + weight): Gemma stores weight - 1
    logit_softcap_key: ClassVar[str | None] = None  # config field of a tanh cap on the logits (None: none)
    # added tokens the family's tokenizers reserve as placeholders the model was never trained on
    # (a full-match regex; None: none): vocabulary pruning does not keep them as "special"
    reserved_tokens: ClassVar[str | None] = None

    def __init__(self, model):
        self.model = model

    @property
    def architecture(self) -> str:
        """The model's HF model type, for messages."""
        return str(getattr(self.model.config, "model_type", None))

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

    def linears(self) -> list[Proj]:
        """Every linear map of the model (lm_head included), in `named_modules` order."""
        import torch

        extra = self._transposed_linear_types()
        out = []
        for name, mod in self.model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out.append(Proj(name, mod, False))
            elif extra and isinstance(mod, extra):
                out.append(Proj(name, mod, True))
        return out

    @classmethod
    def _transposed_linear_types(cls) -> tuple:
        """Module classes of linear maps stored [in, out] (none, but in GPT-2)."""
        return ()

    def embeddings(self):
        return self.model.get_input_embeddings()

    def lm_head(self):
        return self.model.get_output_embeddings()

    def is_head_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to the LM head (which a tied checkpoint leaves out)."""
        return key.startswith(self.head_path + ".")

    def widths(self) -> list[int]:
        return [m.width for m in self.mlps()]

    # ---- attention heads (engine/prune/heads.py) ---------------------------------
    def attentions(self) -> list[Attention]:
        out = []
        for i, layer in enumerate(self.layers()):
            attn = getattr(layer, self.attn_attr)
            name = f"{self.layers_path}.{i}.{self.attn_attr}"
            projs = [Proj(f"{name}.{n}", getattr(attn, n), self.transposed) for n in self.attn_names]
            q, k, v, o = projs
            out.append(Attention(i, name, attn, q, k, v, None, o, int(attn.head_dim)))
        return out

    def head_counts(self) -> list[list[int]]:
        """[query heads, key/value heads] per layer, as the weights hold them."""
        return [[a.n_heads, a.n_kv] for a in self.attentions()]

    def set_heads(self, att: Attention, n_heads: int, n_kv: int) -> None:
        """Tell an attention module its head counts after its projections were sliced."""
        mod = att.owner
        if hasattr(mod, "num_key_value_groups"):
            mod.num_key_value_groups = n_heads // max(n_kv, 1)
        if hasattr(mod, "num_heads"):
            mod.num_heads = n_heads

    @classmethod
    def config_heads(cls, config) -> tuple[int, int]:
        n = int(getattr(config, cls.heads_key))
        kv = getattr(config, cls.kv_heads_key, None) if cls.kv_heads_key else None
        return n, int(kv or n)

    @classmethod
    def config_head_dim(cls, config) -> int:
        hd = getattr(config, cls.head_dim_key, None) if cls.head_dim_key else None
        return int(hd or cls.config_hidden(config) // int(getattr(config, cls.heads_key)))

    @classmethod
    def can_store_heads(cls, config, n_heads: int) -> bool:
        """Whether one head count in every layer can go into the config fields and load stock:
        the family reads head_dim from its config, and its config validation (transformers 5:
        hidden_size a multiple of num_attention_heads) accepts the count."""
        return cls.heads_in_config and cls.config_hidden(config) % int(n_heads) == 0

    @classmethod
    def set_config_heads(cls, config, n_heads: int, n_kv: int) -> None:
        """One head count in every layer, in the family's own fields (head_dim made explicit, since
        the stock fallback hidden // heads would change). Only where `heads_in_config`."""
        hd = cls.config_head_dim(config)
        setattr(config, cls.head_dim_key, hd)
        setattr(config, cls.heads_key, int(n_heads))
        if cls.kv_heads_key:
            setattr(config, cls.kv_heads_key, int(n_kv))

    # ---- hidden width (engine/prune/hidden.py) ----------------------------------
    @classmethod
    def config_hidden(cls, config) -> int:
        return int(config.hidden_size)

    def norms(self) -> list[tuple[str, object]]:
        """(name, module) of every norm whose output feeds a projection (blocks', then the final one)."""
        out = []
        for i, layer in enumerate(self.layers()):
            out += [(f"{self.layers_path}.{i}.{n}", getattr(layer, n)) for n in self.block_norms]
        if self.final_norm_path:
            out.append((self.final_norm_path, _get(self.model, self.final_norm_path)))
        return out

    def residual_readers(self) -> list[Proj]:
        """Projections whose input is (a norm of) the residual stream; the LM head last."""
        raise MinigptError(f"hidden-width pruning of {self.architecture} models is not supported",
                           f"supported model types: {', '.join(supported_axis('hidden'))}")

    def residual_writers(self) -> list[Proj]:
        """Projections whose output is added to the residual stream."""
        raise MinigptError(f"hidden-width pruning of {self.architecture} models is not supported",
                           f"supported model types: {', '.join(supported_axis('hidden'))}")

    def embedding_scale(self, config) -> float:
        """The factor the family's stock code multiplies token embeddings by, computed from the
        config (Gemma: sqrt(hidden_size)). Hidden pruning keeps the *effective* scale as it was
        (`set_hidden` folds any change into the weights); engine.prune.hidden checks it."""
        return 1.0

    def tree_mask(self, allowed, positions):
        """The `attention_mask` for a custom mask: `allowed` [B, L, L] (query, key) bool, with
        `positions` [B, L] the position ids. Stock models take one additive 4D mask for every layer."""
        import torch

        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype)
        return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    def logit_softcap(self) -> float | None:
        """The cap of the family's logits (logits = cap·tanh(logits / cap)), None where there is
        none: the engine's chunked LM head applies it as the model's forward would."""
        if not self.logit_softcap_key:
            return None
        v = getattr(self.model.config, self.logit_softcap_key, None)
        return float(v) if v else None

    def set_hidden(self, width: int) -> None:
        """Record the hidden width on the config and on modules that keep it."""
        cfg = self.model.config
        if self.head_dim_key:
            setattr(cfg, self.head_dim_key, self.config_head_dim(cfg))  # explicit before hidden changes
        cfg.hidden_size = int(width)
        emb = self.embeddings()
        emb.embedding_dim = int(width)
        for layer in self.layers():
            if hasattr(layer, "hidden_size"):
                layer.hidden_size = int(width)
            for mod in layer.modules():
                if hasattr(mod, "hidden_size") and isinstance(getattr(mod, "hidden_size"), int):
                    mod.hidden_size = int(width)

    # ---- depth (engine/prune/depth.py) ------------------------------------------
    def set_layers(self, layers: list) -> None:
        """Replace the decoder blocks with `layers` (a list of the model's own block modules)."""
        import torch

        parent_path, _, attr = self.layers_path.rpartition(".")
        setattr(_get(self.model, parent_path), attr, torch.nn.ModuleList(layers))

    def depth_refusal(self) -> str | None:
        """Why this model's blocks cannot be removed (None: they can)."""
        return None

    # ---- block structure ------------------------------------------------------
    @property
    def residual_after_mlp(self) -> bool:
        """True when a layer's output is (everything else) + MLP output: pre-norm blocks."""
        return True

    # ---- MLP biases (bias compensation) ---------------------------------------
    @property
    def mlp_bias_switch(self) -> str | None:
        """The config flag that makes stock transformers build MLP biases (None: there is none)."""
        return self.bias_switches.get(getattr(self.model.config, "model_type", None))

    @property
    def supports_bias_compensation(self) -> bool:
        """Whether every MLP has, or can be given, an output bias that a saved model keeps."""
        return self.mlp_bias_switch is not None or all(m.out.bias is not None for m in self.mlps())

    def add_mlp_biases(self) -> None:
        """Switch the MLP biases on: the config flag, and zero biases where missing (same function)."""
        import torch

        switch = self.mlp_bias_switch
        if switch is None:
            raise MinigptError(f"{self.architecture} models cannot store MLP biases",
                               "use prune.compensation = \"lstsq\" or \"none\" for this model")
        setattr(self.model.config, switch, True)
        for m in self.mlps():
            for p in [*m.ins, m.out]:
                mod = p.module
                if getattr(mod, "bias", None) is None:
                    n = mod.weight.shape[p.out_axis]
                    mod.bias = torch.nn.Parameter(torch.zeros(n, dtype=mod.weight.dtype, device=mod.weight.device),
                                                  requires_grad=mod.weight.requires_grad)

    # ---- fine-tuning ----------------------------------------------------------
    @property
    def lora_fan_in_fan_out(self) -> bool:
        """peft's `fan_in_fan_out`: True when the linear weights are stored [in, out] (Conv1D)."""
        return self.transposed

    # ---- llama.cpp (GGUF export, engine/models/gguf.py) -------------------------
    gguf_model_types: ClassVar[tuple] = ()  # model types with a llama.cpp architecture written here

    def gguf_spec(self) -> "GgufSpec":
        """What the GGUF exporter needs: llama.cpp's architecture names, the hyperparameters and
        every tensor under llama.cpp's name. Raises a one-line error for a family it cannot write."""
        raise MinigptError(f"GGUF export of {self.architecture} models is not supported",
                           f"supported model types: {', '.join(gguf_supported())}")

    # ---- config ---------------------------------------------------------------
    @classmethod
    def config_width(cls, config) -> int:
        return int(getattr(config, cls.width_key))

    @classmethod
    def set_config_width(cls, config, width: int) -> None:
        setattr(config, cls.width_key, int(width))

    @classmethod
    def context_length(cls, config) -> int:
        """The longest sequence the model takes (positions), DEFAULT_CONTEXT when unset."""
        for key in cls.context_keys:
            v = getattr(config, key, None)
            if v:
                return int(v)
        return DEFAULT_CONTEXT


class LlamaAdapter(Adapter):
    """Llama, Mistral, Qwen2/3: gated SiLU MLP (gate_proj, up_proj -> down_proj).

    Only Llama's config has `mlp_bias` (biases in gate, up and down), which stock
    transformers loads; Mistral and Qwen have no such switch.
    """

    model_types = ("llama", "mistral", "qwen2", "qwen3")
    family = "llama"
    bias_switches = {"llama": "mlp_bias"}
    reserved_tokens = r"<\|reserved_special_token_\d+\|>"  # Llama 3's 250 placeholders
    gated = True
    in_names = ("gate_proj", "up_proj")
    out_name = "down_proj"
    act_attr = "act_fn"
    # llama.cpp: uniform widths go out as `llama` (Mistral too, as llama.cpp's converter does);
    # per-layer MLP widths and head counts as `deci` (Nemotron-51B). Qwen2/3 have other
    # layouts in llama.cpp (qkv biases, NEOX rope, q/k norms) and are not written yet.
    gguf_model_types = ("llama", "mistral")
    axes = ("mlp", "heads", "hidden", "depth", "vocab")
    norm_kind = "rms"
    block_norms = ("input_layernorm", "post_attention_layernorm")
    final_norm_path = "model.norm"
    norm_eps_key = "rms_norm_eps"
    norm_eps_attr = "variance_epsilon"

    def residual_readers(self) -> list[Proj]:
        out = []
        for a, m in zip(self.attentions(), self.mlps()):
            out += [a.q, a.k, a.v, *m.ins]
        return out + [Proj(self.head_path, self.lm_head())]

    def residual_writers(self) -> list[Proj]:
        return [p for a, m in zip(self.attentions(), self.mlps()) for p in (a.o, m.out)]

    def gguf_spec(self) -> "GgufSpec":
        cfg = self.model.config
        mt = self.architecture
        if mt not in self.gguf_model_types:
            return super().gguf_spec()
        if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
            raise MinigptError(f"GGUF export of {mt} models with biases (mlp_bias / attention_bias) is not supported",
                               "export a model pruned with prune.compensation = \"none\" or \"lstsq\"")
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise MinigptError(f"GGUF export of rope scaling {rope.get('rope_type')!r} is not supported",
                               "export a model with default rotary embeddings")
        theta = getattr(cfg, "rope_theta", None) or rope.get("rope_theta") or 10000.0
        n_head = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
        layers = []
        for layer in self.layers():
            a, m = layer.self_attn, layer.mlp
            layers.append({
                "attn_norm.weight": layer.input_layernorm.weight,
                "attn_q.weight": a.q_proj.weight, "attn_k.weight": a.k_proj.weight,
                "attn_v.weight": a.v_proj.weight, "attn_output.weight": a.o_proj.weight,
                "ffn_norm.weight": layer.post_attention_layernorm.weight,
                "ffn_gate.weight": m.gate_proj.weight, "ffn_up.weight": m.up_proj.weight,
                "ffn_down.weight": m.down_proj.weight,
            })
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        return GgufSpec(
            arch="llama", per_layer_arch="deci", rope_interleave=True,
            context_length=self.context_length(cfg), hidden=int(cfg.hidden_size), head_dim=head_dim,
            n_head=n_head, n_kv=int(getattr(cfg, "num_key_value_heads", None) or n_head),
            norm_eps=float(cfg.rms_norm_eps), rope_theta=float(theta),
            embed=self.embeddings().weight, out_norm=self.model.model.norm.weight,
            head=None if tied else self.lm_head().weight, layers=layers,
            name=str(getattr(cfg, "_name_or_path", "") or mt))


class OPTAdapter(Adapter):
    """OPT: ReLU MLP whose fc1/fc2 sit directly on the decoder layer."""

    model_types = ("opt",)
    family = "opt"
    width_key = "ffn_dim"
    layers_path = "model.decoder.layers"
    mlp_attr = ""
    attn_names = ("q_proj", "k_proj", "v_proj", "out_proj")
    embed_path = "model.decoder.embed_tokens"
    gqa = False
    heads_in_config = False  # OPT derives head_dim = hidden // heads: other head counts need the engine's loader
    kv_heads_key = None
    head_dim_key = None
    block_norms = ("self_attn_layer_norm", "final_layer_norm")
    final_norm_path = "model.decoder.final_layer_norm"

    @property
    def residual_after_mlp(self) -> bool:
        """OPT-350m normalises after the residual add, so its MLP cannot aim at a target there."""
        return getattr(self.model.config, "do_layer_norm_before", True) is not False


class PhiAdapter(Adapter):
    """Phi-1/1.5/2: GELU MLP (fc1 -> fc2), attention output named `dense`."""

    model_types = ("phi",)
    family = "phi"
    attn_names = ("q_proj", "k_proj", "v_proj", "dense")
    block_norms = ("input_layernorm",)  # attention and MLP read the same norm (parallel block)
    final_norm_path = "model.final_layernorm"


class GPT2Adapter(Adapter):
    """GPT-2: Conv1D projections (weights stored [in, out]), fused c_attn."""

    model_types = ("gpt2",)
    family = "gpt2"
    width_key = "n_inner"
    context_keys = ("n_positions", "n_ctx")
    layers_path = "transformer.h"
    in_names = ("c_fc",)
    out_name = "c_proj"
    act_attr = "act"
    attn_attr = "attn"
    attn_names = ("c_attn", "c_proj")
    embed_path = "transformer.wte"
    transposed = True
    gqa = False
    heads_in_config = False  # GPT-2 derives head_dim = n_embd // n_head
    heads_key = "n_head"
    kv_heads_key = None
    head_dim_key = None
    layers_key = "n_layer"
    block_norms = ("ln_1", "ln_2")
    final_norm_path = "transformer.ln_f"

    def attentions(self) -> list[Attention]:
        out = []
        for i, layer in enumerate(self.layers()):
            attn = layer.attn
            name = f"{self.layers_path}.{i}.attn"
            out.append(Attention(i, name, attn, None, None, None, Proj(f"{name}.c_attn", attn.c_attn, True),
                                 Proj(f"{name}.c_proj", attn.c_proj, True), int(attn.head_dim)))
        return out

    def set_heads(self, att: Attention, n_heads: int, n_kv: int) -> None:
        att.owner.num_heads = n_heads
        att.owner.split_size = n_heads * att.head_dim  # c_attn's output splits into q | k | v

    @classmethod
    def config_hidden(cls, config) -> int:
        return int(config.n_embd)

    def depth_refusal(self) -> str | None:
        if getattr(self.model.config, "scale_attn_by_inverse_layer_idx", False):
            return "its attention scale depends on the block index (scale_attn_by_inverse_layer_idx)"
        return None

    @classmethod
    def _transposed_linear_types(cls) -> tuple:
        from transformers.pytorch_utils import Conv1D

        return (Conv1D,)

    @classmethod
    def config_width(cls, config) -> int:
        return int(config.n_inner or 4 * config.n_embd)


class GemmaAdapter(LlamaAdapter):
    """Gemma 3 (text): gated GELU-tanh MLP (gate_proj, up_proj -> down_proj, Llama's names),
    q/k RMSNorms over head_dim inside attention, four RMSNorms per block (input, post-attention,
    pre-feedforward, post-feedforward), sliding-window attention in most layers (config
    `layer_types`, renumbered by depth pruning like every per-block list), embeddings scaled by
    sqrt(hidden_size) at run time, an RMSNorm gain of (1 + weight), one key/value head in the
    270M model (head pruning then keeps that group and cuts query heads only).

    The block output is x + post_attention_norm(attn(.)) and then + post_feedforward_norm(mlp(.)):
    the MLP output is normalised before the residual add, so sequential pruning cannot aim it
    at the unpruned residual stream (`residual_after_mlp` False). The post norms sit on the
    residual channel axis too, so hidden pruning slices and rescales all four.
    """

    model_types = ("gemma3_text",)
    family = "gemma3"
    bias_switches = {}
    gguf_model_types = ()
    block_norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")
    norm_eps_attr = "eps"
    norm_offset = 1.0
    logit_softcap_key = "final_logit_softcapping"
    reserved_tokens = r"<unused\d+>"  # 6,242 of them in Gemma 3's tokenizer: 4.0M parameters of rows

    @property
    def residual_after_mlp(self) -> bool:
        return False

    def tree_mask(self, allowed, positions):
        """One mask per layer type (Gemma's forward takes the dict as built): the sliding layers'
        also drop keys `sliding_window` or more positions back, as transformers' own sliding mask."""
        window = getattr(self.model.config, "sliding_window", None)
        full = super().tree_mask(allowed, positions)
        if not window:
            return {"full_attention": full, "sliding_attention": full}
        near = (positions[:, :, None] - positions[:, None, :]) < int(window)
        return {"full_attention": full, "sliding_attention": super().tree_mask(allowed & near, positions)}

    def embedding_scale(self, config) -> float:
        return float(config.hidden_size) ** 0.5

    def set_hidden(self, width: int) -> None:
        """Also keep the embedding's effective scale: stock Gemma multiplies by sqrt(hidden_size)
        of the config it loads, so the ratio old/new scale is folded into the embedding rows (and,
        with a tied LM head, divided out of the final norm's gain, leaving the logits as they were)."""
        import torch

        emb = self.embeddings()
        old = float(getattr(emb, "scalar_embed_scale", self.embedding_scale(self.model.config)))
        super().set_hidden(width)
        new = self.embedding_scale(self.model.config)
        if new == old:
            return
        f = old / new
        head = self.lm_head()
        tied = head is not None and head.weight is emb.weight
        with torch.no_grad():
            emb.weight.mul_(f)
            emb.scalar_embed_scale = new
            emb.embed_scale.fill_(new)
            if tied:
                norm = _get(self.model, self.final_norm_path)
                norm.weight.copy_((norm.weight + self.norm_offset) / f - self.norm_offset)


ADAPTERS: tuple = (LlamaAdapter, OPTAdapter, PhiAdapter, GPT2Adapter, GemmaAdapter)


def supported() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def supported_axis(axis: str) -> list[str]:
    """Model types whose family can prune `axis` (mlp, heads, hidden, depth, vocab)."""
    return sorted(t for a in ADAPTERS if axis in a.axes for t in a.model_types)


def check_axis(model, axis: str) -> "Adapter":
    """The model's adapter, or a one-line error when its family cannot prune `axis`."""
    a = for_model(model)
    if axis not in a.axes:
        raise MinigptError(f"{axis} pruning of {a.architecture} models is not supported",
                           f"supported model types: {', '.join(supported_axis(axis))}; "
                           f"or leave prune.{ {'heads': 'head_ratio', 'hidden': 'hidden_ratio'}.get(axis, axis)} at 0")
    return a


def gguf_supported() -> list[str]:
    """Model types the GGUF exporter writes."""
    return sorted(t for a in ADAPTERS for t in a.gguf_model_types)


def check_gguf(config) -> None:
    """The one-line error of `gguf_spec` for a config whose family the GGUF exporter cannot write."""
    a = for_config(config)
    mt = getattr(config, "model_type", None)
    if mt not in a.gguf_model_types:
        raise MinigptError(f"GGUF export of {mt} models is not supported",
                           f"supported model types: {', '.join(gguf_supported())}")


def for_config(config) -> type[Adapter]:
    mt = getattr(config, "model_type", None)
    for a in ADAPTERS:
        if mt in a.model_types:
            return a
    raise MinigptError(f"architecture {mt!r} is not supported",
                       f"supported model types: {', '.join(supported())} (add one by writing an adapter in engine/models/adapters.py)")


def for_model(model) -> Adapter:
    return for_config(model.config)(model)


def model_context(model) -> int:
    """The model's context length in tokens (its family's config field; DEFAULT_CONTEXT when unset)."""
    return for_config(model.config).context_length(model.config)


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
