"""Kill -9 mid-run, resume, and finish with the numbers of a run that was never interrupted.

The runner is a real subprocess (`python -m engine.run.runner SESSION`, the detached child's
entry point). It is frozen with SIGSTOP, checked to be inside the stage under test, then
SIGKILLed: no handler, no graceful checkpoint. The resumed run must reproduce the
uninterrupted run's final training loss, its whole held-out perplexity curve and the
calibration statistics (equal within 1e-6; in practice bit for bit).
"""

from __future__ import annotations

import json

import pytest
import torch

import ft_case
from ft_case import one_thread, reaper  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.process]

# structural pruning of a GPT-2 with dropout 0.1: resuming must restore the RNG stream too
SECTIONS = dict(
    calibrate={"block_size": 32, "max_tokens": 16384, "batch_size": 1, "checkpoint_every": 4},
    finetune={"max_steps": 40, "eval_every": 10, "checkpoint_every": 5},
)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from engine.run import pipeline

    tmp = tmp_path_factory.mktemp("resume")
    ft_case.corpus(tmp / "data", docs=150)
    cfg = ft_case.config(tmp, "gpt2", **SECTIONS)
    ref = ft_case.session(tmp, "reference", cfg)
    with ft_case.single_thread():  # as the runners (OMP_NUM_THREADS=1, ft_case.env)
        results = pipeline.run(ref)
    assert ref.status() == "done"
    return tmp, cfg, ref, results


def _stats(sess) -> dict:
    from safetensors.torch import load_file

    return load_file(str(sess.stats_dir / "calibration.safetensors"))


def _losses(sess) -> dict[int, set]:
    out: dict[int, set] = {}
    for e in ft_case.events(sess):
        if e["type"] == "train":
            out.setdefault(e["step"], set()).add(e["loss"])
    return out


def _assert_same_finish(sess, ref, ref_results) -> None:
    res = json.loads((sess.path / "results.json").read_text())
    ft, rft = res["finetune"], ref_results["finetune"]
    assert ft["steps"] == rft["steps"] == 40
    assert abs(ft["final_loss"] - rft["final_loss"]) <= 1e-6, (ft["final_loss"], rft["final_loss"])
    assert [s for s, _ in ft["curve"]] == [s for s, _ in rft["curve"]] == [0, 10, 20, 30, 40]
    for (_, a), (_, b) in zip(ft["curve"], rft["curve"]):
        assert abs(a - b) <= 1e-6 * b
    for label in ("base", "pruned", "finetuned"):  # finetuned: re-measured from the saved model
        a, b = res["models"][label]["ppl"], ref_results["models"][label]["ppl"]
        assert abs(a - b) <= 1e-6 * b, (label, a, b)
    # every step logged twice (before the kill and on replay) logged the same loss, the reference's
    ref_losses = _losses(ref)
    for step, seen in _losses(sess).items():
        assert seen == ref_losses[step], (step, seen, ref_losses[step])
    stats, ref_stats = _stats(sess), _stats(ref)
    assert stats.keys() == ref_stats.keys()
    for k in stats:
        assert torch.equal(stats[k], ref_stats[k]), k


def _logs(sess) -> list[str]:
    return [e["message"] for e in ft_case.events(sess) if e["type"] == "log"]


def _wait_past_checkpoint(sess, proc, what: str) -> dict:
    """Wait until the runner is two steps past a checkpoint at step >= 10; returns {ckpt, step}."""
    seen, tail = {}, ft_case.Tail(sess)

    def past_checkpoint():
        ev = tail()
        ck = [e["step"] for e in ev if e["type"] == "checkpoint"]
        tr = [e["step"] for e in ev if e["type"] == "train"]
        if ck and ck[-1] >= 10 and tr and tr[-1] >= ck[-1] + 2:
            seen.update(ckpt=ck[-1], step=tr[-1])
            return True
        return False

    ft_case.wait_for(past_checkpoint, proc, what=what)
    return seen


def test_sigkill_during_finetune_then_resume_matches_uninterrupted(case, reaper):
    tmp, cfg, ref, ref_results = case
    sess = ft_case.session(tmp, "killed-in-finetune", cfg)
    proc = ft_case.start_runner(sess, reaper)
    seen = _wait_past_checkpoint(sess, proc, "two steps past a fine-tuning checkpoint at step >= 10")
    ft_case.freeze_and_kill(proc, lambda: sess.state().get("model_is") == "pruned"
                            and not any(e["type"] == "stage_end" and e["stage"] == "finetune"
                                        for e in ft_case.events(sess)))
    assert sess.status() == "disconnected"  # state says running, nobody holds the lock

    proc = ft_case.start_runner(sess, reaper)
    assert proc.wait(timeout=600) == 0, (sess.path / "test-runner.log").read_text()[-3000:]
    assert sess.status() == "done"
    resumed = [m for m in _logs(sess) if m.startswith("resuming fine-tuning from checkpoint at step")]
    assert len(resumed) == 1
    step = int(resumed[0].split("step ")[1].split()[0])
    assert seen["ckpt"] <= step < seen["step"] + 5  # resumed from a checkpoint, replaying steps already done
    starts = [e for e in ft_case.events(sess) if e["type"] == "run_start"]
    assert [e["resumed"] for e in starts] == [False, True]
    skipped = [e["stage"] for e in ft_case.events(sess) if e["type"] == "stage_skip" and e["reason"] == "completed"]
    assert skipped == ["baseline", "teacher", "calibrate", "prune"]  # completed (teacher: off) stages are not redone
    _assert_same_finish(sess, ref, ref_results)
    # at most keep_checkpoints complete checkpoints remain, the last one is the end of the stage
    from engine.train import checkpoint

    kept = checkpoint.complete(sess.checkpoints_dir)
    assert len(kept) == 2 and kept[-1][0] == 40


def test_sigkill_during_calibration_then_resume_matches_uninterrupted(case, reaper):
    tmp, cfg, ref, ref_results = case
    sess = ft_case.session(tmp, "killed-in-calibration", cfg)
    partial = sess.stats_dir / "partial.pt"
    proc = ft_case.start_runner(sess, reaper)
    ft_case.wait_for(lambda: partial.exists() and torch.load(partial, weights_only=True)["batch"] >= 40, proc,
                     what="a partial calibration save at batch >= 40")
    ft_case.freeze_and_kill(proc, lambda: partial.exists()
                            and not (sess.stats_dir / "calibration.safetensors").exists())

    proc = ft_case.start_runner(sess, reaper)
    assert proc.wait(timeout=600) == 0, (sess.path / "test-runner.log").read_text()[-3000:]
    resumed = [m for m in _logs(sess) if m.startswith("resuming calibration at batch")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 40
    assert not partial.exists()
    _assert_same_finish(sess, ref, ref_results)


# ---- distillation -------------------------------------------------------------------------------------
KD_SECTIONS = dict(
    calibrate={"block_size": 32, "max_tokens": 4096, "batch_size": 2},
    prune={"embedding_threshold": 0.0},  # a cut vocabulary: the teacher reads mapped ids, renormalised
    finetune={"max_steps": 40, "eval_every": 10, "checkpoint_every": 5, "loss": "kd", "kd_temperature": 2.0,
              "kd_ce_weight": 0.2},
)


@pytest.fixture(scope="module")
def kd_case(tmp_path_factory):
    from engine.run import pipeline

    tmp = tmp_path_factory.mktemp("resume-kd")
    ft_case.corpus(tmp / "data", docs=150)
    cfg = ft_case.config(tmp, "gpt2", **KD_SECTIONS)  # GPT-2 with dropout 0.1: the student's RNG stream matters
    ref = ft_case.session(tmp, "reference", cfg)
    with ft_case.single_thread():
        results = pipeline.run(ref)
    assert ref.status() == "done"
    return tmp, cfg, ref, results


def _weights(sess) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(sess.model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_sigkill_during_kd_then_resume_matches_uninterrupted(kd_case, reaper):
    tmp, cfg, ref, ref_results = kd_case
    sess = ft_case.session(tmp, "killed-in-kd", cfg)
    proc = ft_case.start_runner(sess, reaper)
    seen = _wait_past_checkpoint(sess, proc, "two KD steps past a checkpoint at step >= 10")
    ft_case.freeze_and_kill(proc, lambda: not any(e["type"] == "stage_end" and e["stage"] == "finetune"
                                                  for e in ft_case.events(sess)))
    proc = ft_case.start_runner(sess, reaper)
    assert proc.wait(timeout=600) == 0, (sess.path / "test-runner.log").read_text()[-3000:]
    assert sess.status() == "done"
    resumed = [m for m in _logs(sess) if m.startswith("resuming fine-tuning from checkpoint at step")]
    assert len(resumed) == 1
    assert seen["ckpt"] <= int(resumed[0].split("step ")[1].split()[0]) < seen["step"] + 5
    res = json.loads((sess.path / "results.json").read_text())
    ft, rft = res["finetune"], ref_results["finetune"]
    assert ft["loss"] == rft["loss"] == "kd" and ft["steps"] == rft["steps"] == 40
    for key in ("final_loss", "final_kl", "final_ce"):
        assert ft[key] == rft[key], key
    assert ft["curve"] == rft["curve"]
    # every train event (steps replayed after the kill included) carries the reference's loss, KL and CE
    ref_steps = {e["step"]: (e["loss"], e["kl"], e["ce"]) for e in ft_case.events(ref) if e["type"] == "train"}
    for e in ft_case.events(sess):
        if e["type"] == "train":
            assert (e["loss"], e["kl"], e["ce"]) == ref_steps[e["step"]], e["step"]
    # the same weights, bit for bit
    a, b = _weights(sess), _weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res["models"]["finetuned"]["ppl"] == ref_results["models"]["finetuned"]["ppl"]
