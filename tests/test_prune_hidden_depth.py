"""Hidden-channel and block removal are exact where they should be: a channel or a block whose
contribution is zero goes without changing the logits; pruned models load with stock
transformers; the selection follows the statistics."""

import pytest
import torch

import tiny
from engine.errors import MinigptError
from engine.models import adapters, export, size
from engine.prune import depth, heads, hidden, mlp, structure


_ids, _logits = tiny.ids, tiny.logits  # shared with the other structural tests


def _zero_channels(m, chans):
    """Make residual channels `chans` zero everywhere: embedding columns and the rows of every
    projection writing the stream (so every block leaves them at zero)."""
    ad = adapters.for_model(m)
    with torch.no_grad():
        ad.embeddings().weight[:, chans] = 0.0
        for p in ad.residual_writers():
            p.module.weight.index_fill_(p.out_axis, torch.tensor(chans), 0.0)
            if p.bias is not None:
                p.bias[chans] = 0.0


# ---- hidden ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_removing_zero_channels_keeps_the_logits(family):
    m = tiny.model_with(family, dtype=torch.float64, rms_norm_eps=1e-6)
    n = m.config.hidden_size
    chans = [1, 5, 6, 20]  # 4 of 32: 28 kept, a multiple of the 4 heads
    _zero_channels(m, chans)
    ids = _ids()
    before = _logits(m, ids)
    keep = torch.tensor([c for c in range(n) if c not in chans])
    hidden.apply(m, keep)
    assert m.config.hidden_size == 28 and m.config.head_dim == 8
    assert adapters.for_model(m).embeddings().weight.shape[1] == 28
    assert (_logits(m, ids) - before).abs().max().item() <= 1e-5


def test_without_the_norm_rescale_it_would_not_be_exact():
    """The sqrt(n/n') rescale of the RMSNorm weights is what makes it exact."""
    m = tiny.model_with("llama", dtype=torch.float64, rms_norm_eps=1e-6)
    chans = list(range(0, 32, 2))[:4]
    _zero_channels(m, chans)
    ids = _ids()
    before = _logits(m, ids)
    hidden.apply(m, torch.tensor([c for c in range(32) if c not in chans]))
    ad = adapters.for_model(m)
    with torch.no_grad():
        for _, norm in ad.norms():
            norm.weight.mul_((28 / 32) ** 0.5)  # undo it
    assert (_logits(m, ids) - before).abs().max().item() > 1e-3


def test_scores_rank_dead_channels_last_and_select_rounds():
    m = tiny.model_with("llama", dtype=torch.float64)
    chans = [3, 9, 17, 30]
    _zero_channels(m, chans)
    st = structure.collect(m, _ids(), 2)
    s = hidden.scores(m, st)
    assert s[chans].abs().max() < 1e-12 < s[[c for c in range(32) if c not in chans]].min()
    keep = hidden.select(s, 0.125, round_to=hidden.round_to(m))  # 4 of 32 go
    assert keep.tolist() == [c for c in range(32) if c not in chans]
    assert hidden.select(s, 0.2, round_to=4).numel() == 24  # 32 - 6 = 26 -> 24


def test_hidden_pruned_llama_loads_with_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny.gqa_llama()
    st = structure.collect(m, _ids(), 2)
    keep = hidden.select(hidden.scores(m, st), 0.25, round_to=hidden.round_to(m))
    hidden.apply(m, keep)
    assert m.config.hidden_size == 48
    assert size.count_params(m) < size.count_params(tiny.gqa_llama())
    export.save_model(m, tiny.tokenizer(), tmp_path / "h")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "h").eval()
    ids = _ids(seed=4)
    assert torch.equal(_logits(m, ids), _logits(m2, ids))


def test_untied_head_is_sliced():
    m = tiny.model_with("mistral")  # tie_word_embeddings False in the tiny config
    assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight
    hidden.apply(m, torch.arange(0, 32, 2)[:16])
    assert m.get_output_embeddings().weight.shape == (320, 16)
    assert _logits(m, _ids()).shape[-1] == 320


@pytest.mark.parametrize("family", ["opt", "phi", "gpt2"])
def test_layernorm_families_refuse_hidden_pruning(family):
    m = tiny.model(family)
    with pytest.raises(MinigptError, match="hidden pruning of .* not supported.*llama"):
        hidden.apply(m, torch.arange(16))


def test_a_width_the_config_refuses_is_a_one_line_error():
    m = tiny.model("llama")  # 4 heads
    with pytest.raises(MinigptError, match="multiple of the config's 4 attention heads"):
        hidden.apply(m, torch.arange(30))


# ---- depth -------------------------------------------------------------------------------
DEPTH_FAMILIES = ["llama", "qwen2", "opt", "phi", "gpt2"]


def _zero_block(m, i):
    """Zero a block's residual contributions: attention output and MLP output (+ biases)."""
    ad = adapters.for_model(m)
    att, ml = ad.attentions()[i], ad.mlps()[i]
    with torch.no_grad():
        for p in (att.o, ml.out):
            p.module.weight.zero_()
            if p.bias is not None:
                p.bias.zero_()


@pytest.mark.parametrize("family", DEPTH_FAMILIES)
def test_removing_a_zero_block_keeps_the_logits(family):
    m = tiny.model_with(family, dtype=torch.float64, **{adapters.for_model(tiny.model(family)).layers_key: 3})
    _zero_block(m, 1)
    ids = _ids()
    before = _logits(m, ids)
    depth.apply(m, [1])
    ad = adapters.for_model(m)
    assert len(ad.layers()) == 2 and getattr(m.config, ad.layers_key) == 2
    assert [a.owner.layer_idx for a in ad.attentions()] == [0, 1]
    assert (_logits(m, ids) - before).abs().max().item() <= 1e-10


def test_influence_ranks_the_zero_block_first_and_select_picks_it():
    m = tiny.gqa_llama(dtype=torch.float64, layers=4)
    _zero_block(m, 2)
    st = structure.collect(m, _ids(), 2)
    inf = depth.influence(st)
    assert inf[2] < 1e-12 < min(inf[i] for i in (0, 1, 3))
    assert depth.select(inf, 1) == [2]
    with pytest.raises(MinigptError, match="prune.depth = 4"):
        depth.select(inf, 4)


def test_loss_rise_is_a_probe_and_finds_the_zero_block():
    m = tiny.gqa_llama(dtype=torch.float64, layers=4)
    _zero_block(m, 3)
    ids = _ids(seed=5)
    before = _logits(m, ids)
    names = [n for n, _ in m.named_parameters()]
    seen = []
    rise = depth.loss_rise(m, _ids(n=4, L=16), 2, progress=lambda d, t, r: seen.append((d, t)))
    assert abs(rise[3]) < 1e-10 and min(abs(r) for r in rise[:3]) > 1e-6
    assert depth.select(rise, 1) == [3]
    assert seen[-1][0] == seen[-1][1] == 4 * 16 * 5
    assert [n for n, _ in m.named_parameters()] == names and m.config.num_hidden_layers == 4
    assert torch.equal(_logits(m, ids), before)  # restored


def test_depth_updates_per_layer_config_lists_and_loads_stock(tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny.model_with("qwen2", num_hidden_layers=4, layer_types=["full_attention"] * 4)
    depth.apply(m, [0, 2])
    assert m.config.num_hidden_layers == 2 and len(m.config.layer_types) == 2
    export.save_model(m, tiny.tokenizer(), tmp_path / "d")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    ids = _ids(seed=4)
    assert torch.equal(_logits(m, ids), _logits(m2, ids))


def test_depth_after_per_layer_pruning_loads_through_the_engine(tmp_path):
    """Per-layer MLP widths and head counts, then a block dropped: the recorded lists follow."""
    m = tiny.gqa_llama(layers=3)
    st = structure.collect(m, _ids(), 2)
    plan = heads.select(m, heads.scores(m, st), 0.5, "per_layer")
    plan.keep[2] = torch.arange(8)
    heads.apply(m, plan, st, "none")
    widths = adapters.for_model(m).widths()
    mlp.apply_structural(m, mlp.Plan([torch.arange(w - 8 * i) for i, w in enumerate(widths)], widths))
    depth.apply(m, [1])
    ad = adapters.for_model(m)
    assert m.config.minigpt_heads == ad.head_counts() and ad.head_counts()[1] == [8, 2]
    export.save_model(m, tiny.tokenizer(), tmp_path / "d")
    m2 = export.load_model(tmp_path / "d")
    assert adapters.for_model(m2).widths() == ad.widths() and adapters.for_model(m2).head_counts() == ad.head_counts()
    ids = _ids(seed=4)
    assert torch.equal(_logits(m, ids), _logits(m2, ids))


def test_generation_with_the_kv_cache_after_depth_pruning():
    """layer_idx renumbered: cached generation equals recomputing the whole prefix each step."""
    m = tiny.gqa_llama(layers=4)
    depth.apply(m, [1, 2])
    ids = _ids(n=1, L=8)
    with torch.no_grad():
        cached = m.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        out = ids
        for _ in range(6):
            out = torch.cat([out, m(out, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached, out)


def test_all_axes_together_load_with_stock_transformers(tmp_path):
    """Uniform heads, hidden and depth on one llama: stock from_pretrained, same logits."""
    from transformers import AutoModelForCausalLM

    m = tiny.gqa_llama(layers=3)
    st = structure.collect(m, _ids(), 2)
    heads.apply(m, heads.select(m, heads.scores(m, st), 0.5, "uniform"), st, "lstsq")
    depth.apply(m, depth.select(depth.influence(st), 1))
    hidden.apply(m, hidden.select(hidden.scores(m, st), 0.25, round_to=hidden.round_to(m)))
    assert (m.config.num_attention_heads, m.config.num_hidden_layers, m.config.hidden_size) == (4, 2, 48)
    export.save_model(m, tiny.tokenizer(), tmp_path / "a")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    ids = _ids(seed=4)
    assert torch.equal(_logits(m, ids), _logits(m2, ids))


# ---- the layer report carries every axis ---------------------------------------------------
def test_layer_report_rows_carry_heads_dropped_blocks_and_hidden_width():
    m = tiny.gqa_llama(layers=3)
    ad = adapters.for_model(m)
    wb, pb, mp, hb = ad.widths(), size.count_params(m), mlp.mlp_param_counts(m), ad.head_counts()
    st = structure.collect(m, _ids(), 2)
    plan = heads.select(m, heads.scores(m, st), 0.5, "uniform")
    heads.apply(m, plan, st, "lstsq")
    depth.apply(m, [1])
    hidden.apply(m, hidden.select(hidden.scores(m, st), 0.25, round_to=hidden.round_to(m)))
    r = mlp.layer_report(m, wb, pb, "structural", mp, heads_before=hb, hidden_before=64, dropped=[1])
    rows, t = r["rows"], r["totals"]
    assert [x["layer"] for x in rows] == [0, 1, 2] and [x["dropped"] for x in rows] == [False, True, False]
    assert rows[2]["module"] == "model.layers.2.mlp"  # named by the original block
    assert [(x["heads_before"], x["heads_after"], x["kv_before"], x["kv_after"]) for x in rows] == \
        [(8, 4, 2, 1), (8, 0, 2, 0), (8, 4, 2, 1)]
    assert rows[1]["neurons_after"] == rows[1]["params_after"] == 0 and rows[1]["pct_removed"] == 100.0
    assert (t["hidden_before"], t["hidden_after"], t["dropped_blocks"]) == (64, 48, [1])
    assert (t["kv_before"], t["kv_after"]) == (6, 2)
    assert (t["heads_before"], t["heads_after"]) == (24, 8) and t["params_after"] == size.count_params(m)


def test_layer_report_mask_mode_counts_live_heads():
    m = tiny.gqa_llama(layers=2)
    ad = adapters.for_model(m)
    wb, pb, mp = ad.widths(), size.count_params(m), mlp.mlp_param_counts(m)
    plan = heads.Plan([torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 4, 6])], ad.head_counts())
    mlp.apply_masks(m, heads.masks(m, plan))
    r = mlp.layer_report(m, wb, pb, "mask", mp)
    assert [(x["heads_after"], x["kv_after"]) for x in r["rows"]] == [(4, 1), (4, 2)]
    assert [x["heads_before"] for x in r["rows"]] == [8, 8]  # stored shapes: 8 heads
