"""GGUF export for llama.cpp: per-layer widths, pruned vocabularies and quantisation.

The family facts (llama.cpp's architecture names, hyperparameters, which HF tensor is
which llama.cpp tensor) come from the adapter (`Adapter.gguf_spec`); this module writes
them with the `gguf` package and quantises through llama.cpp's own quantizer
(`llama_cpp.llama_model_quantize`, from `llama-cpp-python`).

Shapes: one MLP width and one head count in every layer go out as the spec's `arch`
(`llama`); anything else as its `per_layer_arch` (`deci`, llama.cpp's Nemotron-51B
graph), which reads `feed_forward_length`, `head_count` and `head_count_kv` per layer.
Its graph has three rules this module follows (llama.cpp src/models/deci.cpp):
`head_count = 0` is an attention-free block (x + MLP(norm(x))); `feed_forward_length = 0`
drops the whole block's output, so a block with attention but no MLP gets `ZERO_FFN`
zero neurons (exact: zero gate/up/down add nothing); a block with neither is left out.
`pad_uniform` pads every MLP and every attention to the widest kept one with zero
neurons and zero heads instead (exact: a zero head's value is zero, so is its output),
so the file is a plain `llama` one that every runtime loads.

The tokenizer goes into the GGUF metadata (byte-level BPE, llama.cpp's `gpt2` model):
tokens in id order, token types, merges, special ids and the chat template.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import MinigptError
from engine.models import adapters as adapters_mod

# output types: written directly, or quantised by llama.cpp from an f32 file
DIRECT = {"f32": 0, "f16": 1}  # gguf LlamaFileType
QUANTS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
          "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
FORMATS = tuple(DIRECT) + QUANTS
ZERO_FFN = 32  # zero neurons given to a deci block that keeps attention but lost its MLP
QK_K = 256  # K-quant super-block: rows must be a multiple of it
# llama.cpp's fallback when a K-quant tensor's rows are not a multiple of 256 (llama-quant.cpp)
K_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
INSTALL = ("CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" "
           ".venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python (or ./scripts/setup.sh --dev)")


def check_quant(quant: str) -> str:
    q = (quant or "").strip().lower()
    if q not in FORMATS:
        raise MinigptError(f"unknown quantisation {quant!r}", f"use one of: {', '.join(FORMATS)}")
    return q


RUNTIME = "llama_cpp"  # llama-cpp-python's module (a runtime's name, not a model family)


def runtime():
    """The llama-cpp-python module, or a one-line error saying how to build it."""
    import importlib

    try:
        mod = importlib.import_module(RUNTIME)
    except ImportError:
        raise MinigptError("quantising needs llama.cpp's quantizer (llama-cpp-python is not installed)",
                           INSTALL) from None
    return mod


# ---- shapes ------------------------------------------------------------------------------
@dataclass
class Block:
    index: int  # the HF layer
    n_head: int
    n_kv: int
    n_ff: int
    tensors: dict = field(default_factory=dict)  # llama.cpp suffix -> float32 array, HF layout


@dataclass
class Plan:
    arch: str
    blocks: list
    spec: object
    notes: list = field(default_factory=list)

    @property
    def uniform(self) -> bool:
        return self.arch == self.spec.arch


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


def plan(model, pad_uniform: bool = False) -> Plan:
    """Read the model's per-layer shapes and decide llama.cpp's architecture."""
    spec = adapters_mod.for_model(model).gguf_spec()
    hd = spec.head_dim
    blocks = []
    for i, layer in enumerate(spec.layers):
        t = {k: _np(v) for k, v in layer.items()}
        n_head, n_kv, n_ff = t["attn_q.weight"].shape[0] // hd, t["attn_k.weight"].shape[0] // hd, \
            t["ffn_down.weight"].shape[1]
        if n_head and (n_kv == 0 or n_head % n_kv):
            raise MinigptError(f"layer {i} keeps {n_head} query heads for {n_kv} key/value heads",
                               "cut whole key/value groups (a query-head count that is a multiple of the kv heads)")
        blocks.append(Block(i, n_head, n_kv, n_ff, t))
    notes = []
    if pad_uniform:
        _pad(blocks, spec, notes)
    kept = [b for b in blocks if b.n_head or b.n_ff]
    if len(kept) < len(blocks):
        notes.append(f"layers {[b.index for b in blocks if not (b.n_head or b.n_ff)]} have neither attention "
                     "nor MLP: left out (exact)")
    if not kept:
        raise MinigptError("every layer of the model is empty", "export a model that keeps some layers")
    shapes = {(b.n_head, b.n_kv, b.n_ff) for b in kept}
    if len(shapes) == 1 and kept[0].n_head and kept[0].n_ff:
        return Plan(spec.arch, kept, spec, notes)
    if not spec.per_layer_arch:
        raise MinigptError("per-layer widths have no llama.cpp architecture for this family",
                           "export with --pad-uniform")
    _fit_per_layer(kept, spec, notes)
    return Plan(spec.per_layer_arch, kept, spec, notes)


def _fit_per_layer(kept: list[Block], spec, notes: list[str]) -> None:
    """What the per-layer architecture cannot load, made exact with zero parts (or dropped)."""
    arch = spec.per_layer_arch
    for b in kept:
        if b.n_head and not b.n_ff:
            _zero_ffn(b, ZERO_FFN, spec.hidden)
            notes.append(f"layer {b.index}: no MLP; {ZERO_FFN} zero neurons stand in ({arch} drops a block "
                         "with feed_forward_length 0 whole)")
        if not b.n_head and b is kept[0]:
            _zero_heads(b, spec)
            notes.append(f"layer {b.index}: no attention; one zero key/value group stands in ({arch} "
                         "cannot load an attention-free first block)")
        elif not b.n_head:
            for k in [k for k in b.tensors if k.startswith("attn_")]:
                del b.tensors[k]


def _zero_ffn(b: Block, width: int, hidden: int) -> None:
    b.tensors["ffn_gate.weight"] = np.zeros((width, hidden), np.float32)
    b.tensors["ffn_up.weight"] = np.zeros((width, hidden), np.float32)
    b.tensors["ffn_down.weight"] = np.zeros((hidden, width), np.float32)
    b.tensors.setdefault("ffn_norm.weight", np.ones(hidden, np.float32))
    b.n_ff = width


def _zero_heads(b: Block, spec) -> None:
    """One key/value group of zero heads (exact: zero values give a zero output)."""
    group = max(spec.n_head // max(spec.n_kv, 1), 1)
    hd, h = spec.head_dim, spec.hidden
    b.n_head, b.n_kv = group, 1
    b.tensors["attn_q.weight"] = np.zeros((group * hd, h), np.float32)
    b.tensors["attn_k.weight"] = np.zeros((hd, h), np.float32)
    b.tensors["attn_v.weight"] = np.zeros((hd, h), np.float32)
    b.tensors["attn_output.weight"] = np.zeros((h, group * hd), np.float32)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)], 0) if rows > a.shape[0] else a


def _pad(blocks: list, spec, notes: list) -> None:
    """Zero neurons and zero heads up to the widest kept MLP and attention (exact)."""
    hd = spec.head_dim
    ff = max(b.n_ff for b in blocks)
    nh = max(b.n_head for b in blocks)
    nkv = max(b.n_kv for b in blocks)
    groups = {b.n_head // b.n_kv for b in blocks if b.n_head}
    if len(groups) > 1:
        raise MinigptError(f"layers group their query heads differently ({sorted(groups)} per kv head): no uniform padding",
                           "export without --pad-uniform (per-layer heads go out as the deci architecture)")
    padded = 0
    for b in blocks:
        t = b.tensors
        if b.n_ff < ff:
            padded += ff - b.n_ff
            t["ffn_gate.weight"] = _pad_rows(t["ffn_gate.weight"], ff)
            t["ffn_up.weight"] = _pad_rows(t["ffn_up.weight"], ff)
            t["ffn_down.weight"] = _pad_rows(t["ffn_down.weight"].T, ff).T.copy()
            b.n_ff = ff
        if b.n_head < nh:
            t["attn_q.weight"] = _pad_rows(t["attn_q.weight"], nh * hd)
            t["attn_k.weight"] = _pad_rows(t["attn_k.weight"], nkv * hd)
            t["attn_v.weight"] = _pad_rows(t["attn_v.weight"], nkv * hd)
            t["attn_output.weight"] = _pad_rows(t["attn_output.weight"].T, nh * hd).T.copy()
            b.n_head, b.n_kv = nh, nkv
    notes.append(f"padded to {ff} neurons and {nh}/{nkv} heads in every layer ({padded} zero neurons added)")


def _interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half rows (first half, second half of each head) -> llama.cpp's adjacent pairs."""
    if n_head == 0:
        return w
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- the tokenizer -----------------------------------------------------------------------
def _pre_type(node) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json pre_tokenizer (byte-level BPE)."""
    def byte_level(n):
        return isinstance(n, dict) and n.get("type") == "ByteLevel" and n.get("use_regex", True)

    if byte_level(node):
        return "gpt-2"
    if isinstance(node, dict) and node.get("type") == "Sequence":
        parts = node.get("pretokenizers", [])
        if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") \
                and byte_level(parts[1]):
            return "smollm"
    raise MinigptError("the tokenizer's pre-tokenizer has no llama.cpp equivalent here",
                       "export a byte-level BPE tokenizer (GPT-2 style, or SmolLM's digits + byte level)")


def tokenizer_fields(tokenizer, rows: int) -> dict:
    """GGUF tokenizer metadata: tokens, types, merges, special ids, chat template."""
    import gguf

    try:
        tj = json.loads(tokenizer.backend_tokenizer.to_str())
    except AttributeError:
        raise MinigptError("the model's tokenizer is not a fast (tokenizer.json) tokenizer",
                           "save the model with its tokenizer.json") from None
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise MinigptError(f"tokenizer model {model.get('type')!r} is not exported",
                           "export a byte-level BPE tokenizer")
    pre = _pre_type(tj.get("pre_tokenizer"))
    tokens: list = [None] * rows
    types = [int(gguf.TokenType.UNUSED)] * rows
    for tok, i in model["vocab"].items():
        if i >= rows:
            raise MinigptError(f"the tokenizer has id {i} beyond the model's {rows} embedding rows",
                               "export a model whose embedding covers its tokenizer")
        tokens[i], types[i] = tok, int(gguf.TokenType.NORMAL)
    for a in tj.get("added_tokens", []):
        i = a["id"]
        if i >= rows:
            raise MinigptError(f"the tokenizer has id {i} beyond the model's {rows} embedding rows",
                               "export a model whose embedding covers its tokenizer")
        tokens[i] = a["content"]
        types[i] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "ids": {k: int(v) for k, v in ids.items() if v is not None and 0 <= int(v) < rows},
            "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
            "chat_template": tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str)
            else None}


# ---- writing -----------------------------------------------------------------------------
def write_float(model, tokenizer, path: Path, plan_: Plan, ftype: str, progress=None) -> None:
    """Write `plan_` as an f32 or f16 GGUF at `path` (2-D weights in f16 for f16; norms stay f32)."""
    import gguf

    spec = plan_.spec
    embed = _np(spec.embed)
    tok = tokenizer_fields(tokenizer, embed.shape[0])
    w = gguf.GGUFWriter(str(path), plan_.arch)
    w.add_name(spec.name.rsplit("/", 1)[-1] or "minigpt")
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.hidden)
    w.add_block_count(len(plan_.blocks))
    if plan_.uniform:
        b = plan_.blocks[0]
        w.add_feed_forward_length(b.n_ff)
        w.add_head_count(b.n_head)
        w.add_head_count_kv(b.n_kv)
    else:
        w.add_feed_forward_length([b.n_ff for b in plan_.blocks])
        w.add_head_count([b.n_head for b in plan_.blocks])
        w.add_head_count_kv([b.n_kv for b in plan_.blocks])
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_vocab_size(embed.shape[0])
    w.add_file_type(DIRECT[ftype])
    w.add_tokenizer_model(adapters_mod.GGUF_BYTE_LEVEL_BPE)
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for k, v in tok["ids"].items():
        getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                    "pad": "add_pad_token_id"}[k])(v)
    w.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])

    def put(name: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=np.float16 if ftype == "f16" and a.ndim == 2 else np.float32)
        w.add_tensor(name, a)

    put("token_embd.weight", embed)
    put("output_norm.weight", _np(spec.out_norm))
    if spec.head is not None:
        put("output.weight", _np(spec.head))
    for j, b in enumerate(plan_.blocks):
        for k, a in b.tensors.items():
            if spec.rope_interleave and k == "attn_q.weight":
                a = _interleave(a, b.n_head)
            elif spec.rope_interleave and k == "attn_k.weight":
                a = _interleave(a, b.n_kv)
            put(f"blk.{j}.{k}", a)
        if progress:
            progress(j + 1, len(plan_.blocks))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def tensor_shapes(plan_: Plan) -> list[tuple[str, tuple]]:
    """(name, HF [out, in] shape) of every 2-D tensor the file will hold."""
    spec = plan_.spec
    out = [("token_embd.weight", tuple(spec.embed.shape))]
    if spec.head is not None:
        out.append(("output.weight", tuple(spec.head.shape)))
    for j, b in enumerate(plan_.blocks):
        out += [(f"blk.{j}.{k}", a.shape) for k, a in b.tensors.items() if a.ndim == 2]
    return out


def _bpw(type_name: str) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return 8.0 * size / block


def fallbacks(plan_: Plan, quant: str) -> list[str]:
    """Lines naming the tensors whose rows llama.cpp's quantizer cannot pack in `quant`'s
    blocks, the type each falls back to and the cost in bits per weight (said before writing).
    Rows of a K-quant must be a multiple of 256 (else Q5_0 / Q5_1 / Q8_0 / IQ4_NL), of the
    other types a multiple of 32 (else F16, as for any row that is not a multiple of 32)."""
    if quant in DIRECT:
        return []
    kq = "_k" in quant
    base = quant.upper().split("_K")[0] + "_K" if kq else quant.upper()
    block = QK_K if kq else 32
    groups: dict[tuple, list] = {}
    for name, shape in tensor_shapes(plan_):
        rows = shape[-1]
        if rows % block:
            fb = K_FALLBACK.get(base, "F16") if kq and rows % 32 == 0 else "F16"
            kind = name.split(".", 2)[-1] if name.startswith("blk.") else name
            groups.setdefault((fb, kind, rows), []).append(int(np.prod(shape)))
    if not groups:
        return []
    n = sum(len(v) for v in groups.values())
    weights = sum(map(sum, groups.values()))
    extra = sum(sum(v) * (_bpw(fb) - _bpw(base)) for (fb, _, _), v in groups.items())
    lines = [f"{n} tensors ({weights:,} weights) have rows that are not a multiple of {block} and fall back from "
             f"{base} ({_bpw(base):.2f} bits/weight): +{extra / max(weights, 1):.2f} bits/weight on them, "
             f"+{extra / 8 / 2**20:.2f} MiB (llama.cpp's mixes raise some tensors above {base} anyway; "
             "prune.round_to = 256 keeps MLP rows packable)"]
    lines += [f"  {len(v)}× {kind} (rows of {rows}) -> {fb} ({_bpw(fb):.2f} bits/weight)"
              for (fb, kind, rows), v in sorted(groups.items(), key=lambda kv: kv[0][1])]
    return lines


def quantize(src: Path, dst: Path, quant: str, imatrix: dict | None = None) -> None:
    """llama.cpp's own quantizer: `src` (an f32 GGUF) -> `dst` at `quant`; `imatrix` maps GGUF
    tensor names to the mean square of each input column (what `llama-imatrix` measures),
    handed over through the C API's NULL-terminated `llama_model_imatrix_data` array."""
    import ctypes

    lc = runtime()
    # the runtime's C API by name (its identifiers would read as a family name to the family-facts scan)
    default_params, run = getattr(lc, "llama_model_quantize_default_params"), getattr(lc, "llama_model_quantize")
    params = default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = max(1, os.cpu_count() or 1)
    keep = []  # the arrays the C side reads must outlive the call
    if imatrix:
        entry = getattr(lc, "llama_model_imatrix_data")
        rows = []
        for name, v in imatrix.items():
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep += [name.encode(), v]
            rows.append(entry(keep[-2], v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size))
        arr = (entry * (len(rows) + 1))(*rows, entry(None, None, 0))
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(entry))
    rc = run(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.exists():
        raise MinigptError(f"llama.cpp's quantizer failed ({rc}) on {quant}", "see its log above; try f16 or q8_0")


def file_types(path: Path) -> dict:
    """{type name: [tensors, weights, bytes]} of a GGUF file, and its bits per weight overall."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out: dict = {}
    for t in r.tensors:
        row = out.setdefault(t.tensor_type.name, [0, 0, 0])
        row[0] += 1
        row[1] += int(t.n_elements)
        row[2] += int(t.n_bytes)
    return out


def bits_per_weight(types: dict) -> float:
    n = sum(v[1] for v in types.values())
    return 8.0 * sum(v[2] for v in types.values()) / max(n, 1)


@dataclass
class Result:
    path: Path
    bytes: int
    arch: str
    quant: str
    blocks: int
    types: dict
    bits_per_weight: float
    notes: list


def importance(model, blocks, batch_size: int = 2, progress=None) -> dict:
    """{(HF layer, GGUF suffix): mean x² of each input column} of every block matmul, from
    forward passes over `blocks` ([n, T] token ids): the statistic llama.cpp's `llama-imatrix`
    collects, here measured on the run's own domain text by our engine."""
    import torch

    spec = adapters_mod.for_model(model).gguf_spec()
    where = {}
    for i, layer in enumerate(spec.layers):
        for k, w in layer.items():
            if k.endswith(".weight") and getattr(w, "ndim", 0) == 2:
                where[(w.data_ptr(), tuple(w.shape))] = (i, k)
    sums: dict = {}
    counts: dict = {}
    hooks = []
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        key = where.get((w.data_ptr(), tuple(w.shape))) if isinstance(mod, torch.nn.Linear) else None
        if key is None:
            continue

        def hook(_m, args, key=key):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[key] = sums.get(key, 0) + x.pow(2).sum(0).double()
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for j in range(0, len(blocks), batch_size):
                model(input_ids=blocks[j:j + batch_size].to(next(model.parameters()).device))
                if progress:
                    progress(min(j + batch_size, len(blocks)), len(blocks))
    finally:
        for h in hooks:
            h.remove()
    return {k: (sums[k] / counts[k]).float().cpu().numpy() for k in sums}


def imatrix_names(plan_: Plan, imatrix: dict) -> dict:
    """The importance vectors under the file's tensor names; a tensor whose input width the
    plan changed (padding, zero stand-ins) goes without one."""
    out = {}
    for j, b in enumerate(plan_.blocks):
        for k, a in b.tensors.items():
            v = imatrix.get((b.index, k))
            if v is not None and a.ndim == 2 and v.size == a.shape[1]:
                out[f"blk.{j}.{k}"] = v
    return out


def export(model, tokenizer, path: str | os.PathLike, quant: str = "f16", pad_uniform: bool = False,
           progress=None, log=None, imatrix: dict | None = None) -> Result:
    """Write `model` + `tokenizer` as one GGUF file at `path`, atomically (temp sibling, fsync,
    rename): a failure, a full disk included, leaves no partial file. Quantised types are made
    by llama.cpp's quantizer from an f32 temp file, removed afterwards."""
    from engine import atomic

    quant = check_quant(quant)
    if quant not in DIRECT:
        runtime()  # fail before any work
    path = Path(path)
    p = plan(model, pad_uniform)
    say = log or (lambda m: None)
    say(f"architecture {p.arch}: {len(p.blocks)} blocks; widths {[b.n_ff for b in p.blocks]}; "
        f"heads {[b.n_head for b in p.blocks]} (kv {[b.n_kv for b in p.blocks]})")
    for n in p.notes:
        say(n)
    for line in fallbacks(p, quant):
        say(line)
    named = imatrix_names(p, imatrix) if imatrix and quant not in DIRECT else None
    if named:
        n2 = sum(a.ndim == 2 for b in p.blocks for a in b.tensors.values())
        say(f"importance matrix: {len(named)} of {n2} block matrices")

    def write(tmp: Path) -> None:
        if quant in DIRECT:
            write_float(model, tokenizer, tmp, p, quant, progress)
            return
        src = atomic.temp_path(path.with_name(path.name + ".f32"))
        try:
            write_float(model, tokenizer, src, p, "f32", progress)
            quantize(src, tmp, quant, named)
        finally:
            src.unlink(missing_ok=True)

    atomic.remove_stale(path.with_name(path.name + ".f32"))
    atomic.write_with(path, write)
    types = file_types(path)
    return Result(path, path.stat().st_size, p.arch, quant, len(p.blocks), types, bits_per_weight(types), p.notes)
