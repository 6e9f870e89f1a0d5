"""KD overhead: seconds per optimiser step of distillation (finetune.loss = "kd") ÷ cross-entropy.

Same student (identical initial weights), same packed blocks of the licences corpus, same
batch, AdamW, schedule and clipping; the KD step also runs the frozen teacher (the
unpruned model, a second copy) forward on every micro-batch and the chunked KL
(`engine.train.distill`). The student is the full model here: the worst case (a pruned
student is cheaper, the teacher costs the same). Rounds alternate CE and KD (CE, KD, CE,
KD ...) so a neighbour's burst of load hits both; each round times `--steps` optimiser
steps after one untimed step. Prints seconds per step and the median per-round ratio.
Goal (issue #13): KD ÷ CE <= 1.4.

Usage: .venv/bin/python benchmarks/kd_overhead.py [--model tiny|embedded:smollm2] [--steps N]
       [--rounds 3] [--batch-size 4] [--block-size 256] [--grad-accum 1] [--temperature 1] [--ce-weight 0]
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
    a = ap.parse_args()
    tiny = a.model == "tiny"
    a.steps = a.steps or (20 if tiny else 3)

    import torch

    from engine.config import FinetuneConfig
    from engine.data.domain import blocks as pack
    from engine.train import distill

    model, tok, name = load_model(tiny, threads=a.threads)
    init = copy.deepcopy(model.state_dict())
    teacher = distill.Teacher(copy.deepcopy(model), owned=True)
    blocks = pack(domain(tok).finetune, a.block_size)
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
