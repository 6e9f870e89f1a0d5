"""The finetune stage: recovery fine-tuning of the pruned model, resumable to the bit.

The stage layer around `engine.train.finetune`: it packs the fine-tune split, sets the
held-out target, resumes from the session's checkpoints (refusing ones written under
another configuration), runs `finetune.recover` with hooks that report and checkpoint,
and saves the recovered model in place of the pruned one. Under torchrun every rank runs
this same code (SPMD): the student is DDP or FSDP2 (`[distributed] strategy`), each rank
trains on its rows of every batch and measures its share of the held-out windows, stop
requests and checkpoints are collectives, and only rank 0's writes reach the session.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from engine.errors import MinigptError
from engine.run.reporter import StopRequested

GPU_EVERY_STEPS = 10  # under torchrun: every rank's GPU memory sampled (a collective) every this many steps


@dataclasses.dataclass
class Job:
    """One recovery run: which model, on what, against which teacher, and where it goes.

    The finetune stage recovers the pruned model (`student_job`); teacher correction
    (`engine.run.teacher`) and the control (`engine.run.control`) train the unpruned model
    through the same loop, each with its own checkpoints folder and results section."""

    stage: str  # "finetune" | "teacher" | "control": the events' stage and the results section
    model: object
    tokenizer: object
    data: object  # DomainData: its finetune split is trained on, its evaluate split measured
    cfg: object  # the FinetuneConfig this run uses (teacher correction: CE, teacher_steps)
    ckdir: Path
    before: str | None  # the model label of step 0's ppl metric (None: measured elsewhere already)
    after: str  # the model label of the result
    masks: dict = dataclasses.field(default_factory=dict)
    teacher: object = None  # distill.Teacher when cfg.loss = "kd"
    teacher_name: str | None = None  # what the teacher is ("base", "teacher": the corrected one)
    target: float | None = None
    base_ppl: float | None = None
    total_steps: int | None = None  # None: from the config's limits
    vocab_keep: object = None  # the student's kept-vocabulary map, saved with it again


def run(ctx) -> None:
    """The finetune stage: recover the pruned model (CE, or KD from the unpruned teacher)."""
    job = student_job(ctx)
    final = train(ctx, job)
    if final is not None:
        _save(ctx, job, final)


def student_job(ctx) -> Job:
    from engine.models import export

    model = ctx.current_model()  # before domain(): it would otherwise load the base model
    f = ctx.cfg.finetune
    target, base_ppl = _target(ctx)
    keep = export.load_vocab_keep(ctx.session.model_dir) if ctx.session.state().get("model_is") else None
    teacher, name = (load_teacher(ctx, model, keep) if f.loss == "kd" else (None, None))
    return Job("finetune", model, ctx.tokenizer, ctx.domain(), f, ctx.session.checkpoints_dir, "pruned", "finetuned",
               masks=ctx.masks, teacher=teacher, teacher_name=name, target=target, base_ppl=base_ppl,
               vocab_keep=keep)


def load_teacher(ctx, student, keep=None):
    """(distill.Teacher, its name): the unpruned model, or the corrected teacher when teacher
    correction is on, loaded fresh (ctx.model, the student, is left alone) on the student's device."""
    from engine.run import teacher as teacher_mod
    from engine.train import distill

    model, _, name = teacher_mod.load_unpruned(ctx)
    model = model.to(next(student.parameters()).device)
    ctx.rep.log(f"distilling from the {'corrected teacher' if name == 'teacher' else 'unpruned model'} "
                f"(KL at T = {ctx.cfg.finetune.kd_temperature:g}"
                + (f" + {ctx.cfg.finetune.kd_ce_weight:g} x CE" if ctx.cfg.finetune.kd_ce_weight > 0 else "")
                + (f"; its distribution restricted to the {keep.numel():,} kept ids" if keep is not None else "") + ")")
    _headroom(ctx, name)
    return distill.Teacher(model, keep=keep, student_vocab=student.get_input_embeddings().weight.shape[0],
                           owned=True), name


def _headroom(ctx, teacher_name: str) -> None:
    """KL alone pulls the student to its teacher, not past it: say where that floor is, against the
    pruned model where its held-out bits per byte are measured already (compress_table's order)."""
    models = ctx.results.get("models", {})
    t, s = (models.get(teacher_name) or {}).get("bpb"), (models.get("pruned") or {}).get("bpb")
    if t is None:
        return
    who = "corrected teacher" if teacher_name == "teacher" else "unpruned model"
    pruned = f", the pruned model at {s:.4f}" if s is not None else ""
    if ctx.cfg.finetune.kd_ce_weight > 0:
        ctx.rep.log(f"the {who} holds out at {t:.4f} bits per byte{pruned}; the CE term can take the student "
                    "past the teacher")
    elif s is not None and t >= s:
        ctx.rep.log(f"the {who} holds out at {t:.4f} bits per byte, no better than the pruned model's {s:.4f}: "
                    "KL alone cannot improve it — set finetune.kd_ce_weight, or correct the teacher first "
                    "(finetune.teacher_steps)", level="warning")
    else:
        ctx.rep.log(f"KL alone brings the student at best to its teacher: the {who} holds out at {t:.4f} bits "
                    f"per byte{pruned}")


def train(ctx, job: Job):
    """Run a job's recovery loop (resuming from its checkpoints); the finished model (on every
    rank). Raises StopRequested after a graceful stop (checkpoint written first)."""
    from engine.train import checkpoint as ckpt_mod
    from engine.train import finetune

    dist = ctx.dist
    dcfg = ctx.cfg.distributed
    data, block = _train_blocks(job.cfg, job.data, job.model)
    ckpt_mod.seed_everything(ctx.cfg.seed + dist.rank)  # dropout differs per rank; data order comes from Batches
    ft = finetune.Finetuner(job.model, data, job.cfg, seed=ctx.cfg.seed, masks=job.masks, dist=dist,
                            total_steps=job.total_steps, teacher=job.teacher, strategy=dcfg.strategy,
                            shard_teacher=dcfg.shard_teacher)
    fp = _fingerprint(ctx, job, block, data.shape[0])
    last = dist.bcast(str(ckpt_mod.latest(job.ckdir) or "") if dist.main else None)  # rank 0's view
    last = Path(last) if last else None
    prog = _resume(ctx, job, ft, last, fp)
    resumed_from = ft.step if last is not None else None

    checkpoint = _checkpointer(ctx, job, ft, prog, fp)
    hooks = finetune.Hooks(held_out=_held_out(ctx, job, ft, prog), on_step=_on_step(ctx, job, ft),
                           checkpoint=checkpoint, stop_requested=ctx.rep.stop_requested)
    _announce(ctx, job, ft, data, block)
    if not prog.curve:  # the model's held-out ppl before training: the start of the recovery curve
        ppl = hooks.held_out()
        if job.target is not None and ppl <= job.target:
            prog.stopped_because = "target_ppl"
    if job.before:
        ctx.rep.model_entry(job.before).update(prog.pruned or {})
    if finetune.recover(ft, prog, job.target, hooks):
        ctx.rep.log(f"stopped at step {ft.step}; continue with: minigpt resume {ctx.session.id}")
        raise StopRequested()
    if resumed_from != ft.step or last is None:  # the end-of-stage checkpoint
        checkpoint()
    ctx.rep.log(f"{_what(job)} stopped after {ft.step} steps ({prog.stopped_because}); "
                f"held-out ppl {prog.curve[-1][1]:.4f}")
    final = ft.finished_model()
    _record(ctx, job, ft, prog, block, resumed_from, final)
    return final


def _what(job: Job) -> str:
    return {"finetune": "fine-tuning", "teacher": "teacher correction", "control": "the control's recovery"}[job.stage]


def _train_blocks(f, d, model):
    from engine.data.domain import blocks
    from engine.models.adapters import model_context

    block = max(2, min(f.block_size, model_context(model)))
    data = blocks(d.finetune, block)
    if data.shape[0] < f.batch_size:
        raise MinigptError(f"the fine-tune split has {d.finetune.numel()} tokens: {data.shape[0]} block(s) of "
                           f"{block}, fewer than finetune.batch_size = {f.batch_size}",
                           "lower finetune.block_size or batch_size, or raise data.finetune_fraction")
    return data, block


def _target(ctx) -> tuple[float | None, float | None]:
    f = ctx.cfg.finetune
    base_ppl = ctx.results.get("models", {}).get("base", {}).get("ppl")
    target = base_ppl * f.target_ppl_ratio if base_ppl and f.target_ppl_ratio > 0 else None
    if target is None and f.target_ppl_ratio > 0:
        ctx.rep.log("no base-model perplexity (evaluate.evaluate_base = false): fine-tuning runs to its step limit",
                    level="warning")
    return target, base_ppl


def _fingerprint(ctx, job: Job, block_size: int, n_blocks: int) -> dict:
    """What a checkpoint must have been written under to be resumed: every fine-tuning key but
    RESUMABLE_KEYS (the loss, its temperature and CE weight, teacher_steps included), the
    seed, model, data and pruning settings, the blocks, and for a job other than finetune
    its stage, step budget and teacher."""
    from engine.train.finetune import RESUMABLE_KEYS

    f = {k: v for k, v in dataclasses.asdict(ctx.cfg.finetune).items() if k not in RESUMABLE_KEYS}
    if not f["teacher_lr"]:  # added later: absent at its default, so checkpoints written before it still resume
        del f["teacher_lr"]
    fp = {"finetune": f, "seed": ctx.cfg.seed, "model": ctx.cfg.model.source,
          "data": dataclasses.asdict(ctx.cfg.data), "prune": dataclasses.asdict(ctx.cfg.prune),
          "widths": ctx.results.get("prune", {}).get("widths"), "block_size": block_size, "blocks": n_blocks}
    if ctx.cfg.distributed.strategy != "ddp":  # sharded checkpoints (DDP's and one process's are alike)
        fp["strategy"] = ctx.cfg.distributed.strategy
    if job.stage != "finetune":
        fp["prune"] = fp["widths"] = None  # the unpruned model: pruning does not touch it
        fp.update(stage=job.stage, total_steps=job.total_steps, teacher=job.teacher_name)
    return json.loads(json.dumps(fp))


def _resume(ctx, job: Job, ft, last: Path | None, fp: dict):
    """The loop's state from the newest checkpoint (a fresh `Progress` without one)."""
    from engine.train import checkpoint as ckpt_mod
    from engine.train.finetune import Progress

    ckdir = job.ckdir
    if last is None:
        if job.stage == "finetune" and ctx.session.state().get("model_is") == "finetuned":
            # model/ holds the fine-tuned model (the pruned one was replaced): never fine-tune it twice by accident
            raise MinigptError(f"session {ctx.session.id} is already fine-tuned and has no checkpoint to resume from",
                               f"to fine-tune again from the pruned model, redo pruning: minigpt prune {ctx.session.id}")
        return Progress()
    state, meta = ckpt_mod.load(last, map_location=ft.device)
    if meta.get("fingerprint") != fp:
        key = next((k for k in fp if fp[k] != meta.get("fingerprint", {}).get(k)), "?")
        raise MinigptError(f"the fine-tuning checkpoints in {ckdir} were written with a different "
                           f"configuration ({key} differs)",
                           f"restore the previous settings, or delete {ckdir} to start {_what(job)} again")
    ft.load_state_dict(state, sharded_dir=ckpt_mod.sharded_dir(last))
    ctx.rep.log(f"resuming {_what(job)} from checkpoint at step {ft.step} ({last.name})")
    if len(state["rng"] if isinstance(state["rng"], list) else [1]) != ft.dist.world:
        ctx.rep.log("the checkpoint was written by another number of processes: RNG streams (dropout) "
                    "restart, so this resume is valid but not bit-identical", level="warning")
    return Progress(**state["progress"])


def _stage_field(job: Job) -> dict:
    """The `stage` field of train/eval/checkpoint events: absent for finetune (as before)."""
    return {} if job.stage == "finetune" else {"stage": job.stage}


def _checkpointer(ctx, job: Job, ft, prog, fp: dict):
    from engine.train import checkpoint as ckpt_mod

    def save() -> None:  # every rank: its RNG state (gathered), its shards under FSDP
        path = ckpt_mod.save(job.ckdir, ft.step,
                             {**ft.state_dict(), "progress": dataclasses.asdict(prog)},
                             meta={"fingerprint": fp, "stopped_because": prog.stopped_because},
                             keep=ctx.cfg.finetune.keep_checkpoints, sharded=ft.sharded_state(), dist=ft.dist)
        ctx.rep.emit("checkpoint", step=ft.step, path=str(path), **_stage_field(job))

    return save


def _held_out(ctx, job: Job, ft, prog):
    e, d = ctx.cfg.evaluate, job.data

    def measure() -> float:
        res = ft.perplexity(d.evaluate, e.block_size, e.stride, e.batch_size)
        res["protocol"]["vocab_size"] = len(job.tokenizer)
        prog.curve.append([ft.step, res["ppl"]])
        ctx.rep.emit("eval", step=ft.step, ppl=round(res["ppl"], 6), target_ppl=job.target, **_stage_field(job))
        if ft.step == 0 and prog.pruned is None and job.before:
            prog.pruned = {"ppl": res["ppl"], "ppl_protocol": res["protocol"]}
            ctx.rep.metric(job.stage, job.before, "ppl", res["ppl"], protocol=res["protocol"])
        return res["ppl"]

    return measure


def _on_step(ctx, job: Job, ft):
    total = ft.total_steps
    prog_stage = job.stage

    def report(m: dict) -> None:
        extra = {}
        if m.get("kl") is not None:
            extra["kl"] = round(m["kl"], 6)
        if m.get("ce") is not None:
            extra["ce"] = round(m["ce"], 6)
        ctx.rep.emit("train", step=ft.step, total_steps=total, loss=round(m["loss"], 6), lr=m["lr"],
                     grad_norm=round(m["grad_norm"], 6), tokens_per_s=round(m["tokens_per_s"], 1),
                     eta_s=round(m["eta_s"], 1), epoch=ft.epoch(), **extra, **_stage_field(job))
        ctx.rep.progress(prog_stage, ft.step, total, "steps", rate=m["steps_per_s"])
        if ctx.dist.on and (ft.step == 1 or ft.step % GPU_EVERY_STEPS == 0):  # every rank's memory, per rank
            ctx.rep.gpu_all()

    return report


def _announce(ctx, job: Job, ft, data, block) -> None:
    f, target, base_ppl = job.cfg, job.target, job.base_ppl
    loss = (f"KD (KL at T = {f.kd_temperature:g}" + (f" + {f.kd_ce_weight:g} x CE" if f.kd_ce_weight > 0 else "")
            + ")" if f.loss == "kd" else "CE")
    ctx.rep.log(f"{_what(job)}: up to {ft.total_steps} steps ({ft.limit}) of {f.batch_size}×{f.grad_accum}×{block} "
                f"tokens on {data.shape[0]} blocks ({ft.batches.per_epoch} batches/epoch); {loss}, lr {f.lr:g} "
                f"{f.schedule}, " + (f"LoRA r={f.lora_rank}, " if f.lora_rank > 0 else "")
                + (f"stop at held-out ppl <= {target:.4f} ({f.target_ppl_ratio:g} x base {base_ppl:.4f})" if target
                   else "no ppl target"))


def _save(ctx, job: Job, final) -> None:
    """The recovered model replaces the pruned one in model/ (whole, atomically), with its masks
    and kept-vocabulary map."""
    from engine.models import export

    export.save_model(final, ctx.tokenizer, ctx.session.model_dir,
                      meta={"stage": "finetuned", "mode": ctx.cfg.prune.mode, "base": ctx.cfg.model.source,
                            "steps": ctx.results.get("finetune", {}).get("steps")}, masks=ctx.masks,
                      vocab_keep=job.vocab_keep)
    ctx.session.update_state(model_is="finetuned")
    ctx.model, ctx.model_is = final, "finetuned"


def _record(ctx, job: Job, ft, prog, block, resumed_from, final) -> None:
    from engine.models import size

    f = job.cfg
    tps = prog.tokens / prog.train_seconds if prog.train_seconds else 0.0
    ctx.rep.metric(job.stage, job.after, "tokens_per_s", round(tps, 1))
    params = size.count_nonzero(final) if job.masks else size.count_params(final)
    ctx.rep.metric(job.stage, job.after, "params", params)
    values = {
        "steps": ft.step, "total_steps": ft.total_steps, "tokens": prog.tokens, "tokens_per_s": round(tps, 2),
        "train_seconds": round(prog.train_seconds, 2), "stopped_because": prog.stopped_because,
        "final_loss": prog.last_loss, "base_ppl": job.base_ppl, "target_ppl": job.target, "curve": prog.curve,
        "epochs": ft.epoch(), "block_size": block, "batch_size": f.batch_size, "grad_accum": f.grad_accum,
        "lr": f.lr, "schedule": f.schedule, "lora_rank": f.lora_rank, "resumed_from_step": resumed_from,
        "loss": f.loss}
    if f.loss == "kd":
        values.update(kd_temperature=f.kd_temperature, kd_ce_weight=f.kd_ce_weight, teacher=job.teacher_name,
                      final_kl=prog.last_kl, final_ce=prog.last_ce)
    if job.stage != "finetune":
        values = {k: v for k, v in values.items() if k in _SECTION_KEYS[job.stage]}
    ctx.rep.section(job.stage, values)


def _section_keys() -> dict:
    from engine.run import record

    return {name: set(record.RESULTS[name].keys) for name in ("teacher", "control")}


_SECTION_KEYS = _section_keys()
