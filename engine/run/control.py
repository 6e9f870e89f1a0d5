"""The two stages around the pruned model's recovery that train the unpruned one.

- "teacher" (between baseline and calibrate; on when `finetune.teacher_steps > 0`): teacher
  correction. The base model is fine-tuned on the domain's fine-tune split by cross-entropy
  for `teacher_steps` steps, resumably (`SESSION/teacher_checkpoints/`), saved in
  `SESSION/teacher/` and evaluated (model label "teacher"); calibration, pruning,
  distillation and the control then start from it (`engine.run.teacher`).
- "control" (after evaluate; on when `finetune.control = true`): the honest control. The
  unpruned model (the corrected teacher, if any) is recovered with the pruned model's token
  budget (the steps its recovery took, of the same batch) and the same loss, resumably
  (`SESSION/control_checkpoints/`), and evaluated like the final model (model label
  "control"), so every table can put "unpruned, same recovery" beside the pruned rows.

Under torchrun both run on every rank like every stage (DDP or FSDP2, as the finetune stage).
"""

from __future__ import annotations

import dataclasses

CONTROL_CHECKPOINTS = "control_checkpoints"


def off_reason(cfg, stage: str) -> str | None:
    """Why the config leaves an optional stage off (the stage_skip reason), or None when on."""
    from engine.run import record

    f = cfg.finetune
    if stage == "teacher" and f.teacher_steps <= 0:
        return f"{record.SKIP_OFF} (finetune.teacher_steps = 0)"
    if stage == "control":
        if not f.control:
            return f"{record.SKIP_OFF} (finetune.control = false)"
        if not f.enabled:
            return f"{record.SKIP_OFF} (finetune.enabled = false: no recovery to match)"
    return None


def stage_teacher(ctx) -> None:
    from engine.models import export
    from engine.run import recovery, stages
    from engine.run import teacher as teacher_mod

    f = ctx.cfg.finetune
    model = ctx.base_model()
    ctx.model_is = ""  # trained in place below: no longer the base model
    cfg = dataclasses.replace(f, loss="ce", max_steps=f.teacher_steps, max_epochs=0.0, target_ppl_ratio=0.0,
                              lr=f.teacher_lr or f.lr)
    base_ppl = ctx.results.get("models", {}).get("base", {}).get("ppl")
    job = recovery.Job("teacher", model, ctx.tokenizer, ctx.domain(), cfg, teacher_mod.checkpoints(ctx.session),
                       before=None, after="teacher", base_ppl=base_ppl, total_steps=f.teacher_steps)
    final = recovery.train(ctx, job)
    path = export.save_model(final, ctx.tokenizer, teacher_mod.folder(ctx.session),
                             meta={"stage": "teacher", "base": ctx.cfg.model.source, "steps": f.teacher_steps})
    ctx.rep.section("teacher", {**ctx.results.get("teacher", {}), "path": str(path)})
    ctx.model, ctx.model_is = final, "teacher"
    stages._evaluate(ctx, final, "teacher", "teacher")


def stage_control(ctx) -> None:
    from engine.models import export
    from engine.models.adapters import model_context
    from engine.run import recovery, stages
    from engine.run import teacher as teacher_mod
    from engine.train import distill

    f = ctx.cfg.finetune
    steps = (ctx.results.get("finetune") or {}).get("steps")
    model, tok, name = teacher_mod.load_unpruned(ctx)
    same_vocab = export.load_vocab_keep(ctx.session.model_dir) is None
    if same_vocab and ctx.data is not None:
        data = ctx.data
    else:  # the pruned model's splits hold its own ids: the same documents, tokenized for the unpruned model
        block = max(1, min(ctx.cfg.calibrate.block_size, model_context(model)))
        data = stages.load_domain(ctx.cfg, ctx.cfg.data, tok, block)
    teacher = None
    if f.loss == "kd":
        ctx.rep.log(f"the control distils the {'corrected teacher' if name == 'teacher' else 'unpruned model'} "
                    "into itself, as the config asks (loss = kd): the KL is 0 at the start, so at first only "
                    f"finetune.kd_ce_weight x CE (= {f.kd_ce_weight:g} x CE) moves it", level="warning")
        t_model, _, _ = teacher_mod.load_unpruned(ctx)
        teacher = distill.Teacher(t_model.to(next(model.parameters()).device), owned=True)
    if steps is None:
        steps = _planned_steps(ctx, f, data, model)
        ctx.rep.log(f"no recorded recovery steps: the control runs the configured {steps}", level="warning")
    cfg = dataclasses.replace(f, target_ppl_ratio=0.0)  # the pruned model's budget, not a ppl target
    ctx.rep.log(f"control: recovering the {'corrected teacher' if name == 'teacher' else 'unpruned model'} "
                f"for {steps} steps, as the pruned model was")
    if steps > 0:
        job = recovery.Job("control", model, tok, data, cfg, ctx.session.path / CONTROL_CHECKPOINTS, before=None,
                           after="control", teacher=teacher, teacher_name=name if teacher else None,
                           total_steps=steps)
        final = recovery.train(ctx, job)
    else:
        final = model.eval()
    ctx.rep.section("control", {**ctx.results.get("control", {}), "start": name, "steps": steps})
    sub = stages.Context(ctx.cfg, ctx.session, ctx.rep, model=final, tokenizer=tok, data=data, model_is="control")
    stages._evaluate(sub, final, "control", "control")


def _planned_steps(ctx, f, data, model) -> int:
    from engine.data.domain import blocks
    from engine.models.adapters import model_context
    from engine.train import finetune

    block = max(2, min(f.block_size, model_context(model)))
    return finetune.plan_steps(f, max(1, blocks(data.finetune, block).shape[0] // f.batch_size))[0]
