"""The KD teacher's logits with a pruned vocabulary: the whole head then cut (the old way) ÷
only the kept rows of the head (`distill.Teacher.logits`), side by side in one run.

For one micro-batch of domain text it times, interleaved round by round, the teacher's full
forward followed by `index_select` of the kept columns, against its body followed by the kept
rows of its LM head, and prints the size of the logits each one forms. Both give the same
logits (checked here within 1e-4). The kept ids are those the corpus uses (ε_emb = 0, as the
prune stage counts them on the calibration split).

    .venv/bin/python benchmarks/kd_teacher_head.py [--model embedded:gemma3-270m|embedded:smollm2]
        [--batch-size 2] [--block-size 256] [--rounds 3]
"""

from __future__ import annotations

import argparse

from _common import domain, interleaved, machine, ratio


def main() -> None:
    import torch

    from engine.config import ModelConfig
    from engine.models import load as loader
    from engine.train import distill

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:gemma3-270m")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    model, tok, _ = loader.load(ModelConfig(source=a.model, device="cpu", dtype="float32"))
    model.eval()
    d = domain(tok)
    v = model.get_input_embeddings().weight.shape[0]
    keep = torch.unique(d.calibrate.flatten())  # the ids the calibration split uses
    n = a.batch_size * a.block_size
    text = d.finetune.flatten()[:n]
    teacher = distill.Teacher(model, keep=keep, student_vocab=keep.numel())
    new_id = torch.full((v,), -1, dtype=torch.long)
    new_id[keep] = torch.arange(keep.numel())
    ids = new_id[text]
    ids = ids[ids >= 0][: n - n % a.block_size]
    ids = ids[: (ids.numel() // a.block_size) * a.block_size].view(-1, a.block_size)
    print(f"{a.model}: {v:,} vocabulary rows, {keep.numel():,} kept; one micro-batch of {tuple(ids.shape)} "
          f"tokens; {machine()}")

    def whole():
        return model(input_ids=keep[ids], use_cache=False).logits.index_select(-1, keep)

    def kept():
        return teacher.logits(ids)

    diff = float((whole() - kept()).detach().abs().max())
    assert diff < 1e-4, diff
    times = interleaved({"whole head, then cut": whole, "kept rows only": kept}, a.rounds)
    med, lo, hi = ratio(times, "whole head, then cut", "kept rows only")
    mb = 4 * ids.numel() / 2**20
    for k, t in times.items():
        print(f"{k:>22}: {min(t):.3f} s per micro-batch (best of {a.rounds}); logits formed "
              f"{(v if k.startswith('whole') else keep.numel()) * mb:,.0f} MiB fp32")
    print(f"whole ÷ kept: {med:.2f}× ({lo:.2f}–{hi:.2f}); max |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
