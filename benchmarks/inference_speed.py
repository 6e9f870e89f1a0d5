"""Inference speed of structurally pruned models ÷ the base model's, on CPU.

The base model is calibrated on domain text (builtin:licenses), then 20% and 40% of the
MLP neurons of every layer are removed for real (`engine.prune`, ratio rule, structural
mode); "/64" rows round each kept width up to a multiple of 64 (prune.round_to = 64). Two workloads, each timed round-robin over the three models:

* prefill: one forward pass over a batch of 512-token blocks (throughput, tokens/s);
* decode: greedy generation of new tokens after a 64-token prompt, batch 1, KV cache
  (what a chat user waits for, tokens/s).

Also printed: the share of multiply-accumulates per token removed (MLP + attention +
lm_head), which bounds the speed-up any MLP-only pruning can give.
Target from the issue: 40% pruned >= 1.5x faster on CPU.

Usage: .venv/bin/python benchmarks/inference_speed.py [--tiny] [--threads N] [--rounds 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import copy

from _common import domain, interleaved, load_model, machine, ratio


def macs_per_token(model) -> int:
    """Weight multiply-accumulates per token: every linear layer plus the lm_head."""
    import torch
    from transformers.pytorch_utils import Conv1D

    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    head = model.get_output_embeddings()
    if head is not None and not any(head is m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        n += head.weight.numel()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model: a quick smoke run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--prefill-batch", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()

    import torch

    from engine import prune
    from engine.calibrate import calibrate
    from engine.config import PruneConfig
    from engine.data import blocks

    base, tok, name = load_model(args.tiny, args.threads)
    block = 128 if args.tiny else 512
    d = domain(tok)
    stats = calibrate(base, blocks(d.calibrate[: args.calib_tokens], block), 2)
    models = {"base": base}
    for r in (0.2, 0.4):
        for round_to in (1, 64):  # 64: widths the matmul kernels tile evenly
            m = copy.deepcopy(base)
            prune.apply_structural(m, prune.select(m, stats, PruneConfig(rule="ratio", ratio=r, round_to=round_to)))
            models[f"pruned {int(r * 100)}%" + (f" /{round_to}" if round_to > 1 else "")] = m.eval()

    x = blocks(d.evaluate, block)[: args.prefill_batch]
    prompt = d.evaluate[:64][None]
    n_new = args.new_tokens

    def prefill(m):
        return lambda: m(input_ids=x, use_cache=False)

    def decode(m):
        return lambda: m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                                  min_new_tokens=n_new, do_sample=False, pad_token_id=tok.eos_token_id)

    for m in models.values():  # warm-up
        prefill(m)()
        decode(m)()
    pre = interleaved({k: prefill(m) for k, m in models.items()}, args.rounds)
    dec = interleaved({k: decode(m) for k, m in models.items()}, args.rounds)

    print(f"model: {name}; prefill {x.shape[0]}x{x.shape[1]} tokens; decode {n_new} new tokens after 64, "
          f"batch 1; {args.rounds} interleaved rounds; {machine()}")
    print(f"{'model':16} {'params':>12} {'MACs/token':>12} {'prefill tok/s':>14} {'decode tok/s':>13}")
    base_macs = macs_per_token(base)
    for k, m in models.items():
        print(f"{k:16} {prune.count_params(m):12,} {macs_per_token(m):12,} "
              f"{x.numel() / min(pre[k]):14.0f} {n_new / min(dec[k]):13.1f}")
    for k in list(models)[1:]:
        p, plo, phi = ratio(pre, "base", k)
        q, qlo, qhi = ratio(dec, "base", k)
        bound = base_macs / macs_per_token(models[k])
        print(f"RATIO {k} ÷ base tokens/s: prefill {p:.3f}x (rounds {plo:.3f}-{phi:.3f}), "
              f"decode {q:.3f}x (rounds {qlo:.3f}-{qhi:.3f}); MAC bound {bound:.3f}x")
    print("target: pruned 40% >= 1.5x")


if __name__ == "__main__":
    main()
