"""Recovery fine-tuning: masks that hold, LoRA that merges exactly, the stop rule, events,
graceful stop and resume, and checkpoints that are complete or absent."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import ft_case
from ft_case import one_thread  # noqa: F401  (fixture)
import tiny
from engine.train import checkpoint
from engine.run import pipeline
from engine.prune import mlp as prune
from engine.config import FinetuneConfig
from engine.errors import MinigptError
from engine.train.finetune import Batches, Finetuner, plan_steps


pytestmark = pytest.mark.usefixtures("one_thread")

def _blocks(n=24, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, length), generator=g)


def _masked(family="llama"):
    """A tiny model in mask mode: every other MLP neuron pruned, plus (the paper's linear rule)
    the first 8 input columns of the first attention projection, and its masks."""
    m = tiny.model(family)
    from engine.models import adapters

    a = adapters.for_model(m)
    widths = a.widths()
    plan = prune.plan_from_masks([torch.arange(0, w, 2) for w in widths], widths)
    masks = prune.mlp_masks(m, plan)
    # a whole zeroed neuron has zero gradient anyway; zeroed input columns of a live
    # projection do not, so they are what would revive without masking
    q = a.attention(0)[0]
    w = q.module.weight
    cols = torch.ones(w.shape[q.in_axis], dtype=torch.bool)
    cols[:8] = False
    name = next(n for n, p in m.named_parameters() if p is w)
    masks[name] = (cols.view(1, -1) if q.in_axis == 1 else cols.view(-1, 1)).expand(w.shape).clone()
    prune.apply_masks(m, masks)
    return m, masks


# ---- data order and limits -----------------------------------------------------------------
def test_batches_are_a_function_of_seed_and_index():
    blocks = torch.arange(10 * 4).view(10, 4)
    b = Batches(blocks, 3, seed=7)
    assert b.per_epoch == 3  # 10 // 3: the partial batch is dropped
    epoch0 = torch.cat([b[i] for i in range(3)])
    assert len({int(r[0]) for r in epoch0}) == 9  # no block twice within an epoch
    again = Batches(blocks, 3, seed=7)
    assert all(torch.equal(again[i], b[i]) for i in (4, 1, 7))  # random access, any order
    assert not all(torch.equal(Batches(blocks, 3, seed=8)[i], b[i]) for i in range(3))
    assert not torch.equal(torch.cat([b[i] for i in range(3, 6)]), epoch0)  # epochs reshuffle


def test_step_limits():
    assert plan_steps(FinetuneConfig(max_steps=100, max_epochs=0), per_epoch=30) == (100, "max_steps")
    assert plan_steps(FinetuneConfig(max_steps=100, max_epochs=2, grad_accum=4), per_epoch=30) == (15, "max_epochs")
    with pytest.raises(MinigptError, match="no step limit"):
        plan_steps(FinetuneConfig(max_steps=0, max_epochs=0), per_epoch=30)


def test_a_warmup_longer_than_the_run_still_trains():
    """HF's warm-up starts at lr 0: one step with warmup_steps = 4 used to change nothing."""
    m, _ = _masked()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ft = Finetuner(m, _blocks(), FinetuneConfig(lr=1e-2, batch_size=4, max_steps=1, warmup_steps=4))
    ft.train_step()
    assert ft.warmup == 0
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters())
    # a warm-up that fits is kept as set
    assert Finetuner(_masked()[0], _blocks(), FinetuneConfig(batch_size=4, max_steps=12, warmup_steps=4)).warmup == 4


# ---- masks ----------------------------------------------------------------------------------
def test_mask_mode_pruned_weights_stay_exactly_zero_under_adamw():
    cfg = FinetuneConfig(lr=1e-2, weight_decay=0.1, batch_size=4, max_steps=5, warmup_steps=0)
    m, masks = _masked()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ft = Finetuner(m, _blocks(), cfg, masks=masks)
    for _ in range(5):
        ft.train_step()
    params = dict(m.named_parameters())
    for name, keep in masks.items():
        p = params[name]
        assert torch.count_nonzero(p[~keep]) == 0, name
        state = ft.optimizer.state[p]  # the moments never saw a gradient there either
        assert torch.count_nonzero(state["exp_avg"][~keep]) == 0
        assert not torch.equal(p[keep], before[name][keep])  # the kept weights did train
    # control: the same run without masks revives the pruned weights
    m2, masks2 = _masked()
    ft2 = Finetuner(m2, _blocks(), cfg, masks=None)
    for _ in range(5):
        ft2.train_step()
    p2 = dict(m2.named_parameters())
    assert any(torch.count_nonzero(p2[n][~k]) > 0 for n, k in masks2.items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D, LoRA with fan_in_fan_out
def test_lora_in_mask_mode_merges_exactly_and_keeps_zeros(family):
    cfg = FinetuneConfig(lr=1e-2, batch_size=4, max_steps=3, lora_rank=4, lora_alpha=8.0)
    m, masks = _masked(family)
    x = _blocks(2, 16, seed=1)
    with torch.no_grad():
        start = m(input_ids=x).logits.clone()
    ft = Finetuner(m, _blocks(), cfg, masks=masks)
    assert {n for n, p in ft.model.named_parameters() if p.requires_grad} and \
        all("lora_" in n for n, p in ft.model.named_parameters() if p.requires_grad)
    for _ in range(3):
        ft.train_step()
    ft.model.eval()
    with torch.no_grad():
        trained = ft.model(input_ids=x).logits.clone()
    merged = ft.finished_model()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        after = merged(input_ids=x).logits
    assert not torch.allclose(trained, start, atol=1e-3)  # LoRA learned something
    # the merged weights compute what the adapters computed: B·A never touched a pruned entry
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=1e-5)
    params = dict(merged.named_parameters())
    for name, keep in masks.items():
        assert torch.count_nonzero(params[name][~keep]) == 0, name


def test_gradient_checkpointing_computes_the_same_steps():
    cfg = FinetuneConfig(lr=1e-2, batch_size=4, max_steps=3)
    m = tiny.model("llama")
    runs = []
    for gc in (False, True):
        ft = Finetuner(copy.deepcopy(m), _blocks(), FinetuneConfig(**{**cfg.__dict__, "gradient_checkpointing": gc}))
        runs.append(([ft.train_step()["loss"] for _ in range(3)], ft.finished_model()))
    (l0, m0), (l1, m1) = runs
    assert l0 == pytest.approx(l1, abs=1e-6)
    for (n, a), (_, b) in zip(m0.named_parameters(), m1.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


# ---- checkpoints ----------------------------------------------------------------------------
def test_checkpoints_are_complete_or_ignored_and_only_the_last_two_kept(tmp_path):
    import random

    import numpy as np

    root = tmp_path / "ck"
    for step in (1, 2, 3):
        checkpoint.save(root, step, {"x": torch.tensor([step])}, meta={"k": step})
    assert [s for s, _ in checkpoint.complete(root)] == [2, 3]
    (root / ".tmp-step-00000009-123").mkdir()  # a save killed before its rename
    (root / ".tmp-step-00000009-123" / "state.pt").write_bytes(b"torn")
    torn = root / "step-00000008"  # a folder without its meta.json is not complete either
    torn.mkdir()
    assert checkpoint.latest(root).name == "step-00000003"
    state, meta = checkpoint.load(checkpoint.latest(root))
    assert int(state["x"]) == 3 and meta == {"step": 3, "k": 3}
    checkpoint.save(root, 4, {"x": torch.tensor([4])})
    assert not (root / ".tmp-step-00000009-123").exists()  # leftovers are swept
    (root / "step-00000004" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(MinigptError, match="unreadable"):
        checkpoint.load(root / "step-00000004")
    # RNG states round-trip through a weights_only load
    checkpoint.seed_everything(5)
    checkpoint.save(root, 5, {"rng": checkpoint.rng_state()})
    want = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(checkpoint.load(root / "step-00000005")[0]["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


# ---- the pipeline stage ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    cfg = ft_case.config(tmp, "llama", prune={"mode": "mask"})
    s = ft_case.session(tmp, "plain", cfg)
    with ft_case.single_thread():
        return tmp, cfg, s, pipeline.run(s)


def test_finetune_events_results_and_saved_model(uninterrupted):
    tmp, cfg, s, res = uninterrupted
    ft = res["finetune"]
    assert (ft["steps"], ft["stopped_because"], ft["tokens"]) == (12, "max_steps", 12 * 2 * 2 * 32)
    assert [st for st, _ in ft["curve"]] == [0, 4, 8, 12]
    assert res["models"]["pruned"]["ppl"] == ft["curve"][0][1]
    assert res["models"]["finetuned"]["ppl"] < res["models"]["pruned"]["ppl"]  # it did recover something
    ev = s.events()
    train = [e for e in ev if e["type"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 13))
    for e in train:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "epoch", "total_steps"} <= e.keys()
    lrs = [e["lr"] for e in train]  # warmup (2 steps) then cosine decay
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(3e-3) and all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    assert [e["step"] for e in ev if e["type"] == "eval"] == [0, 4, 8, 12]
    assert any(e["type"] == "progress" and e["stage"] == "finetune" and e["done"] == 12 for e in ev)
    assert [st for st, _ in checkpoint.complete(s.checkpoints_dir)] == [9, 12]
    # the saved model is the fine-tuned one, masks and all
    assert s.state()["model_is"] == "finetuned"
    from engine.evaluate import perplexity as evaluate
    from engine.models import export
    from engine.data.domain import DomainData

    model = export.load_model(s.model_dir)
    masks = export.load_masks(s.model_dir)
    assert masks and all(torch.count_nonzero(dict(model.named_parameters())[n][~k]) == 0 for n, k in masks.items())
    d = DomainData.build(cfg.data, tiny.tokenizer(), max_eval=cfg.evaluate.max_tokens)
    ppl = evaluate.perplexity(model, d.evaluate, 32, 0, 4)["ppl"]
    assert ppl == pytest.approx(ft["curve"][-1][1], rel=1e-6)


def test_stop_rule_target_ppl(uninterrupted, tmp_path):
    _, cfg, _, res = uninterrupted
    curve, base = res["finetune"]["curve"], res["models"]["base"]["ppl"]
    target = curve[2][1] * (1 + 1e-9)  # reachable at the step-8 evaluation at the latest
    expect = next(st for st, p in curve if p <= target)
    cfg2 = copy.deepcopy(cfg)
    cfg2.finetune.target_ppl_ratio = target / base
    s = ft_case.session(tmp_path, "target", cfg2)
    r = pipeline.run(s)["finetune"]
    assert r["stopped_because"] == "target_ppl" and r["steps"] == expect and r["curve"] == curve[: len(r["curve"])]


def test_graceful_stop_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    _, cfg, ref, ref_res = uninterrupted
    s = ft_case.session(tmp_path, "stopped", cfg)

    def stop_at_step_5(e):
        if e["type"] == "train" and e["step"] == 5:
            (s.path / "stop.request").write_text("stop\n")  # what `minigpt stop` writes

    pipeline.run(s, display=stop_at_step_5)
    assert s.status() == "stopped" and s.state()["completed_stages"] == ["baseline", "teacher", "calibrate", "prune"]
    assert checkpoint.complete(s.checkpoints_dir)[-1][0] == 5  # checkpointed where it stopped

    # a changed training setup must not silently continue from these checkpoints
    good = (s.path / "config.toml").read_text()
    (s.path / "config.toml").write_text(good.replace("lr = 0.003", "lr = 0.001"))
    with pytest.raises(MinigptError, match="different configuration"):
        pipeline.run(s)
    (s.path / "config.toml").write_text(good)

    res = pipeline.run(s)
    assert s.status() == "done" and res["finetune"]["resumed_from_step"] == 5
    assert res["finetune"]["final_loss"] == pytest.approx(ref_res["finetune"]["final_loss"], abs=1e-6)
    assert [s for s, _ in res["finetune"]["curve"]] == [s for s, _ in ref_res["finetune"]["curve"]]
    assert [p for _, p in res["finetune"]["curve"]] == pytest.approx([p for _, p in ref_res["finetune"]["curve"]], rel=1e-6)
    assert res["models"]["finetuned"]["ppl"] == pytest.approx(ref_res["models"]["finetuned"]["ppl"], rel=1e-6)


def test_empty_finetune_split_is_a_clear_error(tmp_path):
    cfg = ft_case.config(tmp_path, "llama", data={"finetune_fraction": 0.0, "calibrate_fraction": 0.8})
    s = ft_case.session(tmp_path, "nodata", cfg)
    with pytest.raises(MinigptError, match="fine-tune split has 0 tokens"):
        pipeline.run(s)
    assert json.loads((s.path / "state.json").read_text())["status"] == "failed"


@pytest.mark.process
def test_torchrun_two_processes_gloo_trains_like_one(uninterrupted, tmp_path):
    """The SPMD pipeline under torchrun (gloo, CPU), DDP: each rank takes half of every batch,
    gradients are averaged, rank 0 alone writes events, checkpoints and the model. Same numbers
    as one process."""
    import subprocess
    import sys

    _, cfg, _, ref = uninterrupted
    s = ft_case.session(tmp_path, "ddp", cfg)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "engine.run.runner", str(s.path)], cwd=ft_case.ROOT, env=ft_case.env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert s.status() == "done"
    res = json.loads((s.path / "results.json").read_text())
    assert res["finetune"]["final_loss"] == pytest.approx(ref["finetune"]["final_loss"], rel=1e-5)
    assert [p for _, p in res["finetune"]["curve"]] == pytest.approx([p for _, p in ref["finetune"]["curve"]], rel=1e-5)
    assert [e["step"] for e in s.events() if e["type"] == "train"] == list(range(1, 13))  # rank 0 only
    state, _ = checkpoint.load(checkpoint.latest(s.checkpoints_dir))
    assert len(state["rng"]) == 2  # both ranks' RNG streams, for an exact resume


def test_finetuning_a_finetuned_session_again_is_refused(uninterrupted):
    _, _, s, _ = uninterrupted
    import shutil

    from engine.run.session import open_session

    again = s.path.with_name("again")
    shutil.copytree(s.path, again)
    shutil.rmtree(again / "checkpoints")  # what redoing from the finetune stage does
    with pytest.raises(MinigptError, match="already fine-tuned"):
        pipeline.run(open_session(again), redo_from="finetune")
