"""Fine-tuning throughput: our loop (`engine.train.finetune.Finetuner`) against a plain HF `Trainer`.

Same model (identical initial weights), same packed blocks of the licences corpus, same
batch size, gradient accumulation, AdamW, cosine schedule and grad-norm clipping. Rounds
alternate the two (ours, HF, ours, HF ...) so a neighbour's burst of load hits both; each
round times `--steps` optimiser steps after one untimed step. HF's steps are timed by a
callback from the end of its first step to the end of its last, so Trainer setup is not
counted against it. Prints measured tokens/s and the median per-round ratio.

Usage: .venv/bin/python benchmarks/finetune_throughput.py [--model tiny|smollm2] [--steps N]
       [--rounds 3] [--batch-size 4] [--block-size 128] [--grad-accum 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

from _common import domain, load_model, machine


def _ours(model, blocks, fcfg, steps: int):
    import torch

    from engine.train.finetune import Finetuner

    torch.set_grad_enabled(True)
    ft = Finetuner(model, blocks, fcfg, seed=0, total_steps=steps + 1)
    ft.train_step()  # untimed: first-call allocations
    t0 = time.perf_counter()
    for _ in range(steps):
        ft.train_step()
    return time.perf_counter() - t0


def _hf(model, blocks, fcfg, steps: int, out: str):
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    torch.set_grad_enabled(True)
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return blocks.shape[0]

        def __getitem__(self, i):
            return {"input_ids": blocks[i], "labels": blocks[i]}

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=fcfg.batch_size, gradient_accumulation_steps=fcfg.grad_accum,
        learning_rate=fcfg.lr, adam_beta1=fcfg.betas[0], adam_beta2=fcfg.betas[1], adam_epsilon=fcfg.eps,
        weight_decay=fcfg.weight_decay, lr_scheduler_type="cosine", warmup_steps=fcfg.warmup_steps,
        max_grad_norm=fcfg.max_grad_norm, max_steps=steps + 1, use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=0)
    Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=default_data_collator,
            callbacks=[Clock()]).train()
    assert len(marks) == steps + 1, marks
    return marks[-1] - marks[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--steps", type=int, default=0, help="timed optimiser steps per round and contender "
                                                       "(default: 40 on tiny, 4 on smollm2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--grad-accum", type=int, default=1)
    a = ap.parse_args()
    a.steps = a.steps or (40 if a.model == "tiny" else 4)

    import torch

    from engine.config import FinetuneConfig
    from engine.data.domain import blocks as pack

    model, tok, name = load_model(a.model == "tiny")
    init = copy.deepcopy(model.state_dict())
    ids = domain(tok).finetune
    blocks = pack(ids, a.block_size)
    fcfg = FinetuneConfig(enabled=True, lr=1e-4, batch_size=a.batch_size, block_size=a.block_size,
                          grad_accum=a.grad_accum, warmup_steps=1, max_grad_norm=1.0)
    tokens = a.steps * a.batch_size * a.grad_accum * a.block_size
    print(f"model: {name}; {machine()}")
    print(f"data: builtin:licenses fine-tune split, {blocks.shape[0]} blocks of {a.block_size}; "
          f"batch {a.batch_size} x accum {a.grad_accum}; {a.steps} timed steps ({tokens:,} tokens) per round")
    ours, hf = [], []
    with tempfile.TemporaryDirectory() as out:
        for r in range(a.rounds):
            for which, times in (("ours", ours), ("hf", hf)):
                model.load_state_dict(init)
                model.train()
                torch.manual_seed(0)
                secs = _ours(model, blocks, fcfg, a.steps) if which == "ours" else _hf(model, blocks, fcfg, a.steps, out)
                times.append(secs)
                print(f"  round {r + 1} {which:>4}: {tokens / secs:10,.1f} tokens/s")
    ratios = [h / o for o, h in zip(ours, hf)]  # time_hf / time_ours = tokens/s ours / tokens/s hf
    print(f"ours (engine.train.finetune.Finetuner): {tokens / statistics.median(ours):,.1f} tokens/s (median of {a.rounds})")
    print(f"HF Trainer:                       {tokens / statistics.median(hf):,.1f} tokens/s (median of {a.rounds})")
    print(f"ratio ours/HF: {statistics.median(ratios):.3f} (per-round range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
