"""Distillation from a frozen teacher: forward KL on logits, computed in chunks over tokens.

The loss of one micro-batch is

    T^2 · mean over tokens of KL(softmax(t / T) || softmax(s / T))  +  w · CE(s, next token)

(`finetune.kd_temperature` = T, `finetune.kd_ce_weight` = w; Minitron's best: T = 1, w = 0).
The KL runs over every position of the block (each has a next-token distribution), the CE
over the positions with a next token (as Hugging Face's `labels=` loss).

With a pruned vocabulary the student's ids are a subset of the teacher's (new id i is old
id `keep[i]`, `engine.prune.vocab`): the teacher reads the student's sequence mapped back
to its own ids, and its distribution is restricted to the kept columns and renormalised
(a log-softmax over those columns only). `Teacher.logits` computes only those columns: its
body's hidden states times the kept rows of its LM head (bias and the family's logit soft-cap
included), so a 262k-row teacher (Gemma 3) distilling a 13k-row student never forms, nor
spends the matmul on, the 95% of its logits the loss would throw away.

`kd_loss` is one autograd function: in its forward pass it walks the tokens in chunks
(about 64 MB of fp32 each), computing the loss and its gradient with respect to the
student's logits chunk by chunk (d/ds = T·(softmax(s/T) − softmax(t/T)) + w·(softmax(s) −
onehot)/n), so the only tokens × vocab tensor it keeps is that gradient, in the logits'
dtype; no fp32 copy of either model's logits is held for the backward pass. The teacher's
logits are computed per micro-batch under `no_grad` and dropped after it (never stored for
the corpus); on CUDA the teacher runs in bf16.
"""

from __future__ import annotations

import torch

from engine.errors import MinigptError

CHUNK_ELEMENTS = 1 << 24  # fp32 elements of one chunk's working tensors (64 MB)


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(int(vocab), 1))


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """[B, L] ids -> [B·L] labels: position j's next token, -100 at each block's last position."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels.reshape(-1)


class _KD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, temperature: float, ce_weight: float, chunk: int):
        n = student.shape[0]
        t_inv = 1.0 / temperature
        grad = torch.empty_like(student)
        kl_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=student.device)
        n_ce = int((labels >= 0).sum()) if ce_weight > 0 else 0
        kl_scale = temperature / n  # d(T^2 · KL / n)/ds = T · (p_s − p_t) / n
        ce_scale = ce_weight / max(n_ce, 1)
        for i in range(0, n, chunk):
            s = student[i:i + chunk].float()
            t = teacher[i:i + chunk].float()
            ls = torch.log_softmax(s * t_inv if temperature != 1 else s, dim=-1)
            lt = torch.log_softmax(t * t_inv if temperature != 1 else t, dim=-1)
            pt = lt.exp()
            kl_sum += (pt * (lt - ls)).sum(-1).double().sum()
            g = (ls.exp() - pt).mul_(kl_scale)
            del t, lt, pt
            if ce_weight > 0:
                lab = labels[i:i + chunk]
                ok = lab >= 0
                idx = lab.clamp(min=0)[:, None]
                l1 = ls if temperature == 1 else torch.log_softmax(s, dim=-1)
                ce_sum -= (l1.gather(1, idx)[:, 0] * ok).double().sum()
                gc = l1.exp()
                gc.scatter_add_(1, idx, -ok[:, None].to(gc.dtype))
                g.add_(gc.mul_(ok[:, None].to(gc.dtype)), alpha=ce_scale)
                del l1, gc
            grad[i:i + chunk] = g.to(grad.dtype)
            del s, ls, g
        kl = kl_sum * (temperature * temperature) / n
        ce = ce_sum / max(n_ce, 1)
        loss = (kl + ce_weight * ce).float()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, g_loss, g_kl=None, g_ce=None):
        (grad,) = ctx.saved_tensors
        return grad * g_loss.to(grad.dtype), None, None, None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor,
            temperature: float = 1.0, ce_weight: float = 0.0,
            chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) of one micro-batch: student logits [B, L, V] (with grad), teacher logits
    [B, L, V] over the same ids (`Teacher.logits` maps a pruned vocabulary's columns), the
    student's ids [B, L]. `kl` is already × T²; `loss` = kl + ce_weight × ce (ce is computed,
    and is 0, only when ce_weight > 0). `kl` and `ce` are float64 and carry no gradient."""
    v = student_logits.shape[-1]
    if teacher_logits.shape[-1] != v:
        raise MinigptError(f"the teacher has {teacher_logits.shape[-1]} vocabulary rows and the student {v}, "
                           "with no map between them", "distil from the model this one was pruned from")
    s = student_logits.reshape(-1, v)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    return _KD.apply(s, t, next_token_labels(ids).to(s.device), float(temperature), float(ce_weight),
                     chunk or chunk_rows(v))


class Teacher:
    """A frozen model whose logits the student learns: eval mode, no gradients, bf16 on CUDA.

    `keep`: the student's vocabulary as teacher ids (new id i = old id keep[i]), or None when
    both share one vocabulary. `owned`: the model is the teacher's alone (loaded for it), so it
    may be frozen and cast to bf16 in place; a borrowed model (e.g. the unpruned model a search
    prunes copies of) is left as it is and runs under bf16 autocast on CUDA instead."""

    def __init__(self, model, keep: torch.Tensor | None = None, student_vocab: int | None = None,
                 owned: bool = False):
        device = next(model.parameters()).device
        if owned:
            if device.type == "cuda":
                model = model.to(torch.bfloat16)
            model.requires_grad_(False)
        model.eval()
        self.model = model
        self.autocast = device.type == "cuda" and next(model.parameters()).dtype != torch.bfloat16
        rows = model.get_input_embeddings().weight.shape[0]
        if keep is not None:
            keep = torch.as_tensor(keep, dtype=torch.long).to(device)
            if keep.numel() and (int(keep.max()) >= rows or int(keep.min()) < 0):
                raise MinigptError(f"the kept-vocabulary map names ids outside the teacher's {rows} rows",
                                   "the pruned model does not come from this teacher; redo: minigpt prune SESSION")
            if student_vocab is not None and keep.numel() != student_vocab:
                raise MinigptError(f"the kept-vocabulary map holds {keep.numel()} ids for a student of "
                                   f"{student_vocab} rows", "redo the pruning: minigpt prune SESSION")
        elif student_vocab is not None and student_vocab != rows:
            raise MinigptError(f"the teacher has {rows} vocabulary rows and the student {student_vocab}, and the "
                               "model folder holds no kept-vocabulary map",
                               "redo the pruning so the map is saved: minigpt prune SESSION")
        self.keep = keep
        self.device = device
        self.sharded = False  # set when FSDP shards the teacher: then only its whole forward is called

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for the student's ids [B, L]: over the student's vocabulary (the
        kept columns, in the student's order) when `keep` is set, else over its own."""
        from engine.evaluate.perplexity import decoder_and_head

        was_training = self.model.training
        self.model.eval()  # a borrowed model may have been put in training mode since
        ids = ids.to(self.device)
        dec, head = decoder_and_head(self.model) if self.keep is not None and not self.sharded else (None, None)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if dec is not None:
                out = kept_logits(head, dec(input_ids=self.keep[ids], use_cache=False).last_hidden_state, self.keep)
            else:
                out = self.model(input_ids=self.keep[ids] if self.keep is not None else ids, use_cache=False).logits
                if self.keep is not None:
                    out = out.index_select(-1, self.keep)
        if was_training:
            self.model.train()
        return out


def kept_logits(head, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`head(hidden)[..., keep]` without the other columns: the kept rows of the LM head's weight
    (and bias), then the soft-cap of a `perplexity.CappedHead`. The rows are gathered per call
    (a V_kept × hidden copy), so a teacher whose weights change (teacher correction) stays right."""
    from engine.evaluate.perplexity import CappedHead

    cap = head.cap if isinstance(head, CappedHead) else None
    lin = head.head if cap else head
    bias = getattr(lin, "bias", None)
    z = torch.nn.functional.linear(hidden, lin.weight.index_select(0, keep),
                                   bias.index_select(0, keep) if bias is not None else None)
    return torch.tanh(z / cap) * cap if cap else z
