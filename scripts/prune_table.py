"""The README's pruning table: SmolLM2 on a built-in corpus, paper thresholds and ratios.

Calibrates once, then for each setting prunes a fresh copy of the base model
(structural) and measures held-out perplexity. Prints a Markdown table.
Usage: .venv/bin/python scripts/prune_table.py [--corpus builtin:licenses] [--calib-tokens 16384]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from engine.models import size
from engine import config as config_mod
from engine.data import domain as data_mod
from engine.evaluate import perplexity as evaluate
from engine.models import load as models
from engine.prune import mlp as prune
from engine.prune.calibrate import calibrate
from engine.errors import MinigptError


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="builtin:licenses")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--block", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = config_mod.RunConfig()
    cfg.data.source = args.corpus
    model, tok, _ = models.load(cfg.model)
    d = data_mod.DomainData.build(cfg.data, tok, max_calib=args.calib_tokens, max_eval=args.eval_tokens)
    base_params = size.count_params(model)
    base_ppl = evaluate.perplexity(model, d.evaluate, args.block)["ppl"]
    t0 = time.perf_counter()
    stats = calibrate(model, data_mod.blocks(d.calibrate, args.block), batch_size=4)
    calib_s = time.perf_counter() - t0
    settings = [("threshold", e) for e in (1e-3, 1e-2, 1e-1)] + [("ratio", r) for r in (0.1, 0.3, 0.5)]
    print(f"SmolLM2-135M-Instruct, {args.corpus}: calibration {stats.n_tokens} tokens in {calib_s:.1f} s; "
          f"held-out {d.evaluate.numel()} tokens (block {args.block})\n")
    print("| setting | params | % removed | MLP neurons kept | held-out ppl before | after | calibration s |")
    print("|---|---|---|---|---|---|---|")
    for rule, v in settings:
        p = config_mod.PruneConfig(rule=rule, activation_threshold=v if rule == "threshold" else 1e-3,
                                   ratio=v if rule == "ratio" else 0.3)
        m = copy.deepcopy(model)
        try:
            plan = prune.select(m, stats, p)
        except MinigptError as e:
            print(f"| {rule} {v:g} | — | — | — | {base_ppl:.2f} | refused: {e.problem} | {calib_s:.0f} |")
            continue
        prune.apply_structural(m, plan)
        n = size.count_params(m)
        ppl = evaluate.perplexity(m, d.evaluate, args.block)["ppl"]
        label = f"ε = {v:g}" if rule == "threshold" else f"ratio {v:.0%} per layer"
        print(f"| {label} | {n:,} | {100 * (base_params - n) / base_params:.1f} | "
              f"{sum(plan.widths_after)}/{sum(plan.widths_before)} | {base_ppl:.2f} | {ppl:.2f} | {calib_s:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
