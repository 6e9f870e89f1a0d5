"""Inference speed of structurally pruned models ÷ the base model's, on CPU.

The base model is calibrated on domain text (builtin:licenses), then 20% and 40% of the
MLP neurons of every layer are removed for real (`engine.prune.mlp`, ratio rule, structural
mode); "/64" rows round each kept width up to a multiple of 64 (prune.round_to = 64).
MLP pruning alone cannot remove the lm_head's share of the work (21% of SmolLM2's
multiply-accumulates per token), so "+vocab" rows also apply the paper's embedding
pruning (`engine.prune.vocab`, ε_emb = 0: tokens never seen in the domain's calibration split
are removed from the embedding, the tied lm_head and the tokenizer); their prefill input
is the same text re-tokenized by the pruned tokenizer, cut to the same shape. Two
workloads, each timed round-robin over all the models:

* prefill: one forward pass over a batch of 512-token blocks (throughput, tokens/s), with
  logits at every position (scoring, as perplexity and MCQ do);
* prompt: the same pass with the LM head on the last position only (`logits_to_keep=1`, what
  generation's prefill needs and llama.cpp's prompt speed measures): without it a full-vocabulary
  model also writes 2 × 512 × 49,152 fp32 logits (201 MB) per call, which no MAC count sees;
* decode: greedy generation of new tokens after a 64-token prompt, batch 1, KV cache
  (what a chat user waits for, tokens/s).

Also printed: the share of multiply-accumulates per token removed (MLP + attention +
lm_head), which bounds the speed-up any MLP-only pruning can give.
Target from the issue: a model pruned by 40% >= 1.5x faster on CPU (read both ways here:
40% of the MLP neurons, and about 40% of the parameters with the vocabulary).

With `--sessions DIR...` the rows are instead the final models of those sessions (any mix of
axes: heads, hidden width, depth, vocabulary), each timed on the same text under its own
tokenizer: the rows of issue #13's 30% and 50% mixes.

Usage: .venv/bin/python benchmarks/inference_speed.py [--tiny] [--threads N] [--rounds 3] [--new-tokens 32]
       [--sessions SESSION_DIR ...]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

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
    ap.add_argument("--sessions", nargs="+", default=[],
                    help="instead of the MLP/vocab rows: the final models of these session folders (e.g. the "
                         "30%% and 50%% mixes of scripts/compress_table.py), each with its own tokenizer")
    args = ap.parse_args()

    import torch

    from engine.prune import mlp as prune

    from engine.models import size
    from engine.prune import vocab
    from engine.prune.calibrate import calibrate, token_counts
    from engine.config import PruneConfig
    from engine.data.domain import blocks

    base, tok, name = load_model(args.tiny, args.threads)
    block = 128 if args.tiny else 512
    d = domain(tok)
    stats = calibrate(base, blocks(d.calibrate[: args.calib_tokens], block), 2)
    models = {"base": base}
    counts = token_counts(d.calibrate, len(tok))
    inputs = {}  # model name -> (prefill blocks, decode prompt, tokenizer) for vocabulary-pruned models
    vocab_rows = []
    for path in args.sessions:  # a pruned model as the run saved it: any axes, its own tokenizer
        from transformers import AutoTokenizer

        from engine.models import export

        folder = Path(path) / "model"
        m = export.load_model(folder, dtype=torch.float32, device="cpu").eval()
        new_tok = AutoTokenizer.from_pretrained(folder)
        k = Path(path).name
        models[k] = m
        ids = torch.tensor(new_tok("\n\n".join(d.eval_texts))["input_ids"])
        inputs[k] = (blocks(ids, block)[: args.prefill_batch], ids[:64][None], new_tok)
    for r in (0.2, 0.4) if not args.sessions else ():
        for round_to in (1, 64):  # 64: widths the matmul kernels tile evenly
            m = copy.deepcopy(base)
            prune.apply_structural(m, prune.select(m, stats, PruneConfig(rule="ratio", ratio=r, round_to=round_to)))
            k = f"pruned {int(r * 100)}%" + (f" /{round_to}" if round_to > 1 else "")
            models[k] = m.eval()
            if round_to == 64:
                vocab_rows.append((k + " +vocab", copy.deepcopy(m)))
    for k, m in vocab_rows:  # after the MLP-only rows, so the table lists them last
        m, new_tok, _ = vocab.prune_vocabulary(m, tok, counts, 0.0)
        models[k] = m.eval()
        ids = torch.tensor(new_tok("\n\n".join(d.eval_texts))["input_ids"])
        inputs[k] = (blocks(ids, block)[: args.prefill_batch], ids[:64][None], new_tok)

    x = blocks(d.evaluate, block)[: args.prefill_batch]
    prompt = d.evaluate[:64][None]
    n_new = args.new_tokens

    def prefill(k, m, last_only=False):
        xi = inputs[k][0] if k in inputs else x
        assert xi.shape == x.shape, (k, xi.shape, x.shape)
        keep = {"logits_to_keep": 1} if last_only else {}  # the prompt workload: the last position's logits
        return lambda: m(input_ids=xi, use_cache=False, **keep)

    def decode(k, m):
        p, t = (inputs[k][1], inputs[k][2]) if k in inputs else (prompt, tok)
        return lambda: m.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n_new,
                                  min_new_tokens=n_new, do_sample=False, pad_token_id=t.eos_token_id)

    for k, m in models.items():  # warm-up
        prefill(k, m)()
        prefill(k, m, last_only=True)()
        decode(k, m)()
    pre = interleaved({k: prefill(k, m) for k, m in models.items()}, args.rounds)
    last = interleaved({k: prefill(k, m, last_only=True) for k, m in models.items()}, args.rounds)
    dec = interleaved({k: decode(k, m) for k, m in models.items()}, args.rounds)

    print(f"model: {name}; prefill {x.shape[0]}x{x.shape[1]} tokens; decode {n_new} new tokens after 64, "
          f"batch 1; {args.rounds} interleaved rounds; {machine()}")
    print(f"{'model':24} {'params':>12} {'MACs/token':>12} {'prefill tok/s':>14} {'prompt tok/s':>13} "
          f"{'decode tok/s':>13}")
    base_macs = macs_per_token(base)
    for k, m in models.items():
        print(f"{k:24} {size.count_params(m):12,} {macs_per_token(m):12,} "
              f"{x.numel() / min(pre[k]):14.0f} {x.numel() / min(last[k]):13.0f} {n_new / min(dec[k]):13.1f}")
    for k in list(models)[1:]:
        p, plo, phi = ratio(pre, "base", k)
        q, qlo, qhi = ratio(dec, "base", k)
        u, ulo, uhi = ratio(last, "base", k)
        bound = base_macs / macs_per_token(models[k])
        removed = 1 - size.count_params(models[k]) / size.count_params(base)
        print(f"RATIO {k} ({removed:.1%} of params removed) ÷ base tokens/s: prefill {p:.3f}x "
              f"(rounds {plo:.3f}-{phi:.3f}), prompt {u:.3f}x (rounds {ulo:.3f}-{uhi:.3f}), decode {q:.3f}x (rounds {qlo:.3f}-{qhi:.3f}); MAC bound {bound:.3f}x")
    print("target: pruned 40% >= 1.5x")


if __name__ == "__main__":
    main()
