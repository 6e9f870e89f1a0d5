"""Distillation recovery (finetune.loss = "kd"), teacher correction and the control (issue #13, items 5-7).

- the chunked KL (and its gradient) equals a direct float64 computation with
  torch.nn.functional.kl_div on full softmaxes, at T != 1 with a CE weight;
- with a vocabulary cut the teacher reads the student's ids mapped back to its own and its
  distribution is renormalised over the kept ids: against a hand computation, and a student
  that is its teacher with only the vocabulary cut has KL 0 exactly where an unrestricted
  teacher would not;
- teacher correction and the control run end to end on a tiny model and write their results
  (models "teacher" and "control", their sections, SESSION/teacher/), skip cleanly when off,
  and a resumed run skips them;
- the resume fingerprint holds the loss keys.
The kill -9 mid-KD resume is in tests/test_resume.py (marker `process`).
"""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
import torch.nn.functional as F

import ft_case
import tiny
from ft_case import one_thread  # noqa: F401  (fixture)
from engine.train import distill

pytestmark = pytest.mark.usefixtures("one_thread")


def _direct(s, t, ids, temperature, w, keep=None):
    """The loss by the book, float64: T² · batch-mean KL(softmax(t/T) || softmax(s/T)) + w · CE."""
    v = s.shape[-1]
    t = t.double() if keep is None else t.double()[..., keep]
    s = s.double()
    kl = F.kl_div(F.log_softmax(s / temperature, -1).reshape(-1, v), F.log_softmax(t / temperature, -1).reshape(-1, v),
                  log_target=True, reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(s[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    return kl + w * ce, kl, ce


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_the_kl_equals_a_direct_computation(chunk):
    torch.manual_seed(0)
    b, length, v = 3, 7, 29
    s = (torch.randn(b, length, v) * 3).requires_grad_(True)
    t = torch.randn(b, length, v) * 3
    ids = torch.randint(0, v, (b, length))
    loss, kl, ce = distill.kd_loss(s, t, ids, temperature=2.5, ce_weight=0.3, chunk=chunk)
    loss.backward()
    s64 = s.detach().double().requires_grad_(True)
    ref, ref_kl, ref_ce = _direct(s64, t, ids, 2.5, 0.3)
    ref.backward()
    ref, ref_kl, ref_ce = ref.detach(), ref_kl.detach(), ref_ce.detach()
    assert abs(float(kl) - float(ref_kl)) <= 1e-6 * float(ref_kl)
    assert abs(float(ce) - float(ref_ce)) <= 1e-6 * float(ref_ce)
    assert abs(float(loss) - float(ref)) <= 1e-6 * float(ref)
    assert float(ref_kl) > 0.1  # not a degenerate case
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-8)


def test_without_a_ce_weight_the_loss_is_the_kl_alone_and_zero_against_itself():
    torch.manual_seed(1)
    s = torch.randn(2, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5))
    loss, kl, ce = distill.kd_loss(s, s.detach().clone(), ids, temperature=1.0, ce_weight=0.0)
    assert float(ce) == 0.0 and abs(float(loss)) < 1e-6 and abs(float(kl)) < 1e-6
    loss.backward()
    assert s.grad.abs().max() < 1e-6  # distilling a model into itself: no gradient
    t = torch.randn(2, 5, 11)
    loss, kl, _ = distill.kd_loss(s, t, ids)
    ref, ref_kl, _ = _direct(s.detach(), t, ids, 1.0, 0.0)
    assert abs(float(loss) - float(ref_kl)) <= 1e-6 * float(ref_kl)


def test_with_a_vocabulary_cut_the_teacher_is_renormalised_over_the_kept_ids():
    torch.manual_seed(2)
    teacher_model = tiny.model("llama", seed=4)
    v_t = teacher_model.get_input_embeddings().weight.shape[0]
    keep = torch.tensor(sorted(torch.randperm(v_t)[:120].tolist()))
    teacher = distill.Teacher(teacher_model, keep=keep, student_vocab=120)
    ids = torch.randint(0, 120, (2, 9))  # student ids
    with torch.no_grad():
        full = teacher_model(input_ids=keep[ids]).logits  # the teacher reads the student's text in its own ids
    # only the kept columns are computed (the head's kept rows), in the student's order
    assert teacher.logits(ids).shape == (2, 9, 120)
    torch.testing.assert_close(teacher.logits(ids), full[..., keep], rtol=1e-5, atol=1e-5)
    s = torch.randn(2, 9, 120, requires_grad=True)
    loss, kl, _ = distill.kd_loss(s, teacher.logits(ids), ids, temperature=1.5)
    # the same as cutting the full teacher's logits before the loss
    _, kl_cut, _ = distill.kd_loss(s, full[..., keep], ids, temperature=1.5)
    assert abs(float(kl) - float(kl_cut)) <= 1e-5 * float(kl_cut)
    # by hand: the teacher's probabilities of the kept ids, divided by their sum
    p = torch.softmax(full.double() / 1.5, -1)[..., keep]
    p = p / p.sum(-1, keepdim=True)
    q = torch.log_softmax(s.detach().double() / 1.5, -1)
    hand = (p * (p.log() - q)).sum(-1).mean() * 1.5 ** 2
    assert abs(float(kl) - float(hand)) <= 1e-6 * float(hand)
    # the unrestricted teacher mass on removed ids would make the columns not sum to one
    assert float(torch.softmax(full.double() / 1.5, -1)[..., keep].sum(-1).max()) < 0.9


def test_a_student_that_only_lost_vocabulary_rows_has_kl_zero_to_its_renormalised_teacher():
    import copy

    from engine.prune import vocab

    teacher_model = tiny.model("llama", seed=5)
    tok = tiny.tokenizer()
    counts = torch.zeros(teacher_model.get_input_embeddings().weight.shape[0])
    counts[tok(tiny.TEXT[:300])["input_ids"]] = 1
    student = copy.deepcopy(teacher_model)
    keep = vocab.plan(tok, counts, 0.0, student).keep
    student, new_tok, _ = vocab.prune_vocabulary(student, tok, counts, 0.0)
    assert student.get_input_embeddings().weight.shape[0] == keep.numel() < teacher_model.config.vocab_size
    teacher = distill.Teacher(teacher_model, keep=keep, student_vocab=keep.numel())
    ids = torch.tensor([new_tok(tiny.TEXT[:200])["input_ids"][:40]])
    with torch.no_grad():
        s = student(input_ids=ids).logits
    _, kl, _ = distill.kd_loss(s, teacher.logits(ids), ids)
    assert abs(float(kl)) < 1e-5
    # without the renormalisation (the teacher's softmax over all its ids, cut afterwards) it is not 0
    with torch.no_grad():
        p = torch.softmax(teacher_model(input_ids=keep[ids]).logits.double(), -1)[..., keep]
    wrong = (p * (p.log() - torch.log_softmax(s.double(), -1))).sum(-1).mean()
    assert abs(float(wrong)) > 1e-3


def test_a_teacher_with_another_vocabulary_and_no_map_is_refused():
    from engine.errors import MinigptError

    with pytest.raises(MinigptError, match="no kept-vocabulary map"):
        distill.Teacher(tiny.model("llama"), student_vocab=300)


def test_a_kd_step_reports_kl_and_ce_and_its_loss_is_their_sum():
    from engine.config import FinetuneConfig
    from engine.train import finetune

    teacher_model, student = tiny.model("llama", seed=6), tiny.model("llama", seed=7)
    blocks = torch.randint(0, 300, (8, 16))
    cfg = FinetuneConfig(enabled=True, loss="kd", kd_temperature=2.0, kd_ce_weight=0.5, batch_size=2, grad_accum=2,
                         max_steps=3, lr=1e-3)
    ft = finetune.Finetuner(student, blocks, cfg, seed=0, teacher=teacher_model)
    m = ft.train_step()
    assert m["kl"] > 0 and m["ce"] > 0
    assert abs(m["loss"] - (m["kl"] + 0.5 * m["ce"])) <= 1e-5 * m["loss"]
    assert all(p.requires_grad for p in teacher_model.parameters())  # a borrowed teacher is left as it was
    assert all(p.grad is None for p in teacher_model.parameters())  # and gets no gradient
    assert ft.step == 1


def test_the_resume_fingerprint_holds_the_loss_keys(tmp_path):
    from engine.run import recovery

    cfg = ft_case.config(tmp_path, "llama", finetune={"loss": "kd"})
    job = recovery.Job("finetune", None, None, None, cfg.finetune, tmp_path, "pruned", "finetuned")

    def fp(c):
        return recovery._fingerprint(types.SimpleNamespace(cfg=c, results={}), job, 32, 10)

    base = fp(cfg)
    for key, value in (("loss", "ce"), ("kd_temperature", 2.0), ("kd_ce_weight", 0.1), ("teacher_steps", 3),
                       ("teacher_lr", 1e-4)):
        other = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **{key: value}))
        assert fp(other) != base, key
    # teacher_lr came later: at its default (0, finetune.lr) it is not in the fingerprint, so
    # checkpoints written before the key existed still resume
    assert "teacher_lr" not in base["finetune"] and "teacher_steps" in base["finetune"]
    # the control is a later stage: switching it on does not invalidate the pruned model's checkpoints
    on = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, control=True))
    assert fp(on) == base


def test_a_negative_teacher_lr_is_refused_in_one_line(tmp_path):
    from engine.errors import MinigptError

    with pytest.raises(MinigptError) as e:
        ft_case.config(tmp_path, "llama", finetune={"teacher_steps": 4, "teacher_lr": -1e-4})
    assert "finetune.teacher_lr = -0.0001 is negative" in e.value.line() and "0 to use finetune.lr" in e.value.line()


def test_kd_says_where_its_teacher_puts_the_floor():
    """KL alone cannot take the student past its teacher: the run says where that floor is, and
    warns when the teacher holds out no better than the pruned model (then KL alone cannot help)."""
    from engine.config import FinetuneConfig
    from engine.run import recovery

    def said(teacher_bpb, pruned_bpb, ce_weight=0.0, name="teacher"):
        logs = []
        models = {name: {"bpb": teacher_bpb}, "pruned": {"bpb": pruned_bpb}}
        ctx = types.SimpleNamespace(results={"models": models},
                                    cfg=types.SimpleNamespace(finetune=FinetuneConfig(loss="kd", kd_ce_weight=ce_weight)),
                                    rep=types.SimpleNamespace(log=lambda m, level="info": logs.append((level, m))))
        recovery._headroom(ctx, name)
        return logs

    [(level, msg)] = said(0.41, 0.48)
    assert level == "info" and "0.4100" in msg and "0.4800" in msg and "corrected teacher" in msg
    [(level, msg)] = said(0.50, 0.48, name="base")
    assert level == "warning" and "unpruned model" in msg and "kd_ce_weight" in msg and "teacher_steps" in msg
    [(level, msg)] = said(0.50, 0.48, ce_weight=1.0)
    assert level == "info" and "CE term" in msg
    [(level, msg)] = said(0.41, None)  # the pipeline's order: the pruned model is evaluated after recovery
    assert level == "info" and "0.4100" in msg and "pruned" not in msg
    assert said(None, 0.48) == []  # no held-out figure for the teacher: nothing to say


# ---- the stages end to end ---------------------------------------------------------------------------
KD = {"loss": "kd", "kd_temperature": 2.0, "kd_ce_weight": 0.5, "teacher_steps": 4, "teacher_lr": 1e-3, "control": True}


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    """Teacher correction, vocabulary + MLP pruning, KD recovery and the control, on a tiny llama."""
    from engine.run import pipeline

    tmp = tmp_path_factory.mktemp("kd")
    cfg = ft_case.config(tmp, "llama", finetune=KD, prune={"embedding_threshold": 0.0})
    sess = ft_case.session(tmp, "kd", cfg)
    with ft_case.single_thread():
        results = pipeline.run(sess)
    return tmp, cfg, sess, results


def _skips(sess) -> list[tuple[str, str]]:
    return [(e["stage"], e["reason"]) for e in ft_case.events(sess) if e["type"] == "stage_skip"]


def test_teacher_correction_kd_and_the_control_run_end_to_end(kd_run):
    from engine.models import export
    from engine.run import record

    tmp, cfg, sess, res = kd_run
    assert sess.status() == "done"
    started = [e["stage"] for e in ft_case.events(sess) if e["type"] == "stage_start"]
    assert started == list(record.STAGES)
    models = res["models"]
    for label in ("base", "teacher", "pruned", "finetuned", "control"):
        assert models[label]["ppl"] > 0, label
    # the corrected teacher is saved in the session, and is better on the domain than the base model
    assert (sess.path / "teacher" / "config.json").is_file()
    assert models["teacher"]["ppl"] < models["base"]["ppl"]
    assert res["teacher"]["steps"] == 4 and res["teacher"]["loss"] == "ce"
    # the teacher trains at its own learning rate (finetune.teacher_lr), the recoveries at finetune.lr
    assert res["teacher"]["lr"] == 1e-3 and res["finetune"]["lr"] == res["control"]["lr"] == cfg.finetune.lr == 3e-3
    assert res["teacher"]["path"] == str(sess.path / "teacher")
    # pruning started from it: the calibrated model is the teacher (its params, its bits per byte)
    assert models["base"]["vocab_bpb"] == pytest.approx(models["teacher"]["bpb"], rel=1e-6)
    # the pruned model's KD recovery, from the corrected teacher, over the cut vocabulary
    ft = res["finetune"]
    assert ft["loss"] == "kd" and ft["teacher"] == "teacher" and ft["kd_temperature"] == 2.0
    assert ft["final_kl"] > 0 and ft["final_ce"] > 0
    assert abs(ft["final_loss"] - (ft["final_kl"] + 0.5 * ft["final_ce"])) < 1e-4 * ft["final_loss"]
    keep = export.load_vocab_keep(sess.model_dir)  # saved again with the recovered model
    assert keep is not None and keep.numel() == models["pruned"]["vocab_size"] < models["base"]["vocab_size"]
    trains = [e for e in ft_case.events(sess) if e["type"] == "train"]
    assert all("kl" in e and "ce" in e for e in trains if e.get("stage", "finetune") != "teacher")
    assert not any("kl" in e for e in trains if e.get("stage") == "teacher")  # teacher correction is CE
    assert 0 < max(e["lr"] for e in trains if e.get("stage") == "teacher") <= 1e-3
    assert max(e["lr"] for e in trains if e.get("stage") == "control") > 1e-3
    # the control: the corrected teacher, the pruned model's budget, the same loss, evaluated like it
    c = res["control"]
    assert c["start"] == "teacher" and c["steps"] == ft["steps"] and c["tokens"] == ft["tokens"]
    assert c["loss"] == "kd" and c["kd_ce_weight"] == 0.5
    assert models["control"]["params"] == models["base"]["params"]
    assert models["control"]["ppl"] != models["teacher"]["ppl"]  # it was trained (the CE weight applies)
    first = next(e for e in trains if e.get("stage") == "control")
    assert first["kl"] == 0.0  # the teacher distilled into itself starts at KL 0 ...
    warned = [e["message"] for e in ft_case.events(sess) if e["type"] == "log" and e["level"] == "warning"]
    assert any("distils the corrected teacher into itself" in m for m in warned)  # ... and says so
    infos = [e["message"] for e in ft_case.events(sess) if e["type"] == "log"]
    assert any(f"{models['teacher']['bpb']:.4f}" in m and "CE term" in m for m in infos)  # KD's floor, said
    assert (sess.path / "control_checkpoints").is_dir()
    for name in ("teacher", "finetune", "control"):  # the record's layout (engine/run/record.py RESULTS)
        assert set(res[name]) <= set(record.RESULTS[name].keys), (name, set(res[name]) - set(record.RESULTS[name].keys))


def test_a_resumed_run_skips_the_teacher_and_control_stages(kd_run):
    from engine.run import pipeline

    tmp, cfg, sess, res = kd_run
    before = json.loads((sess.path / "results.json").read_text())
    n = len(ft_case.events(sess))
    with ft_case.single_thread():
        again = pipeline.run(sess)
    new = ft_case.events(sess)[n:]
    assert [(e["stage"], e["reason"]) for e in new if e["type"] == "stage_skip"] == [
        (s, "completed") for s in ("baseline", "teacher", "calibrate", "prune", "finetune", "evaluate", "control")]
    assert not any(e["type"] in ("train", "stage_start") for e in new)
    assert again["models"] == before["models"]


def test_the_monitor_shows_the_optional_stages_when_on_and_hides_them_when_off(kd_run, tmp_path):
    from engine.run import pipeline
    from minigpt_tui.runview import RunView

    _, _, sess, _ = kd_run
    view = RunView()
    view.apply(ft_case.events(sess))
    assert [(s.name, s.status) for s in view.ordered_stages()] == [
        (s, "done") for s in ("baseline", "teacher", "calibrate", "prune", "finetune", "evaluate", "control")]
    # the loss curve is the pruned model's recovery only
    assert len(view.losses) == json.loads((sess.path / "results.json").read_text())["finetune"]["steps"]

    cfg = ft_case.config(tmp_path, "llama", finetune={"max_steps": 2, "eval_every": 2})
    off = ft_case.session(tmp_path, "off", cfg)
    with ft_case.single_thread():
        res = pipeline.run(off)
    assert off.status() == "done"
    assert ("teacher", "off (finetune.teacher_steps = 0)") in _skips(off)
    assert ("control", "off (finetune.control = false)") in _skips(off)
    assert "teacher" not in res["models"] and "control" not in res["models"]
    assert "teacher" not in res and "control" not in res and res["finetune"]["loss"] == "ce"
    assert not (off.path / "teacher").exists() and not (off.path / "control_checkpoints").exists()
    assert not any("kl" in e for e in ft_case.events(off) if e["type"] == "train")
    view = RunView()
    view.apply(ft_case.events(off))
    assert [s.name for s in view.ordered_stages()] == ["baseline", "calibrate", "prune", "finetune", "evaluate"]
    with ft_case.single_thread():  # resumed: the off stages stay hidden
        pipeline.run(off)
    view = RunView()
    view.apply(ft_case.events(off))
    assert [s.name for s in view.ordered_stages()] == ["baseline", "calibrate", "prune", "finetune", "evaluate"]


@pytest.mark.process
def test_torchrun_two_processes_distil_like_one(kd_run):
    """Under torchrun (gloo, CPU) every stage runs on both ranks: the student is DDP and each rank
    holds its own replica of the teacher; teacher correction and the control are DDP too. The
    same numbers as the single process."""
    import subprocess
    import sys

    tmp, cfg, _, ref = kd_run
    s = ft_case.session(tmp, "kd-ddp", cfg)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "engine.run.runner", str(s.path)], cwd=ft_case.ROOT, env=ft_case.env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert s.status() == "done"
    res = json.loads((s.path / "results.json").read_text())
    for key in ("final_loss", "final_kl", "final_ce"):
        assert res["finetune"][key] == pytest.approx(ref["finetune"][key], rel=1e-5), key
    assert [v for _, v in res["finetune"]["curve"]] == pytest.approx([v for _, v in ref["finetune"]["curve"]], rel=1e-5)
    for label in ("teacher", "finetuned", "control"):
        assert res["models"][label]["ppl"] == pytest.approx(ref["models"][label]["ppl"], rel=1e-5), label
    trains = [e for e in s.events() if e["type"] == "train" and "stage" not in e]
    assert [e["step"] for e in trains] == list(range(1, res["finetune"]["steps"] + 1))  # rank 0 writes, once


def test_calibration_is_keyed_by_the_corrected_teacher(kd_run):
    from engine.prune.calibrate import Stats

    _, cfg, sess, _ = kd_run
    meta = Stats.load(sess.stats_dir).meta
    assert meta["model"].startswith(cfg.model.source + "#teacher-")  # never the base model's cache entry


def test_a_stop_in_teacher_correction_and_in_the_control_resumes_to_the_same_numbers(kd_run, tmp_path):
    from engine.run import pipeline

    tmp, cfg, _, ref = kd_run
    s = ft_case.session(tmp, "kd-stopped", cfg)
    where = {"teacher": 2, "control": 5}

    def stop(e):  # what `minigpt stop` writes, at a step of each stage
        if e["type"] == "train" and where.get(e.get("stage")) == e["step"]:
            where.pop(e["stage"])
            (s.path / "stop.request").write_text("stop\n")

    runs = 0
    with ft_case.single_thread():
        while s.status() != "done":
            pipeline.run(s, display=stop)
            runs += 1
            assert runs <= 3
    assert runs == 3 and not where
    logs = [e["message"] for e in ft_case.events(s) if e["type"] == "log"]
    assert any(m.startswith("resuming teacher correction from checkpoint at step 2") for m in logs)
    assert any(m.startswith("resuming the control's recovery from checkpoint at step 5") for m in logs)
    res = json.loads((s.path / "results.json").read_text())
    for label in ("teacher", "pruned", "finetuned", "control"):
        assert res["models"][label]["ppl"] == pytest.approx(ref["models"][label]["ppl"], rel=1e-6), label
    assert [st for st, _ in res["control"]["curve"]] == [st for st, _ in ref["control"]["curve"]]
    assert [v for _, v in res["control"]["curve"]] == pytest.approx([v for _, v in ref["control"]["curve"]], rel=1e-6)


def test_switching_the_control_on_later_runs_it_on_a_redo_of_evaluate(tmp_path):
    from engine import atomic
    from engine.run import pipeline

    cfg = ft_case.config(tmp_path, "llama", finetune={"max_steps": 3, "eval_every": 3})
    s = ft_case.session(tmp_path, "later", cfg)
    with ft_case.single_thread():
        pipeline.run(s)
        assert "control" not in s.results()["models"]
        on = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, control=True))
        atomic.write_text(s.path / "config.toml", on.to_toml())  # what `minigpt eval SESSION --set ...` does
        pipeline.run(s, redo_from="evaluate")
    res = s.results()
    assert s.status() == "done" and res["control"]["steps"] == res["finetune"]["steps"] == 3
    assert res["control"]["loss"] == "ce" and res["models"]["control"]["ppl"] > 0


@pytest.mark.parametrize("family", ["llama", "phi", "gpt2", "gemma3"])
def test_the_teachers_kept_columns_equal_its_full_logits_cut(family):
    """Bias (Phi's LM head), tied heads (GPT-2), the soft-cap (a Gemma 3 config with one set):
    the kept-rows head gives the full forward's logits at the kept ids."""
    model = tiny.model(family, seed=6)
    if family == "gemma3":
        model.config.final_logit_softcapping = 3.0  # small, so the cap changes the logits
    v = model.get_input_embeddings().weight.shape[0]
    keep = torch.tensor(sorted(torch.randperm(v, generator=torch.Generator().manual_seed(1))[:50].tolist()))
    teacher = distill.Teacher(model, keep=keep, student_vocab=50)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        full = model(input_ids=keep[ids]).logits
    got = teacher.logits(ids)
    torch.testing.assert_close(got, full[..., keep], rtol=1e-5, atol=1e-5)
    if family == "gemma3":  # the cap was in force: the raw head gives other logits
        with torch.no_grad():
            raw = model.get_output_embeddings()(model.get_decoder()(input_ids=keep[ids]).last_hidden_state)
        assert (raw - full).abs().max() > 1e-2
