"""Attention-head pruning is exact: removing heads structurally gives the logits of masking
them, the o_proj refit reproduces the full output when the removed heads are linear in the
kept ones, and pruned models save and load (stock transformers for one count per layer in
families that read head_dim from the config; the engine's loader otherwise)."""

import pytest
import torch

import tiny
from engine.errors import MinigptError
from engine.models import adapters, export, size
from engine.prune import heads, mlp, structure


_ids, _logits = tiny.ids, tiny.logits  # shared with the other structural tests


# (family, builder) — llama with GQA (8 q heads, 2 kv groups), and the head-per-group families
BUILDERS = {
    "llama_gqa": lambda dtype=torch.float64: tiny.gqa_llama(dtype=dtype),
    "qwen2": lambda dtype=torch.float64: tiny.model_with("qwen2", dtype=dtype),  # GQA with q/k/v biases
    "opt": lambda dtype=torch.float64: tiny.model_with("opt", dtype=dtype),
    "phi": lambda dtype=torch.float64: tiny.model_with("phi", dtype=dtype),
    "gpt2": lambda dtype=torch.float64: tiny.model_with("gpt2", dtype=dtype),
}


def _plan(m, ratio, mode):
    st = structure.collect(m, _ids(), 2)
    return heads.select(m, heads.scores(m, st, "norm"), ratio, mode), st


@pytest.mark.parametrize("mode", heads.MODES)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_structural_equals_mask(name, mode):
    a, b = BUILDERS[name](), BUILDERS[name]()
    plan, _ = _plan(a, 0.5, mode)
    if mode == "per_layer":  # make sure the layers really differ
        plan.keep[0] = heads._pick(torch.arange(plan.heads_before[0][0], dtype=torch.float64),
                                   *plan.heads_before[0], *heads.shape(*plan.heads_before[0], 1))
    heads.apply(a, plan, compensation="none")
    mlp.apply_masks(b, heads.masks(b, plan))
    assert adapters.for_model(a).head_counts() == plan.heads_after
    assert size.count_params(a) < size.count_params(b)
    ids = _ids(seed=2)
    assert (_logits(a, ids) - _logits(b, ids)).abs().max().item() <= 1e-5


def test_gqa_plan_shapes():
    """Whole kv groups go when the cut is a multiple of the group; else the same count per group."""
    m = tiny.gqa_llama()
    plan, _ = _plan(m, 0.5, "uniform")
    assert plan.heads_after == [[4, 1]] * 3  # 4 of 8 heads = one whole group of 4
    plan, _ = _plan(m, 0.25, "uniform")
    assert plan.heads_after == [[6, 2]] * 3  # 2 heads: one from each group
    for k in plan.keep:
        assert torch.bincount(k // 4, minlength=2).tolist() == [3, 3]
    assert heads.shape(8, 2, 3) == (4, 2) and heads.shape(8, 2, 4) == (4, 1) and heads.shape(8, 2, 7) == (2, 2)


def test_scores_follow_the_head_outputs():
    """A head whose value rows are zero has zero output: both criteria rank it last."""
    m = tiny.gqa_llama(dtype=torch.float64)
    att = adapters.for_model(m).attentions()[1]
    with torch.no_grad():  # kv group 1 carries heads 4..7: zero its value rows
        att.v.module.weight[8:16] = 0.0
    st = structure.collect(m, _ids(), 2)
    for crit in heads.CRITERIA:
        s = heads.scores(m, st, crit)[1]
        assert s[4:].abs().max() < 1e-12 < s[:4].min()
    plan = heads.select(m, heads.scores(m, st, "norm"), 0.5, "uniform")
    assert plan.keep[1].tolist() == [0, 1, 2, 3]


def test_collector_equals_direct_computation():
    m = tiny.gqa_llama(dtype=torch.float64)
    ids = _ids(n=3, L=12)
    ad = adapters.for_model(m)
    seen = {}
    hooks = [a.o.module.register_forward_pre_hook(lambda mod, args, i=a.layer: seen.setdefault(i, []).append(args[0].clone()) and None)
             for a in ad.attentions()]
    norms_seen = []
    hooks += [mod.register_forward_hook(lambda mod, a, out: norms_seen.append(out.clone()) and None)
              for _, mod in ad.norms()]
    blocks_io = []
    hooks += [layer.register_forward_hook(lambda mod, a, kw, out: blocks_io.append((a[0] if a else kw["hidden_states"], out if torch.is_tensor(out) else out[0])) and None, with_kwargs=True)
              for layer in ad.layers()]
    with torch.no_grad():
        for s in range(0, 3, 2):
            m(ids[s:s + 2], use_cache=False)
    for h in hooks:
        h.remove()
    st = structure.collect(m, ids, 2)
    n = ids.numel()
    assert int(st["n_tokens"]) == n
    for i, xs in seen.items():
        x = torch.cat([t.reshape(-1, 64) for t in xs])
        assert torch.allclose(st[f"attn.{i}.sq"], (x * x).sum(0))
        assert torch.allclose(st[f"attn.{i}.gram"], x.t() @ x)
        assert torch.allclose(st[f"attn.{i}.head_norm"], x.view(-1, 8, 8).norm(dim=-1).sum(0))
        assert torch.allclose(structure.attn_mean(st, i), x.mean(0))
    y = torch.cat([t.reshape(-1, 64) for t in norms_seen])
    assert int(st["hidden.norms"]) == len(ad.norms())
    assert torch.allclose(st["hidden.abs"], y.abs().sum(0))
    infl = torch.zeros(3, dtype=torch.float64)
    for j, (x, yb) in enumerate(blocks_io):
        infl[j % 3] += (1 - torch.nn.functional.cosine_similarity(x.reshape(-1, 64), yb.reshape(-1, 64), dim=-1)).sum()
    assert torch.allclose(st["block.influence"], infl)


def test_lstsq_refit_is_exact_when_removed_heads_are_linear_in_kept_ones():
    """OPT (no GQA): copy head 1's q/k/v rows into head 3, so head 3's output equals head 1's;
    removing head 3 and refitting o_proj by least squares gives the unpruned logits (float64)."""
    m = tiny.model_with("opt", dtype=torch.float64)
    ad = adapters.for_model(m)
    d = ad.attentions()[0].head_dim
    with torch.no_grad():
        for att in ad.attentions():
            for p in (att.q, att.k, att.v):
                p.module.weight[3 * d:4 * d] = p.module.weight[1 * d:2 * d]
                p.module.bias[3 * d:4 * d] = p.module.bias[1 * d:2 * d]
    ids = _ids(seed=3)
    full = _logits(m, ids)
    st = structure.collect(m, _ids(n=6, L=24), 2)
    keep = [torch.tensor([0, 1, 2])] * len(ad.attentions())
    plan = heads.Plan(keep, ad.head_counts())
    import copy

    plain = copy.deepcopy(m)
    heads.apply(m, plan, st, "lstsq", damping=0.0)
    heads.apply(plain, plan, st, "none")
    assert (_logits(m, ids) - full).abs().max().item() <= 1e-8
    assert (_logits(plain, ids) - full).abs().max().item() > 1e-3  # without the refit it is not exact


def test_lstsq_refit_exact_with_gqa():
    """GQA: two query heads of one group with identical q rows have identical outputs; remove one."""
    m = tiny.gqa_llama(dtype=torch.float64)
    ad = adapters.for_model(m)
    with torch.no_grad():
        for att in ad.attentions():
            w = att.q.module.weight
            w[1 * 8:2 * 8] = w[0:8]  # head 1 == head 0 (both in group 0)
            w[5 * 8:6 * 8] = w[4 * 8:5 * 8]  # head 5 == head 4 (group 1)
    ids = _ids(seed=3)
    full = _logits(m, ids)
    st = structure.collect(m, _ids(n=6, L=24), 2)
    plan = heads.Plan([torch.tensor([0, 2, 3, 4, 6, 7])] * 3, ad.head_counts())
    heads.apply(m, plan, st, "lstsq", damping=0.0)
    assert ad.head_counts() == [[6, 2]] * 3
    assert (_logits(m, ids) - full).abs().max().item() <= 1e-8


def test_bias_compensation_keeps_the_mean_output():
    m = tiny.model_with("opt", dtype=torch.float64)
    st = structure.collect(m, _ids(), 2)
    plan = heads.select(m, heads.scores(m, st, "wanda"), 0.5, "uniform")
    att = adapters.for_model(m).attentions()[0]
    w = att.o.module.weight.detach().clone()
    mean = structure.attn_mean(st, 0)
    target = w @ mean + att.o.bias.detach()
    heads.apply(m, plan, st, "bias")
    att = adapters.for_model(m).attentions()[0]
    kept = heads._rows(plan.keep[0], att.head_dim)
    assert torch.allclose(att.o.module.weight @ mean[kept] + att.o.bias, target)


def test_llama_without_o_bias_refuses_bias_compensation():
    m = tiny.gqa_llama()
    plan, st = _plan(m, 0.5, "uniform")
    with pytest.raises(MinigptError, match="o_proj bias"):
        heads.apply(m, plan, st, "bias")


def test_uniform_llama_loads_with_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny.gqa_llama()
    plan, st = _plan(m, 0.5, "uniform")
    heads.apply(m, plan, st, "lstsq")
    assert (m.config.num_attention_heads, m.config.num_key_value_heads, m.config.head_dim) == (4, 1, 8)
    export.save_model(m, tiny.tokenizer(), tmp_path / "u")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    assert adapters.for_model(m2).head_counts() == [[4, 1]] * 3
    ids = _ids(seed=4)
    assert torch.equal(_logits(m, ids), _logits(m2, ids))


def test_uniform_count_the_config_refuses_loads_through_the_engine(tmp_path):
    """6 heads: transformers 5 rejects hidden_size 64 % 6 in a Llama config, so the config keeps
    8 heads and the per-layer record carries the counts."""
    m = tiny.gqa_llama()
    plan, st = _plan(m, 0.25, "uniform")
    heads.apply(m, plan, st, "lstsq")
    assert m.config.num_attention_heads == 8 and m.config.minigpt_heads == [[6, 2]] * 3
    export.save_model(m, tiny.tokenizer(), tmp_path / "u")
    m2 = export.load_model(tmp_path / "u")
    assert adapters.for_model(m2).head_counts() == [[6, 2]] * 3
    ids = _ids(seed=4)
    assert torch.equal(_logits(m, ids), _logits(m2, ids))


@pytest.mark.parametrize("name", ["qwen2", "phi"])
def test_uniform_heads_of_other_config_families_load_stock(name, tmp_path):
    from transformers import AutoModelForCausalLM

    m = BUILDERS[name](torch.float32)
    plan, st = _plan(m, 0.5, "uniform")
    heads.apply(m, plan, st, "lstsq")
    assert m.config.num_attention_heads == 2
    export.save_model(m, tiny.tokenizer(), tmp_path / "u")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    ids = _ids(seed=4)
    assert torch.equal(_logits(m, ids), _logits(m2, ids))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_per_layer_heads_load_through_the_engine(name, tmp_path):
    m = BUILDERS[name](torch.float32)
    plan, st = _plan(m, 0.5, "per_layer")
    plan.keep[0] = torch.arange(plan.heads_before[0][0])  # layer 0 keeps all: counts differ per layer
    heads.apply(m, plan, st, "lstsq")
    counts = adapters.for_model(m).head_counts()
    assert len({tuple(c) for c in counts}) > 1
    export.save_model(m, tiny.tokenizer(), tmp_path / "p")
    m2 = export.load_model(tmp_path / "p")
    assert adapters.for_model(m2).head_counts() == counts
    ids = _ids(seed=4)
    assert torch.equal(_logits(m, ids), _logits(m2, ids))


@pytest.mark.parametrize("name", ["opt", "gpt2"])
def test_uniform_heads_of_hidden_derived_families_load_through_the_engine(name, tmp_path):
    m = BUILDERS[name](torch.float32)
    plan, st = _plan(m, 0.5, "uniform")
    heads.apply(m, plan, st, "none")
    export.save_model(m, tiny.tokenizer(), tmp_path / "u")
    m2 = export.load_model(tmp_path / "u")
    ids = _ids(seed=4)
    assert torch.equal(_logits(m, ids), _logits(m2, ids))


def test_bad_plans_are_one_line_errors():
    m = tiny.gqa_llama()
    plan, st = _plan(m, 0.25, "uniform")
    plan.keep[0] = torch.tensor([0, 1, 2, 4])  # 3 heads in group 0, 1 in group 1
    with pytest.raises(MinigptError, match="same number in every kept group"):
        heads.apply(m, plan, st, "none")
    with pytest.raises(MinigptError, match="head_criterion"):
        heads.scores(m, st, "magnitude")
    with pytest.raises(MinigptError, match="head_mode"):
        heads.select(m, heads.scores(m, st), 0.5, "global")


# ---- GGUF: llama.cpp runs what the engine pruned (harness: tests/test_gguf.py) --------------
def _gguf_case(name):
    from engine.prune import depth, hidden

    m = tiny.gqa_llama(layers=3)
    st = structure.collect(m, _ids(), 2)
    if name == "heads_uniform":
        heads.apply(m, heads.select(m, heads.scores(m, st), 0.5, "uniform"), st, "lstsq")
    elif name == "heads_uniform_config_refuses":  # 6 heads: the config keeps 8, the weights hold 6
        heads.apply(m, heads.select(m, heads.scores(m, st), 0.25, "uniform"), st, "lstsq")
    elif name == "heads_per_layer":
        plan = heads.select(m, heads.scores(m, st), 0.5, "per_layer")
        plan.keep[0] = torch.arange(8)
        heads.apply(m, plan, st, "lstsq")
    elif name == "all_axes":
        heads.apply(m, heads.select(m, heads.scores(m, st), 0.5, "uniform"), st, "lstsq")
        depth.apply(m, depth.select(depth.influence(st), 1))
        hidden.apply(m, hidden.select(hidden.scores(m, st), 0.25, round_to=hidden.round_to(m)))
    return m.eval(), tiny.tokenizer()


GGUF_CASES = {"heads_uniform": "llama", "heads_uniform_config_refuses": "llama", "heads_per_layer": "deci",
              "all_axes": "llama"}


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_llama_cpp_runs_the_pruned_model(tmp_path, name):
    import test_gguf as g
    from engine.models import gguf

    g._need_llama_cpp()
    model, tok = _gguf_case(name)
    res = gguf.export(model, tok, tmp_path / "m.gguf", "f32")
    assert res.arch == GGUF_CASES[name]
    ids = g.prompt(tok)
    llm = g.load(res.path)
    try:
        assert g.rel_err(g.cpp_logits(llm, ids), g.engine_logits(model, ids)) <= 1e-3
        assert g.cpp_greedy(llm, ids) == g.engine_greedy(model, ids)
    finally:
        llm.close()
