"""Perplexity speed: `engine.evaluate.perplexity.perplexity` tokens/s ÷ a plain Hugging Face loop, same tokens.

Two protocols on the held-out split of builtin:licenses, each timed round-robin:

* blocks: non-overlapping 512-token blocks; plain HF = `model(block, labels=block).loss`
  per block, batch 1 (the usual loop);
* sliding window (stride 256): plain HF = the loop from HF's "Perplexity of fixed-length
  models" guide.

The perplexities of both sides are printed too (they must agree to 0.1%; the guide's
off-by-one weighting makes its figure differ very slightly).

Usage: .venv/bin/python benchmarks/perplexity_speed.py [--tiny] [--threads N] [--tokens 4096] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math

from _common import domain, interleaved, load_model, machine, ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model: a quick smoke run")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()

    import torch

    from engine.evaluate import perplexity as evaluate

    model, tok, name = load_model(args.tiny, args.threads)
    block = min(args.block, 128) if args.tiny else args.block
    stride = block // 2 if args.tiny else args.stride
    ids = domain(tok).evaluate[: args.tokens]
    n_blocks = ids.numel() // block
    out = {}

    def hf_blocks():
        nll = 0.0
        with torch.no_grad():
            for i in range(n_blocks):
                x = ids[i * block:(i + 1) * block][None]
                nll += float(model(input_ids=x, labels=x).loss)
        out["hf_blocks"] = math.exp(nll / n_blocks)

    def hf_sliding():
        seq_len, nll_sum, n_tokens, prev_end = ids.numel(), 0.0, 0, 0
        with torch.no_grad():
            for begin in range(0, seq_len, stride):
                end = min(begin + block, seq_len)
                trg_len = end - prev_end
                x = ids[begin:end][None]
                y = x.clone()
                y[:, :-trg_len] = -100
                loss = model(x, labels=y).loss
                n = int((y != -100).sum()) - 1
                nll_sum += float(loss) * n
                n_tokens += n
                prev_end = end
                if end == seq_len:
                    break
        out["hf_sliding"] = math.exp(nll_sum / n_tokens)

    def ours_blocks():
        out["ours_blocks"] = evaluate.perplexity(model, ids, block, 0, args.batch)["ppl"]

    def ours_sliding():
        out["ours_sliding"] = evaluate.perplexity(model, ids, block, stride, args.batch)["ppl"]

    ours_blocks()  # warm-up
    times = interleaved({"plain HF blocks": hf_blocks, "ours blocks": ours_blocks,
                         "plain HF sliding (guide)": hf_sliding, "ours sliding": ours_sliding}, args.rounds)
    scored = {"blocks": n_blocks * (block - 1), "sliding": ids.numel() - 1}
    print(f"model: {name}; {ids.numel()} held-out tokens; block {block}, stride {stride}, our batch {args.batch}; "
          f"{args.rounds} interleaved rounds; {machine()}")
    print(f"ppl blocks: ours {out['ours_blocks']:.4f}, plain HF {out['hf_blocks']:.4f}; "
          f"sliding: ours {out['ours_sliding']:.4f}, HF guide {out['hf_sliding']:.4f}")
    print(f"{'contender':26} {'min s':>8} {'tok/s':>8}")
    for k, v in times.items():
        n = scored["blocks" if "blocks" in k else "sliding"]
        print(f"{k:26} {min(v):8.2f} {n / min(v):8.0f}")
    for kind, hf in (("blocks", "plain HF blocks"), ("sliding", "plain HF sliding (guide)")):
        med, lo, hi = ratio(times, hf, f"ours {kind}")
        print(f"RATIO ours {kind} tokens/s ÷ {hf}: {med:.3f}x (rounds {lo:.3f}-{hi:.3f})")


if __name__ == "__main__":
    main()
