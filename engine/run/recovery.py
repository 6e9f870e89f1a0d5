"""The finetune stage: recovery fine-tuning of the pruned model, resumable to the bit.

The stage layer around `engine.train.finetune`: it packs the fine-tune split, sets the
held-out target, resumes from the session's checkpoints (refusing ones written under
another configuration), runs `finetune.recover` with hooks that report and checkpoint,
and saves the recovered model in place of the pruned one. Under torchrun every rank
enters here (ranks > 0 through `stages.follow`); rank 0 drives and the others follow
(`finetune.follow_orders`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from engine.errors import MinigptError
from engine.run.reporter import StopRequested


def run(ctx) -> None:
    from engine.train import checkpoint as ckpt_mod
    from engine.train import finetune

    dist = finetune.Dist()
    finetune.start_followers(dist)
    model = ctx.current_model()  # before domain(): it would otherwise load the base model
    data, block = _train_blocks(ctx, model)
    target, base_ppl = _target(ctx)
    ckpt_mod.seed_everything(ctx.cfg.seed + dist.rank)  # dropout differs per rank; data order comes from Batches
    ft = finetune.Finetuner(model, data, ctx.cfg.finetune, seed=ctx.cfg.seed, masks=ctx.masks, dist=dist)
    fp = _fingerprint(ctx, block, data.shape[0])
    last = dist.bcast(ckpt_mod.latest(ctx.session.checkpoints_dir) if dist.rank == 0 else None)
    last = Path(last) if last else None
    prog = _resume(ctx, ft, last, fp)
    resumed_from = ft.step if last is not None else None
    if dist.rank > 0:
        finetune.follow_orders(ft)
        return

    checkpoint = _checkpointer(ctx, ft, prog, fp)
    hooks = finetune.Hooks(held_out=_held_out(ctx, ft, prog, target), on_step=_on_step(ctx, ft),
                           checkpoint=checkpoint, stop_requested=ctx.rep.stop_requested)
    _announce(ctx, ft, data, block, target, base_ppl)
    if not prog.curve:  # the pruned model's held-out ppl: the start of the recovery curve
        ppl = hooks.held_out()
        if target is not None and ppl <= target:
            prog.stopped_because = "target_ppl"
    ctx.rep.model_entry("pruned").update(prog.pruned or {})
    if finetune.recover(ft, prog, target, hooks):
        dist.bcast("done")
        ctx.rep.log(f"stopped at step {ft.step}; continue with: minigpt resume {ctx.session.id}")
        raise StopRequested()
    if resumed_from != ft.step or last is None:  # the end-of-stage checkpoint
        checkpoint()
    dist.bcast("done")
    _save(ctx, ft, prog)
    _record(ctx, ft, prog, block, base_ppl, target, resumed_from)


def _train_blocks(ctx, model):
    from engine.data.domain import blocks
    from engine.models.adapters import model_context

    f, d = ctx.cfg.finetune, ctx.domain()
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


def _fingerprint(ctx, block_size: int, n_blocks: int) -> dict:
    from engine.train.finetune import RESUMABLE_KEYS

    f = {k: v for k, v in dataclasses.asdict(ctx.cfg.finetune).items() if k not in RESUMABLE_KEYS}
    fp = {"finetune": f, "seed": ctx.cfg.seed, "model": ctx.cfg.model.source,
          "data": dataclasses.asdict(ctx.cfg.data), "prune": dataclasses.asdict(ctx.cfg.prune),
          "widths": ctx.results.get("prune", {}).get("widths"), "block_size": block_size, "blocks": n_blocks}
    return json.loads(json.dumps(fp))


def _resume(ctx, ft, last: Path | None, fp: dict):
    """The loop's state from the newest checkpoint (a fresh `Progress` without one)."""
    from engine.train import checkpoint as ckpt_mod
    from engine.train.finetune import Progress

    ckdir = ctx.session.checkpoints_dir
    if last is None:
        if ctx.session.state().get("model_is") == "finetuned":
            # model/ holds the fine-tuned model (the pruned one was replaced): never fine-tune it twice by accident
            raise MinigptError(f"session {ctx.session.id} is already fine-tuned and has no checkpoint to resume from",
                               f"to fine-tune again from the pruned model, redo pruning: minigpt prune {ctx.session.id}")
        return Progress()
    state, meta = ckpt_mod.load(last, map_location=ft.device)
    if meta.get("fingerprint") != fp:
        key = next((k for k in fp if fp[k] != meta.get("fingerprint", {}).get(k)), "?")
        raise MinigptError(f"the fine-tuning checkpoints in {ckdir} were written with a different "
                           f"configuration ({key} differs)",
                           f"restore the previous settings, or delete {ckdir} to fine-tune from the pruned model again")
    ft.load_state_dict(state)
    ctx.rep.log(f"resuming fine-tuning from checkpoint at step {ft.step} ({last.name})")
    if len(state["rng"] if isinstance(state["rng"], list) else [1]) != ft.dist.world:
        ctx.rep.log("the checkpoint was written by another number of processes: RNG streams (dropout) "
                    "restart, so this resume is valid but not bit-identical", level="warning")
    return Progress(**state["progress"])


def _checkpointer(ctx, ft, prog, fp: dict):
    from engine.train import checkpoint as ckpt_mod

    def save() -> None:
        ft.dist.bcast("checkpoint")  # every rank adds its RNG state
        path = ckpt_mod.save(ctx.session.checkpoints_dir, ft.step,
                             {**ft.state_dict(), "progress": dataclasses.asdict(prog)},
                             meta={"fingerprint": fp, "stopped_because": prog.stopped_because},
                             keep=ctx.cfg.finetune.keep_checkpoints)
        ctx.rep.emit("checkpoint", step=ft.step, path=str(path))

    return save


def _held_out(ctx, ft, prog, target):
    e, d = ctx.cfg.evaluate, ctx.domain()

    def measure() -> float:
        res = ft.perplexity(d.evaluate, e.block_size, e.stride, e.batch_size)
        res["protocol"]["vocab_size"] = len(ctx.tokenizer)
        prog.curve.append([ft.step, res["ppl"]])
        ctx.rep.emit("eval", step=ft.step, ppl=round(res["ppl"], 6), target_ppl=target)
        if ft.step == 0 and prog.pruned is None:
            prog.pruned = {"ppl": res["ppl"], "ppl_protocol": res["protocol"]}
            ctx.rep.metric("finetune", "pruned", "ppl", res["ppl"], protocol=res["protocol"])
        return res["ppl"]

    return measure


def _on_step(ctx, ft):
    total = ft.total_steps

    def report(m: dict) -> None:
        ctx.rep.emit("train", step=ft.step, total_steps=total, loss=round(m["loss"], 6), lr=m["lr"],
                     grad_norm=round(m["grad_norm"], 6), tokens_per_s=round(m["tokens_per_s"], 1),
                     eta_s=round(m["eta_s"], 1), epoch=ft.epoch())
        ctx.rep.progress("finetune", ft.step, total, "steps", rate=m["steps_per_s"])

    return report


def _announce(ctx, ft, data, block, target, base_ppl) -> None:
    f = ctx.cfg.finetune
    ctx.rep.log(f"fine-tuning up to {ft.total_steps} steps ({ft.limit}) of {f.batch_size}×{f.grad_accum}×{block} "
                f"tokens on {data.shape[0]} blocks ({ft.batches.per_epoch} batches/epoch); lr {f.lr:g} {f.schedule}, "
                + (f"LoRA r={f.lora_rank}, " if f.lora_rank > 0 else "")
                + (f"stop at held-out ppl <= {target:.4f} ({f.target_ppl_ratio:g} x base {base_ppl:.4f})" if target
                   else "no ppl target"))


def _save(ctx, ft, prog) -> None:
    """The recovered model replaces the pruned one in model/ (whole, atomically)."""
    from engine.models import export

    ctx.rep.log(f"fine-tuning stopped after {ft.step} steps ({prog.stopped_because}); "
                f"held-out ppl {prog.curve[-1][1]:.4f}")
    final = ft.finished_model()
    export.save_model(final, ctx.tokenizer, ctx.session.model_dir,
                      meta={"stage": "finetuned", "mode": ctx.cfg.prune.mode, "base": ctx.cfg.model.source,
                            "steps": ft.step}, masks=ctx.masks)
    ctx.session.update_state(model_is="finetuned")
    ctx.model, ctx.model_is = final, "finetuned"


def _record(ctx, ft, prog, block, base_ppl, target, resumed_from) -> None:
    from engine.models import size

    f = ctx.cfg.finetune
    tps = prog.tokens / prog.train_seconds if prog.train_seconds else 0.0
    ctx.rep.metric("finetune", "finetuned", "tokens_per_s", round(tps, 1))
    params = size.count_nonzero(ctx.model) if ctx.masks else size.count_params(ctx.model)
    ctx.rep.metric("finetune", "finetuned", "params", params)
    ctx.rep.section("finetune", {
        "steps": ft.step, "total_steps": ft.total_steps, "tokens": prog.tokens, "tokens_per_s": round(tps, 2),
        "train_seconds": round(prog.train_seconds, 2), "stopped_because": prog.stopped_because,
        "final_loss": prog.last_loss, "base_ppl": base_ppl, "target_ppl": target, "curve": prog.curve,
        "epochs": ft.epoch(), "block_size": block, "batch_size": f.batch_size, "grad_accum": f.grad_accum,
        "lr": f.lr, "schedule": f.schedule, "lora_rank": f.lora_rank, "resumed_from_step": resumed_from})
