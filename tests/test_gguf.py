"""GGUF export, checked in llama.cpp itself (llama-cpp-python, built by scripts/setup.sh --dev).

Every case prunes a tiny Llama-family model, exports it, loads the file in llama.cpp and
compares its logits on the same tokens with our engine's (f32: within 1e-3 relative) and
its greedy 32-token continuation. Heads and blocks are cut by the helpers below (until
the compression issue lands): whole key/value groups per layer, an attention or an MLP
removed. Each case has a padded-uniform twin (`pad_uniform=True`), which must go out as
the plain `llama` architecture with the same logits.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import tiny
from engine.errors import MinigptError
from engine.models import adapters, gguf
from engine.prune import mlp as mlp_mod

try:
    import llama_cpp
except ImportError:  # setup.sh --dev builds it: a missing one is a broken setup, not a skip
    llama_cpp = None


def _need_llama_cpp():
    if llama_cpp is None:
        pytest.fail("llama-cpp-python is not installed; run ./scripts/setup.sh --dev (it builds it from the sdist)")


# ---- cutting helpers ---------------------------------------------------------------------
def keep_neurons(model, widths, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = [torch.sort(torch.randperm(64, generator=g)[:w]).values for w in widths]
    mlp_mod.apply_structural(model, mlp_mod.Plan(keep=keep, widths_before=[64] * len(widths)))


def keep_kv_groups(model, layer, groups):
    """Keep only key/value heads `groups` of one layer, with their query heads (GQA kept)."""
    attn = model.model.layers[layer].self_attn
    hd = attn.head_dim
    per = attn.num_key_value_groups
    q_heads = [g * per + j for g in groups for j in range(per)]

    def rows(heads):
        return torch.tensor([h * hd + i for h in heads for i in range(hd)], dtype=torch.long)

    with torch.no_grad():
        for name, idx in (("q_proj", rows(q_heads)), ("k_proj", rows(groups)), ("v_proj", rows(groups))):
            lin = getattr(attn, name)
            lin.weight = torch.nn.Parameter(lin.weight[idx].clone())
            lin.out_features = len(idx)
        attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, rows(q_heads)].clone())
        attn.o_proj.in_features = len(q_heads) * hd


def remove_attention(model, layer):
    """The layer's attention block removed: no heads; its output is zero."""
    keep_kv_groups(model, layer, [])
    attn = model.model.layers[layer].self_attn

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None

    attn.forward = types.MethodType(forward, attn)


def remove_mlp(model, layer):
    widths = adapters.for_model(model).widths()
    keep = [torch.arange(w) for w in widths]
    keep[layer] = torch.arange(0)
    mlp_mod.apply_structural(model, mlp_mod.Plan(keep=keep, widths_before=widths))


def prune_vocab(model, tok):
    from engine.prune.vocab import prune_vocabulary

    counts = torch.zeros(len(tok))
    for i in tok("Permission is hereby granted, free of charge.")["input_ids"]:
        counts[i] += 1
    return prune_vocabulary(model, tok, counts, 0.0)[:2]


def case(name):
    m, tok = tiny.model("llama"), tiny.tokenizer()
    if name == "uniform":
        keep_neurons(m, [48, 48])
    elif name == "per_layer_mlp":
        keep_neurons(m, [40, 56])
    elif name == "heads_per_layer":
        keep_kv_groups(m, 0, [1])
    elif name == "block_removed":
        remove_attention(m, 0)
        remove_mlp(m, 1)
    elif name == "vocab":
        keep_neurons(m, [40, 56])
        m, tok = prune_vocab(m, tok)
    return m.eval(), tok


CASES = {"uniform": "llama", "per_layer_mlp": "deci", "heads_per_layer": "deci", "block_removed": "deci",
         "vocab": "deci"}


# ---- llama.cpp ---------------------------------------------------------------------------
def load(path, n_ctx=128):
    return llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False,
                           type_k=0, type_v=0)  # f32 KV cache: the comparison is at f32


def cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def cpp_greedy(llm, ids, n=32):
    out = list(ids)
    for _ in range(n):
        llm.reset()
        llm.eval(out)
        out.append(int(np.argmax(llm.scores[len(out) - 1])))
    return out[len(ids):]


def engine_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def engine_greedy(model, ids, n=32):
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def prompt(tok):
    return tok(tiny.TEXT[:160])["input_ids"][:24]


@pytest.mark.parametrize("pad", [False, True], ids=["as_is", "pad_uniform"])
@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_matches_the_engine(tmp_path, name, pad):
    _need_llama_cpp()
    model, tok = case(name)
    res = gguf.export(model, tok, tmp_path / "m.gguf", "f32", pad_uniform=pad)
    assert res.arch == ("llama" if pad else CASES[name])
    ids = prompt(tok)
    llm = load(res.path)
    try:
        assert rel_err(cpp_logits(llm, ids), engine_logits(model, ids)) <= 1e-3
        assert cpp_greedy(llm, ids) == engine_greedy(model, ids)
    finally:
        llm.close()


def test_pruned_vocabulary_goes_out_with_its_tokenizer(tmp_path):
    """llama.cpp tokenizes text with the GGUF's tokenizer exactly as the pruned HF tokenizer does."""
    _need_llama_cpp()
    model, tok = case("vocab")
    assert len(tok) < len(tiny.tokenizer())
    res = gguf.export(model, tok, tmp_path / "v.gguf", "f32")
    llm = llama_cpp.Llama(str(res.path), vocab_only=True, verbose=False)
    try:
        for text in (tiny.TEXT[:300], "Permission granted, 2024: copy the software!"):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]
        assert llm.n_vocab() == model.get_input_embeddings().weight.shape[0]
        assert llm.token_eos() == tok.eos_token_id
    finally:
        llm.close()


def test_f16_and_quantised_files_load_and_stay_close(tmp_path, capsys):
    _need_llama_cpp()
    model, tok = case("per_layer_mlp")
    ids = prompt(tok)
    ref = engine_logits(model, ids)
    errs = {}
    for q in ("f16", "q8_0", "q4_k_m"):
        lines = []
        res = gguf.export(model, tok, tmp_path / f"{q}.gguf", q, log=lines.append)
        assert res.quant == q and res.bytes == res.path.stat().st_size
        llm = load(res.path)
        try:
            errs[q] = rel_err(cpp_logits(llm, ids), ref)
        finally:
            llm.close()
        if q == "q4_k_m":
            # every row here (32, 40, 56) is short of 256: the warning names them, and no
            # tensor in the file is Q4_K
            assert any("not a multiple of 256" in ln for ln in lines)
            assert any("ffn_down.weight (rows of 40) -> F16" in ln for ln in lines)
            assert "Q4_K" not in res.types and set(res.types) & {"Q5_0", "Q8_0", "F16"}
    assert errs["f16"] < 1e-2 and errs["q8_0"] < 0.1 and errs["q4_k_m"] < 0.5, errs
    assert errs["f16"] <= errs["q8_0"] <= errs["q4_k_m"], errs


def test_unsupported_family_and_bad_quant_are_one_line_errors(tmp_path):
    with pytest.raises(MinigptError, match="GGUF export of opt models is not supported.*llama, mistral"):
        gguf.export(tiny.model("opt"), tiny.tokenizer(), tmp_path / "o.gguf", "f16")
    with pytest.raises(MinigptError, match="unknown quantisation 'q9'"):
        gguf.export(tiny.model("llama"), tiny.tokenizer(), tmp_path / "o.gguf", "q9")
    assert not list(tmp_path.iterdir())


def test_importance_is_the_mean_square_of_each_matmul_input():
    model = tiny.model("llama")
    ids = tiny.ids(4, 16)
    imp = gguf.importance(model, ids, batch_size=3)
    assert len(imp) == 7 * len(model.model.layers)  # q, k, v, o, gate, up, down of every block
    with torch.no_grad():  # layer 0's attention input, computed without hooks
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 32)
    want = x.double().pow(2).mean(0).float().numpy()
    for k in ("attn_q.weight", "attn_k.weight", "attn_v.weight"):
        np.testing.assert_allclose(imp[(0, k)], want, rtol=1e-5)
    assert imp[(0, "ffn_down.weight")].shape == (model.model.layers[0].mlp.down_proj.in_features,)


def test_an_importance_matrix_reaches_llama_cpps_quantizer(tmp_path):
    _need_llama_cpp()
    model, tok = case("per_layer_mlp")
    ids = prompt(tok)
    ref = engine_logits(model, ids)
    imp = gguf.importance(model, tiny.ids(8, 32))
    lines = []
    plain = gguf.export(model, tok, tmp_path / "plain.gguf", "q4_k_m")
    guided = gguf.export(model, tok, tmp_path / "guided.gguf", "q4_k_m", log=lines.append, imatrix=imp)
    n2 = sum(a.ndim == 2 for b in gguf.plan(model).blocks for a in b.tensors.values())
    assert f"importance matrix: {n2} of {n2} block matrices" in lines, lines
    assert guided.types == plain.types  # the same types: only the rounding changed
    assert (tmp_path / "plain.gguf").read_bytes() != (tmp_path / "guided.gguf").read_bytes()
    llm = load(guided.path)
    try:
        assert rel_err(cpp_logits(llm, ids), ref) < 0.5
    finally:
        llm.close()
