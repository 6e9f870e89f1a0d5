"""KD overhead: seconds per optimiser step of distillation (finetune.loss = "kd") ÷ cross-entropy.

Same student (identical initial weights), same packed blocks of the licences corpus, same
batch, AdamW, schedule and clipping; the KD step also runs the frozen teacher (the
unpruned model, a second copy) forward on every micro-batch and the chunked KL
(`engine.train.distill`). The student is the full model here: the worst case (a pruned
student is cheaper, the teacher costs the same). Rounds alternate CE and KD (CE, KD, CE,
KD ...) so a neighbour's burst of load hits both; each round times `--steps` optimiser
steps after one untimed step. Prints seconds per step and the median per-round ratio.
Goal (issue #13): KD ÷ CE <= 1.4.

With --student-mlp R and/or --student-vocab the student is a pruned copy instead, as in #13's rows:
R of its MLP neurons removed (the paper's score on 2,048 calibration tokens, the same ratio per
layer) and its vocabulary cut to the tokens the calibration and finetune splits use (ε_emb = 0); the
teacher then maps the student's ids to its own and computes only those columns of its LM head.

Usage: .venv/bin/python benchmarks/kd_overhead.py [--model tiny|embedded:smollm2] [--steps N]
       [--rounds 3] [--batch-size 4] [--block-size 256] [--grad-accum 1] [--temperature 1] [--ce-weight 0]
       [--student-mlp 0.5] [--student-vocab]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from _common import domain, load_model, machine


def _steps(model, teacher, blocks, fcfg, steps: int) -> float:
    import torch

    from engine.train.finetune import Finetuner

    torch.set_grad_enabled(True)
    ft = Finetuner(model, blocks, fcfg, seed=0, total_steps=steps + 1, teacher=teacher)
    ft.train_step()  # untimed: first-call allocations
    t0 = time.perf_counter()
    for _ in range(steps):
        ft.train_step()
    return (time.perf_counter() - t0) / steps


def _pruned_student(model, tok, d, mlp_ratio: float, cut_vocab: bool, name: str):
    """(student, its tokenizer, the kept ids or None, its name): a structurally pruned copy."""
    import torch

    from engine.config import PruneConfig
    from engine.data.domain import blocks as pack
    from engine.models import size
    from engine.prune import calibrate, mlp, vocab

    student, keep = copy.deepcopy(model), None
    before = size.count_params(student)
    if mlp_ratio:
        stats = calibrate.calibrate(student, pack(d.calibrate, 256)[:8], 4, linears=False)
        plan = mlp.select_and_compensate(student, stats, PruneConfig(rule="ratio", ratio=mlp_ratio))
        mlp.apply_structural(student, plan)
    if cut_vocab:
        rows = max(student.get_input_embeddings().weight.shape[0], len(tok))
        counts = calibrate.token_counts(torch.cat([d.calibrate, d.finetune]), rows)
        p = vocab.plan(tok, counts, 0.0, student)
        student, tok, _ = vocab.prune_vocabulary(student, tok, counts, 0.0, the_plan=p)
        keep = p.keep
    after = size.count_params(student)
    return student, tok, keep, (f"{name}, student pruned: MLP {mlp_ratio:.0%}, vocabulary "
                                f"{'ε_emb = 0' if cut_vocab else 'kept'}; {after / 1e6:.1f}M of {before / 1e6:.1f}M parameters")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "embedded:smollm2", "smollm2"], default="tiny")
    ap.add_argument("--steps", type=int, default=0, help="timed optimiser steps per round and loss "
                                                       "(default: 20 on tiny, 3 on smollm2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--student-mlp", type=float, default=0.0, help="share of the student's MLP neurons removed")
    ap.add_argument("--student-vocab", action="store_true", help="cut the student's vocabulary (ε_emb = 0)")
    a = ap.parse_args()
    tiny = a.model == "tiny"
    a.steps = a.steps or (20 if tiny else 3)

    import torch

    from engine.config import FinetuneConfig
    from engine.data.domain import blocks as pack
    from engine.train import distill

    model, tok, name = load_model(tiny, threads=a.threads)
    d = domain(tok)
    teacher = distill.Teacher(copy.deepcopy(model), owned=True)
    finetune_ids = d.finetune
    if a.student_mlp or a.student_vocab:
        model, tok, keep, name = _pruned_student(model, tok, d, a.student_mlp, a.student_vocab, name)
        teacher = distill.Teacher(teacher.model, keep=keep,
                                  student_vocab=None if keep is None else int(keep.numel()), owned=True)
        if keep is not None:
            from engine.data.domain import tokenize

            finetune_ids = tokenize(tok, d.finetune_texts)
    init = copy.deepcopy(model.state_dict())
    blocks = pack(finetune_ids, a.block_size)
    common = dict(enabled=True, lr=1e-4, batch_size=a.batch_size, block_size=a.block_size, grad_accum=a.grad_accum,
                  warmup_steps=1, max_grad_norm=1.0)
    cfgs = {"ce": FinetuneConfig(**common, loss="ce"),
            "kd": FinetuneConfig(**common, loss="kd", kd_temperature=a.temperature, kd_ce_weight=a.ce_weight)}
    tokens = a.batch_size * a.grad_accum * a.block_size
    vocab = model.get_input_embeddings().weight.shape[0]
    print(f"model: {name}; {machine()}")
    print(f"data: builtin:licenses fine-tune split, {blocks.shape[0]} blocks of {a.block_size}; batch {a.batch_size} x "
          f"accum {a.grad_accum} ({tokens:,} tokens/step, vocab {vocab:,}); {a.steps} timed steps per round; "
          f"KD at T = {a.temperature:g}, CE weight {a.ce_weight:g}, KL chunks of {distill.chunk_rows(vocab)} tokens")
    times: dict[str, list[float]] = {"ce": [], "kd": []}
    for r in range(a.rounds):
        for loss in ("ce", "kd"):
            model.load_state_dict(init)
            model.train()
            torch.manual_seed(0)
            secs = _steps(model, teacher if loss == "kd" else None, blocks, cfgs[loss], a.steps)
            times[loss].append(secs)
            print(f"  round {r + 1} {loss}: {secs:8.3f} s/step ({tokens / secs:,.1f} tokens/s)")
    ratios = [k / c for c, k in zip(times["ce"], times["kd"])]
    for loss in ("ce", "kd"):
        print(f"{loss}: {statistics.median(times[loss]):.3f} s/step (median of {a.rounds})")
    print(f"ratio KD/CE: {statistics.median(ratios):.3f} (per-round range {min(ratios):.3f}-{max(ratios):.3f}); "
          "goal <= 1.4")


if __name__ == "__main__":
    main()
