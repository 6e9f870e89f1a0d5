"""Recovery fine-tuning after pruning, resumable to the bit.

`Finetuner` is the training loop's state and step (AdamW, warmup + cosine/linear schedule,
gradient accumulation, grad-norm clipping, bf16 autocast on CUDA, optional gradient
checkpointing and LoRA); `run(ctx)` is the pipeline stage around it (held-out evaluation
and the stop rule, events, checkpoints, resume, saving).

Why a resumed run equals an uninterrupted one: micro-batch i is a pure function of
(seed, i) (`Batches`), and a checkpoint holds everything else that evolves (weights,
optimiser moments, scheduler, the torch/Python/NumPy/CUDA RNG states that dropout
draws from). In mask mode pruned weights stay exactly zero: their gradients are zeroed
before each step, so AdamW's moments never move them, and the masks are re-applied
after it, so nothing else (weight decay, rounding) can either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time

import torch

from engine.models import size
from engine.train import checkpoint as ckpt_mod
from engine.config import FinetuneConfig
from engine.errors import MinigptError

_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# changing these between a stop and a resume does not invalidate the checkpoints
_RESUMABLE_KEYS = ("enabled", "eval_every", "checkpoint_every", "keep_checkpoints")


# ---- data order ---------------------------------------------------------------------------
class Batches:
    """Micro-batch i, derived from (seed, i) alone: an epoch is a seeded permutation of the
    blocks, so resuming needs no iterator state and any rank can find its rows."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        if blocks.shape[0] < batch_size:
            raise ValueError(f"{blocks.shape[0]} blocks are fewer than a batch of {batch_size}")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = blocks.shape[0] // batch_size  # the last partial batch is dropped
        self._perm: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.blocks.shape[0], generator=g))
        return self._perm[1]

    def __getitem__(self, i: int) -> torch.Tensor:
        epoch, j = divmod(i, self.per_epoch)
        b = self.batch_size
        return self.blocks[self.order(epoch)[j * b:(j + 1) * b]]

    def epoch(self, micro: int) -> float:
        return micro / self.per_epoch


# ---- masks ----------------------------------------------------------------------------------
class MaskKeeper:
    """(parameter, keep-mask) pairs: masks gradients before the step and weights after it."""

    def __init__(self, pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]):
        self.pairs = [(p, m.to(device=p.device, dtype=p.dtype)) for p, m in pairs]

    def grads(self) -> None:
        for p, m in self.pairs:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in self.pairs:
            p.mul_(m)

    def __bool__(self) -> bool:
        return bool(self.pairs)


def _masks_by_param(model, masks: dict) -> dict[int, torch.Tensor]:
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in masks:
            by_id[id(p)] = masks[name]
    missing = set(masks) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if missing:
        raise MinigptError(f"pruning masks name parameters the model lacks ({sorted(missing)[:2]})",
                           "the masks file does not belong to this model; rerun: minigpt prune SESSION")
    return by_id


def _lora_mask_pairs(model, by_id: dict[int, torch.Tensor]) -> list:
    """Masks for LoRA factors so that B·A respects a (row ⊗ column) keep-mask exactly."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        w = mod.get_base_layer().weight
        if id(w) not in by_id:
            continue
        keep = by_id[id(w)].bool()
        if getattr(mod, "fan_in_fan_out", False):  # Conv1D stores [in, out]
            keep = keep.t()
        rows, cols = keep.any(1), keep.any(0)
        if not torch.equal(keep, rows[:, None] & cols[None, :]):
            raise MinigptError(f"the pruning mask of {name} is not a set of whole rows and columns",
                               "LoRA in mask mode needs neuron masks; use finetune.lora_rank = 0")
        for key in mod.lora_A:
            a, b = mod.lora_A[key].weight, mod.lora_B[key].weight  # [r, in], [out, r]
            pairs.append((a, cols[None, :].expand_as(a)))
            pairs.append((b, rows[:, None].expand_as(b)))
    return pairs


# ---- distributed ----------------------------------------------------------------------------
class Dist:
    """torch.distributed as started by torchrun (rank 0 drives, the others follow), or a no-op.

    Rank 0 holds the session lock and does everything with side effects (events, held-out
    evaluation, checkpoints, saving); all ranks train, each on its share of every batch.
    """

    def __init__(self):
        import torch.distributed as dist

        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if self.on and dist.get_backend() == "nccl" else torch.device("cpu")

    def bcast(self, obj=None):
        """Rank 0's `obj`, on every rank."""
        if not self.on:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, obj) -> list:
        if not self.on:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, x: float) -> float:
        if not self.on:
            return x
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world


_followers_told = False


def release_followers() -> None:
    """Rank 0 at exit: followers still waiting for a fine-tuning stage are told there is none."""
    global _followers_told
    if not _followers_told:
        _followers_told = True
        Dist().bcast(None)


def follow(session) -> None:
    """Ranks > 0 under torchrun: wait for rank 0's fine-tuning stage and train alongside it."""
    from engine.run.pipeline import Context
    from engine.run.reporter import Reporter

    if not Dist().bcast(None):
        return
    ctx = Context(session.config(), session, Reporter(None), results=session.results())
    run(ctx)


# ---- the loop ------------------------------------------------------------------------------
def plan_steps(cfg: FinetuneConfig, per_epoch: int) -> tuple[int, str]:
    """Total optimiser steps and which limit sets it (max_steps or max_epochs)."""
    limits = []
    if cfg.max_steps > 0:
        limits.append((cfg.max_steps, "max_steps"))
    if cfg.max_epochs > 0:
        limits.append((max(1, math.ceil(cfg.max_epochs * per_epoch / cfg.grad_accum)), "max_epochs"))
    if not limits:
        raise MinigptError("fine-tuning has no step limit (finetune.max_steps and max_epochs are both 0)",
                           "set finetune.max_steps (e.g. 200) or finetune.max_epochs")
    return min(limits)


class Finetuner:
    """One model's fine-tuning state; `train_step()` does one optimiser step."""

    def __init__(self, model, blocks: torch.Tensor, cfg: FinetuneConfig, seed: int = 0,
                 masks: dict | None = None, total_steps: int | None = None, dist: Dist | None = None):
        self.cfg = cfg
        self.dist = dist or Dist()
        if cfg.batch_size % self.dist.world:
            raise MinigptError(f"finetune.batch_size = {cfg.batch_size} does not split over {self.dist.world} processes",
                               f"use a multiple of {self.dist.world}")
        self.device = next(model.parameters()).device
        self.save_dtype = next(model.parameters()).dtype
        self.autocast = self.device.type == "cuda"
        if self.autocast and self.save_dtype != torch.float32:
            model.float()  # fp32 master weights; autocast computes in bf16
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        by_id = _masks_by_param(model, masks or {})
        self.base_masks = masks or {}
        if cfg.lora_rank > 0:
            model = _wrap_lora(model, cfg)
            pairs = _lora_mask_pairs(model, by_id)
        else:
            pairs = [(p, by_id[id(p)]) for p in model.parameters() if id(p) in by_id]
        self.model = model
        self.forward = model
        if self.dist.on:  # gradients averaged across ranks; each rank computes its rows of every batch
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(model, device_ids=[self.device.index] if self.autocast else None)
        self.masks = MaskKeeper(pairs)
        self.masks.apply()  # LoRA's A starts random: zero the columns of pruned inputs
        self.batches = Batches(blocks, cfg.batch_size, seed)
        self.total_steps, self.limit = (total_steps, "max_steps") if total_steps else plan_steps(cfg, self.batches.per_epoch)
        self.params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]  # biases and norm gains
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        try:  # one fused kernel for all parameters (what HF's Trainer uses too); for-loop AdamW is far slower
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(_SCHEDULES[cfg.schedule], self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.total_steps)
        self.step = 0
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * blocks.shape[1]

    @property
    def micro(self) -> int:
        return self.step * self.cfg.grad_accum

    def epoch(self) -> float:
        return round(self.batches.epoch(self.micro), 4)

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = 0.0
        d = self.dist
        for k in range(cfg.grad_accum):
            batch = self.batches[self.micro + k][d.rank::d.world].to(self.device)
            sync = contextlib.nullcontext() if not d.on or k == cfg.grad_accum - 1 else self.forward.no_sync()
            with sync:
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss = self.forward(input_ids=batch, labels=batch, use_cache=False).loss / cfg.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
        loss_sum = d.mean(loss_sum)
        if not math.isfinite(loss_sum):
            raise MinigptError(f"fine-tuning loss became {loss_sum} at step {self.step + 1}",
                               "lower finetune.lr, or add warmup (finetune.warmup_steps)")
        self.masks.grads()
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.masks.apply()
        self.step += 1
        return {"loss": loss_sum, "lr": lr, "grad_norm": float(norm)}

    @torch.no_grad()
    def perplexity(self, ids: torch.Tensor, block_size: int, stride: int, batch_size: int) -> dict:
        from engine.evaluate import perplexity as evaluate

        self.model.eval()
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return evaluate.perplexity(self.model, ids, block_size, stride, batch_size)

    # ---- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything that evolves; on rank 0 (the other ranks only contribute their RNG states)."""
        rng = self.dist.gather(ckpt_mod.rng_state())  # a collective: every rank calls state_dict()
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "micro": self.micro, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if int(state["micro"]) != self.micro:
            raise MinigptError("checkpoint data position does not match its step",
                               "the checkpoint was written with another grad_accum; delete it to restart")
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank
        ckpt_mod.set_rng_state(rng[self.dist.rank % len(rng)])  # another world size: not bit-exact, but valid

    def finished_model(self):
        """The plain model to save: LoRA merged, masks re-applied, original dtype, eval mode."""
        from engine.prune import mlp as prune

        model = self.model
        if self.cfg.lora_rank > 0:
            model = model.merge_and_unload()
        if self.base_masks:
            prune.apply_masks(model, self.base_masks)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        return model.to(self.save_dtype).eval()


def _wrap_lora(model, cfg: FinetuneConfig):
    from peft import LoraConfig, get_peft_model

    conv1d = model.config.model_type == "gpt2"
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


# ---- the pipeline stage -------------------------------------------------------------------
def _follow_orders(ft: Finetuner) -> None:
    """Ranks > 0: do what rank 0 broadcasts, step by step, until it is done."""
    while True:
        order = ft.dist.bcast()
        if order == "step":
            ft.train_step()
        elif order == "checkpoint":
            ft.dist.gather(ckpt_mod.rng_state())
        else:
            return


@dataclasses.dataclass
class Progress:
    """What a checkpoint carries besides the Finetuner: the recovery curve and counters."""

    curve: list = dataclasses.field(default_factory=list)  # [[step, held-out ppl], ...]
    tokens: int = 0
    train_seconds: float = 0.0
    last_loss: float | None = None
    stopped_because: str | None = None
    pruned: dict | None = None  # the pruned model's held-out ppl and protocol (step 0)


def _fingerprint(ctx, block_size: int, n_blocks: int) -> dict:
    f = {k: v for k, v in dataclasses.asdict(ctx.cfg.finetune).items() if k not in _RESUMABLE_KEYS}
    fp = {"finetune": f, "seed": ctx.cfg.seed, "model": ctx.cfg.model.source,
          "data": dataclasses.asdict(ctx.cfg.data), "prune": dataclasses.asdict(ctx.cfg.prune),
          "widths": ctx.results.get("prune", {}).get("widths"), "block_size": block_size, "blocks": n_blocks}
    return json.loads(json.dumps(fp))


def run(ctx) -> None:
    """The finetune stage. Under torchrun every rank runs it; rank 0 drives (see `Dist`)."""
    global _followers_told
    from pathlib import Path

    from engine import atomic
    from engine.models import export
    from engine.prune import mlp as prune
    from engine.data.domain import blocks as pack, model_context
    from engine.run.pipeline import save_masks
    from engine.run.reporter import StopRequested

    f, rep, e = ctx.cfg.finetune, ctx.rep, ctx.cfg.evaluate
    dist = Dist()
    if dist.on and dist.rank == 0:
        _followers_told = True
        dist.bcast(True)  # the followers (waiting in `follow`) start too
    model = ctx.current_model()  # before domain(): it would otherwise load the base model
    d = ctx.domain()
    block = max(2, min(f.block_size, model_context(model)))
    data = pack(d.finetune, block)
    if data.shape[0] < f.batch_size:
        raise MinigptError(f"the fine-tune split has {d.finetune.numel()} tokens: {data.shape[0]} block(s) of "
                           f"{block}, fewer than finetune.batch_size = {f.batch_size}",
                           "lower finetune.block_size or batch_size, or raise data.finetune_fraction")
    base_ppl = ctx.results.get("models", {}).get("base", {}).get("ppl")
    target = base_ppl * f.target_ppl_ratio if base_ppl and f.target_ppl_ratio > 0 else None
    if target is None and f.target_ppl_ratio > 0:
        rep.log("no base-model perplexity (evaluate.evaluate_base = false): fine-tuning runs to its step limit",
                level="warning")

    ckpt_mod.seed_everything(ctx.cfg.seed + dist.rank)  # dropout differs per rank; data order comes from Batches
    ft = Finetuner(model, data, f, seed=ctx.cfg.seed, masks=ctx.masks, dist=dist)
    prog = Progress()
    ckdir = ctx.session.checkpoints_dir
    fp = _fingerprint(ctx, block, data.shape[0])
    last = dist.bcast(ckpt_mod.latest(ckdir) if dist.rank == 0 else None)
    last = Path(last) if last else None
    resumed_from = None
    if last is None and ctx.session.state().get("model_is") == "finetuned":
        # model/ holds the fine-tuned model (the pruned one was replaced): never fine-tune it twice by accident
        raise MinigptError(f"session {ctx.session.id} is already fine-tuned and has no checkpoint to resume from",
                           f"to fine-tune again from the pruned model, redo pruning: minigpt prune {ctx.session.id}")
    if last is not None:
        state, meta = ckpt_mod.load(last, map_location=ft.device)
        if meta.get("fingerprint") != fp:
            key = next((k for k in fp if fp[k] != meta.get("fingerprint", {}).get(k)), "?")
            raise MinigptError(f"the fine-tuning checkpoints in {ckdir} were written with a different "
                               f"configuration ({key} differs)",
                               f"restore the previous settings, or delete {ckdir} to fine-tune from the pruned model again")
        ft.load_state_dict(state)
        prog = Progress(**state["progress"])
        resumed_from = ft.step
        rep.log(f"resuming fine-tuning from checkpoint at step {ft.step} ({last.name})")
        if len(state["rng"] if isinstance(state["rng"], list) else [1]) != dist.world:
            rep.log("the checkpoint was written by another number of processes: RNG streams (dropout) "
                    "restart, so this resume is valid but not bit-identical", level="warning")
        del state
    if dist.rank > 0:
        _follow_orders(ft)
        return

    def save_checkpoint() -> None:
        dist.bcast("checkpoint")  # every rank adds its RNG state
        path = ckpt_mod.save(ckdir, ft.step, {**ft.state_dict(), "progress": dataclasses.asdict(prog)},
                             meta={"fingerprint": fp, "stopped_because": prog.stopped_because},
                             keep=f.keep_checkpoints)
        rep.emit("checkpoint", step=ft.step, path=str(path))

    eval_seconds: list[float] = []

    def held_out() -> dict:
        t0 = time.perf_counter()
        res = ft.perplexity(d.evaluate, e.block_size, e.stride, e.batch_size)
        eval_seconds.append(time.perf_counter() - t0)
        prog.curve.append([ft.step, res["ppl"]])
        rep.emit("eval", step=ft.step, ppl=round(res["ppl"], 6), target_ppl=target)
        return res

    total = ft.total_steps
    rep.log(f"fine-tuning up to {total} steps ({ft.limit}) of {f.batch_size}×{f.grad_accum}×{block} tokens on "
            f"{data.shape[0]} blocks ({ft.batches.per_epoch} batches/epoch); lr {f.lr:g} {f.schedule}, "
            + (f"LoRA r={f.lora_rank}, " if f.lora_rank > 0 else "")
            + (f"stop at held-out ppl <= {target:.4f} ({f.target_ppl_ratio:g} x base {base_ppl:.4f})" if target
               else "no ppl target"))
    if not prog.curve:  # the pruned model's held-out ppl: the start of the recovery curve
        res = held_out()
        prog.pruned = {"ppl": res["ppl"], "ppl_protocol": res["protocol"]}
        ctx.rep.metric("finetune", "pruned", "ppl", round(res["ppl"], 4), protocol=res["protocol"])
        if target is not None and res["ppl"] <= target:
            prog.stopped_because = "target_ppl"
    ctx.results.setdefault("models", {}).setdefault("pruned", {}).update(prog.pruned or {})
    t_proc, steps_proc = 0.0, 0
    while prog.stopped_because is None:
        if ft.step >= total:
            prog.stopped_because = ft.limit
            break
        t0 = time.perf_counter()
        dist.bcast("step")
        m = ft.train_step()
        dt = time.perf_counter() - t0
        t_proc, steps_proc = t_proc + dt, steps_proc + 1
        prog.tokens += ft.tokens_per_step
        prog.train_seconds += dt
        prog.last_loss = m["loss"]
        tps = ft.tokens_per_step * steps_proc / t_proc
        evals_left = (total - ft.step) // max(f.eval_every, 1)
        eta = (total - ft.step) * t_proc / steps_proc + evals_left * (sum(eval_seconds) / max(len(eval_seconds), 1))
        rep.emit("train", step=ft.step, total_steps=total, loss=round(m["loss"], 6), lr=m["lr"],
                 grad_norm=round(m["grad_norm"], 6), tokens_per_s=round(tps, 1), eta_s=round(eta, 1),
                 epoch=ft.epoch())
        rep.progress("finetune", ft.step, total, "steps", rate=steps_proc / t_proc)
        if (f.eval_every > 0 and ft.step % f.eval_every == 0) or ft.step >= total:
            ppl = held_out()["ppl"]
            if target is not None and ppl <= target:
                prog.stopped_because = "target_ppl"
        if prog.stopped_because is None and ft.step >= total:
            prog.stopped_because = ft.limit
        if rep.stop_requested():
            save_checkpoint()
            dist.bcast("done")
            rep.log(f"stopped at step {ft.step}; continue with: minigpt resume {ctx.session.id}")
            raise StopRequested()
        if f.checkpoint_every > 0 and ft.step % f.checkpoint_every == 0 and prog.stopped_because is None:
            save_checkpoint()
    if not prog.curve or prog.curve[-1][0] != ft.step:
        held_out()  # the step limit was not an eval step (or no target): measure the end point
    if resumed_from != ft.step or last is None:  # the end-of-stage checkpoint
        save_checkpoint()
    dist.bcast("done")

    final_ppl = prog.curve[-1][1]
    rep.log(f"fine-tuning stopped after {ft.step} steps ({prog.stopped_because}); held-out ppl {final_ppl:.4f}")
    final = ft.finished_model()
    folder = ctx.session.path / ".model.finetuned"
    export.save_model(final, ctx.tokenizer, folder,
                      meta={"stage": "finetuned", "mode": ctx.cfg.prune.mode, "base": ctx.cfg.model.source,
                            "steps": ft.step})
    if ctx.masks:
        save_masks(ctx.masks, folder)
    atomic.replace_dir(folder, ctx.session.model_dir)
    ctx.session.update_state(model_is="finetuned")
    ctx.model, ctx.model_is = final, "finetuned"

    tps = prog.tokens / prog.train_seconds if prog.train_seconds else 0.0
    ctx.rep.metric("finetune", "finetuned", "ppl", round(final_ppl, 4))
    ctx.rep.metric("finetune", "finetuned", "tokens_per_s", round(tps, 1))
    ctx.results["finetune"] = {
        "steps": ft.step, "total_steps": total, "tokens": prog.tokens, "tokens_per_s": round(tps, 2),
        "train_seconds": round(prog.train_seconds, 2), "stopped_because": prog.stopped_because,
        "final_loss": prog.last_loss, "base_ppl": base_ppl, "target_ppl": target, "curve": prog.curve,
        "epochs": ft.epoch(), "block_size": block, "batch_size": f.batch_size, "grad_accum": f.grad_accum,
        "lr": f.lr, "schedule": f.schedule, "lora_rank": f.lora_rank, "resumed_from_step": resumed_from}
    fin = ctx.results.setdefault("models", {}).setdefault("finetuned", {})
    fin.update(ppl=final_ppl, params=size.count_params(final))
    if ctx.masks:
        fin["nonzero_params"] = size.count_nonzero(final)
