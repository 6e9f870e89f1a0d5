"""Recovery fine-tuning after pruning, resumable to the bit.

`Finetuner` is the training loop's state and step (AdamW, warmup + cosine/linear schedule,
gradient accumulation, grad-norm clipping, bf16 autocast on CUDA, optional gradient
checkpointing and LoRA); `recover` is the loop around it (held-out evaluation and the stop
rule, checkpoints), with the session's I/O left to its caller, `engine.run.recovery`.

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
import math
import time
from typing import Callable

import torch

from engine.train import checkpoint as ckpt_mod
from engine.config import FinetuneConfig
from engine.distributed import Dist
from engine.errors import MinigptError

_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# changing these between a stop and a resume does not invalidate the checkpoints
# (`control` adds a later stage; the pruned model's recovery is the same with or without it)
RESUMABLE_KEYS = ("enabled", "eval_every", "checkpoint_every", "keep_checkpoints", "control")


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


def chunked_ce(model, batch: torch.Tensor) -> torch.Tensor | None:
    """Mean next-token cross-entropy of `batch` [B, L] through the model's body and its LM head in
    chunks of rows (`perplexity.head_chunk`), each under non-reentrant activation checkpointing: a
    chunk's logits exist only while its loss (forward) or its gradient (backward) is computed. The
    same value as `model(labels=batch).loss` (fp32 logits, the mean over B·(L-1) targets) up to the
    summation order. None when the model does not expose its body and head."""
    from torch.utils.checkpoint import checkpoint

    from engine.evaluate.perplexity import decoder_and_head, head_chunk

    dec, head = decoder_and_head(model)
    if dec is None:
        return None
    hidden = dec(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = batch[:, 1:].reshape(-1)

    def part(h, t):
        return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")

    chunk = head_chunk(head)
    total = sum(checkpoint(part, h, t, use_reentrant=False) for h, t in zip(hidden.split(chunk), target.split(chunk)))
    return total / max(target.numel(), 1)


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
# every rank runs the same loop (SPMD) on its rows of every batch; `Dist` (engine.distributed)
# is the process group torchrun started, or a no-op in one process
STRATEGIES = ("ddp", "fsdp")


def _tied_groups(model) -> list[list[str]]:
    """Names of parameters that are one tensor (tied embeddings), in groups of two or more."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _skeleton(model):
    """A copy of `model` whose parameters are on the meta device (no memory), buffers real:
    what an FSDP-sharded model's gathered weights are loaded back into at the end."""
    import copy

    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): b.clone() for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _set_param(model, name: str, p) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, p)


def shard(model, device: torch.device, reshard_after_forward: bool = True):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder block is one unit, the rest
    (embeddings, final norm, LM head, tied or not) the root's; parameters become DTensors
    sharded over all ranks. On CUDA, bf16 compute with fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from engine.models import adapters

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in adapters.for_model(model).layers():
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


class _Whole:
    """A sharded model seen as a whole for evaluation: `evaluate.perplexity` calls it (the
    FSDP root gathers every unit) rather than its decoder and head apart."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()


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
                 masks: dict | None = None, total_steps: int | None = None, dist: Dist | None = None,
                 teacher=None, teacher_ids=None, strategy: str = "ddp", shard_teacher: bool = False):
        """`teacher`: required when cfg.loss = "kd", the frozen model whose logits the student
        learns (a `distill.Teacher`, or a model, borrowed as it is, with `teacher_ids`: the
        student's vocabulary as teacher ids when it was pruned).

        Under torchrun (`dist` on) the student is DistributedDataParallel (`strategy` "ddp": a
        replica per rank, gradients all-reduced) or FSDP2 ("fsdp": parameters, gradients and
        AdamW moments sharded over the ranks); the teacher is replicated on every rank, or
        sharded too with `shard_teacher` (fsdp only)."""
        from engine.train import distill

        self.cfg = cfg
        if cfg.loss == "kd" and teacher is None:
            raise MinigptError("finetune.loss = \"kd\" needs a teacher model", "this is a bug: report it")
        if cfg.loss == "kd" and not isinstance(teacher, distill.Teacher):
            teacher = distill.Teacher(teacher, keep=teacher_ids,
                                      student_vocab=model.get_input_embeddings().weight.shape[0])
        self.teacher = teacher if cfg.loss == "kd" else None
        self.dist = dist or Dist()
        if cfg.batch_size % self.dist.world:
            raise MinigptError(f"finetune.batch_size = {cfg.batch_size} does not split over {self.dist.world} processes",
                               f"use a multiple of {self.dist.world}")
        if strategy not in STRATEGIES:
            raise MinigptError(f"distributed.strategy = {strategy!r} is not valid", f"use one of: {', '.join(STRATEGIES)}")
        self.fsdp = self.dist.on and strategy == "fsdp"
        # "fsdp" checkpoints are torch.distributed.checkpoint folders at every world size (one process
        # included), so they resume across world sizes: DCP reshards them on load
        self.sharded_checkpoints = strategy == "fsdp"
        if self.fsdp and (cfg.lora_rank > 0 or masks):
            raise MinigptError("distributed.strategy = \"fsdp\" trains neither LoRA adapters nor mask-mode models",
                               "use distributed.strategy = \"ddp\", or prune.mode = \"structural\" and lora_rank = 0")
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
        self._skeleton = self._tied = None
        if self.fsdp:  # gradients reduce-scattered (averaged); each rank computes its rows of every batch
            self._tied = _tied_groups(model)
            self._skeleton = _skeleton(model)
            shard(model, self.device)
            if self.teacher is not None and shard_teacher:
                shard(self.teacher.model, self.device)
                self.teacher.sharded = True
        elif self.dist.on:  # gradients all-reduced (averaged); each rank computes its rows of every batch
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

        # a warm-up as long as the run would spend all of it below the set lr (1 step: at lr 0, so no update)
        self.warmup = min(cfg.warmup_steps, max(self.total_steps - 1, 0))
        self.scheduler = get_scheduler(_SCHEDULES[cfg.schedule], self.optimizer, num_warmup_steps=self.warmup,
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
        loss_sum = kl_sum = ce_sum = 0.0
        d = self.dist
        for k in range(cfg.grad_accum):
            batch = self.batches[self.micro + k][d.rank::d.world].to(self.device)
            last = k == cfg.grad_accum - 1
            if self.fsdp:  # reduce-scatter on the last micro-batch only (FSDP2's no_sync)
                model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if not d.on or last or self.fsdp else self.forward.no_sync()
            with sync:
                if self.teacher is None:
                    with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                        loss = self._ce_loss(batch) / cfg.grad_accum
                else:
                    loss, kl, ce = self._kd_loss(batch)
                    kl_sum += float(kl) / cfg.grad_accum
                    ce_sum += float(ce) / cfg.grad_accum
                loss.backward()
            loss_sum += float(loss.detach())
        loss_sum = d.mean(loss_sum)
        if not math.isfinite(loss_sum):
            raise MinigptError(f"fine-tuning loss became {loss_sum} at step {self.step + 1}",
                               "lower finetune.lr, or add warmup (finetune.warmup_steps)")
        self.masks.grads()
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor of the global norm
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.masks.apply()
        self.step += 1
        out = {"loss": loss_sum, "lr": lr, "grad_norm": float(norm)}
        if self.teacher is not None:
            out.update(kl=d.mean(kl_sum), ce=d.mean(ce_sum) if cfg.kd_ce_weight > 0 else None)
        return out

    def _ce_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """The next-token cross-entropy (mean over the batch's tokens). Where the batch's logits would
        exceed `HEAD_CHUNK_ELEMENTS` (a 262k vocabulary: 256 tokens), and the model is not DDP-wrapped,
        the LM head runs a chunk of rows at a time under activation checkpointing (`chunked_ce`), so
        neither the forward nor the backward holds tokens × vocabulary logits; else the model's own loss."""
        from engine.evaluate.perplexity import HEAD_CHUNK_ELEMENTS

        rows = self.model.get_output_embeddings().weight.shape[0]
        if not self.dist.on and batch.numel() * rows > HEAD_CHUNK_ELEMENTS:
            loss = chunked_ce(self.model, batch)
            if loss is not None:
                return loss
        return self.forward(input_ids=batch, labels=batch, use_cache=False).loss

    def _kd_loss(self, batch: torch.Tensor):
        """This micro-batch's distillation loss (÷ grad_accum): the teacher's logits on the fly, then
        the chunked KL (`distill.kd_loss`); neither model's logits outlive the call."""
        from engine.train import distill

        cfg = self.cfg
        t_logits = self.teacher.logits(batch)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            s_logits = self.forward(input_ids=batch, use_cache=False).logits
        # the teacher's logits are already the student's columns (Teacher.logits applies the map)
        loss, kl, ce = distill.kd_loss(s_logits, t_logits, batch, cfg.kd_temperature, cfg.kd_ce_weight)
        del t_logits, s_logits
        return loss / cfg.grad_accum, kl, ce

    @torch.no_grad()
    def perplexity(self, ids: torch.Tensor, block_size: int, stride: int, batch_size: int) -> dict:
        from engine.evaluate import perplexity as evaluate

        self.model.eval()
        # a DDP replica scores its share of the windows; FSDP's forward is itself a collective,
        # so there every rank runs every window through the whole sharded model
        model, dist = (_Whole(self.model), None) if self.fsdp else (self.model, self.dist)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return evaluate.perplexity(model, ids, block_size, stride, batch_size, dist=dist)

    # ---- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything that evolves, for torch.save on rank 0 (every rank contributes its RNG
        state: a collective). Under FSDP the weights and AdamW moments are not in it: they are
        `sharded_state()`, written by every rank through torch.distributed.checkpoint."""
        rng = self.dist.gather(ckpt_mod.rng_state())
        out = {"scheduler": self.scheduler.state_dict(), "step": self.step, "micro": self.micro, "rng": rng}
        if not self.sharded_checkpoints:
            out.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        return out

    def sharded_state(self) -> dict | None:
        """strategy "fsdp": the model's and optimiser's state dicts for torch.distributed.checkpoint
        (DTensors when sharded), else None."""
        if not self.sharded_checkpoints:
            return None
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_state_dict(self, state: dict, sharded_dir=None) -> None:
        """`sharded_dir`: FSDP's torch.distributed.checkpoint folder (every rank reads its shards)."""
        if self.sharded_checkpoints:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            if sharded_dir is None:
                raise MinigptError("this checkpoint holds no sharded (FSDP) state",
                                   "resume with the distributed.strategy it was written with")
        elif "model" not in state:
            raise MinigptError("this checkpoint holds sharded (FSDP) state only",
                               "resume with distributed.strategy = \"fsdp\", as it was written")
        if self.sharded_checkpoints:
            sd = self.sharded_state()
            import warnings

            with warnings.catch_warnings():  # one process: DCP says it assumes so, at every load
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(sd, checkpoint_id=str(sharded_dir), no_dist=not self.dist.on)
            set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        else:
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
        if self.fsdp:  # every rank gathers the whole model into an unsharded copy
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            model = self._skeleton
            model.load_state_dict(full, assign=True)
            for names in self._tied:  # assign=True gave each name its own tensor: tie them again
                first = model.get_parameter(names[0])
                for name in names[1:]:
                    _set_param(model, name, first)
            self.model = self.forward = model
            self.fsdp = False
        if self.cfg.lora_rank > 0:
            model = model.merge_and_unload()
        if self.base_masks:
            prune.apply_masks(model, self.base_masks)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        return model.to(self.save_dtype).eval()


def _wrap_lora(model, cfg: FinetuneConfig):
    from peft import LoraConfig, get_peft_model

    from engine.models import adapters

    conv1d = adapters.for_model(model).lora_fan_in_fan_out
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


# ---- the recovery loop ------------------------------------------------------------------------
@dataclasses.dataclass
class Progress:
    """What a checkpoint carries besides the Finetuner: the recovery curve and counters."""

    curve: list = dataclasses.field(default_factory=list)  # [[step, held-out ppl], ...]
    tokens: int = 0
    train_seconds: float = 0.0
    last_loss: float | None = None
    last_kl: float | None = None  # loss = kd: the last step's KL and CE terms
    last_ce: float | None = None
    stopped_because: str | None = None
    pruned: dict | None = None  # the pruned model's held-out ppl and protocol (step 0)


@dataclasses.dataclass
class Hooks:
    """What the recovery loop asks of its caller (the stage layer): measure held-out
    perplexity, report a step, write a checkpoint, and whether a stop was requested."""

    held_out: Callable[[], float]
    on_step: Callable[[dict], None]
    checkpoint: Callable[[], None]
    stop_requested: Callable[[], bool]


def recover(ft: Finetuner, prog: Progress, target: float | None, hooks: Hooks) -> bool:
    """Train until held-out ppl <= `target`, the step limit, or a stop request. Every rank runs
    this loop (SPMD); the hooks are collectives where they must agree (the stop request, the
    held-out measure, the checkpoint) and only rank 0's write anything. Evaluates every
    `eval_every` steps and at the end, checkpoints every `checkpoint_every` steps. Returns True
    when stopped on request (a checkpoint was written first)."""
    f, total = ft.cfg, ft.total_steps
    eval_seconds: list[float] = []

    def held_out() -> float:
        t0 = time.perf_counter()
        ppl = hooks.held_out()
        eval_seconds.append(time.perf_counter() - t0)
        return ppl

    t_proc, steps_proc = 0.0, 0
    while prog.stopped_because is None:
        if ft.step >= total:
            prog.stopped_because = ft.limit
            break
        t0 = time.perf_counter()
        m = ft.train_step()
        dt = time.perf_counter() - t0
        t_proc, steps_proc = t_proc + dt, steps_proc + 1
        prog.tokens += ft.tokens_per_step
        prog.train_seconds += dt
        prog.last_loss = m["loss"]
        prog.last_kl, prog.last_ce = m.get("kl"), m.get("ce")
        evals_left = (total - ft.step) // max(f.eval_every, 1)
        eta = (total - ft.step) * t_proc / steps_proc + evals_left * (sum(eval_seconds) / max(len(eval_seconds), 1))
        hooks.on_step({**m, "tokens_per_s": ft.tokens_per_step * steps_proc / t_proc, "eta_s": eta,
                       "steps_per_s": steps_proc / t_proc})
        if (f.eval_every > 0 and ft.step % f.eval_every == 0) or ft.step >= total:
            ppl = held_out()
            if target is not None and ppl <= target:
                prog.stopped_because = "target_ppl"
        if prog.stopped_because is None and ft.step >= total:
            prog.stopped_because = ft.limit
        if hooks.stop_requested():
            hooks.checkpoint()
            return True
        if f.checkpoint_every > 0 and ft.step % f.checkpoint_every == 0 and prog.stopped_because is None:
            hooks.checkpoint()
    if not prog.curve or prog.curve[-1][0] != ft.step:
        hooks.held_out()  # the step limit was not an eval step (or no target): measure the end point
    return False
