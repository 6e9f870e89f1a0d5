"""docs/results/vocab_smollm2.md: vocabulary pruning on SmolLM2, alone and with MLP pruning.

Runs the real pipeline (calibrate → prune, structural) once per variant, then loads each
exported folder with stock `AutoTokenizer` / `AutoModelForCausalLM` and measures held-out
bits per byte on the same documents (the first --eval-tokens tokens of the held-out
split), so models with different tokenizers compare. Prints a Markdown table, then the
greedy continuation of a prompt by the base and the pruned models, each generated in a
fresh Python process that imports only transformers.
Usage: .venv/bin/python scripts/vocab_table.py [--corpus builtin:licenses] [--calib-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.models import size
from engine import config as config_mod
from engine.data import domain as data_mod
from engine.evaluate import perplexity as evaluate
from engine.models import load as models
from engine.run import pipeline
from engine.prune import mlp as prune
from engine.run import session
from engine.prune import vocab

PROMPT = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software"
GENERATE = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
enc = tok(sys.argv[2], return_tensors="pt")
out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
print(json.dumps({"text": tok.decode(out[0], skip_special_tokens=True), "vocab": len(tok),
                  "engine_imported": any(m.startswith("engine") for m in sys.modules)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="builtin:licenses")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.3)
    args = ap.parse_args()
    variants = [("vocabulary only (ε_emb = 0)", 0.0, 0.0),
                (f"MLP {args.ratio:.0%} only", args.ratio, -1.0),
                (f"MLP {args.ratio:.0%} + vocabulary (ε_emb = 0)", args.ratio, 0.0)]
    base_cfg = config_mod.from_dict({
        "data": {"source": args.corpus},
        "calibrate": {"block_size": 256, "max_tokens": args.calib_tokens},
        "evaluate": {"block_size": args.block, "max_tokens": args.eval_tokens, "evaluate_base": False}})
    model, tok, _ = models.load(base_cfg.model)
    d = data_mod.DomainData.build(base_cfg.data, tok, max_eval=args.eval_tokens)
    texts = vocab.held_out_texts(tok, d.eval_texts, args.eval_tokens)
    rows = [_row("SmolLM2-135M-Instruct (base)", model, tok, texts, args.block)]
    base_dir = models.resolve_source(base_cfg.model)
    folders = {"base": base_dir}
    root = Path(tempfile.mkdtemp(prefix="vocab-table-"))
    for name, ratio, eps in variants:
        cfg = config_mod.from_dict({**base_cfg.to_dict(), "name": name,
                                    "prune": {"rule": "ratio", "ratio": ratio, "embedding_threshold": eps}})
        s = session.create(cfg, root, name=f"v{len(folders)}")
        t0 = time.perf_counter()
        res = pipeline.run(s, stages=["calibrate", "prune"])
        print(f"[{name}] pipeline {time.perf_counter() - t0:.0f} s; vocab step: {json.dumps(res.get('vocab', {}))}",
              file=sys.stderr)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        m = AutoModelForCausalLM.from_pretrained(s.model_dir).eval()
        t = AutoTokenizer.from_pretrained(s.model_dir)
        rows.append(_row(name, m, t, texts, args.block, res.get("vocab")))
        folders[name] = str(s.model_dir)
    base = rows[0]
    print(f"Corpus {args.corpus}; held-out: {len(texts)} documents, {rows[0]['bytes']:,} bytes "
          f"(first {args.eval_tokens:,} tokens of the held-out split); bits/byte with block {args.block}, "
          "every token scored once. Calibration "
          f"{args.calib_tokens:,} tokens; token counts over the calibrate + finetune splits.\n")
    print("| model | vocab | params | Δ params | bits/byte | Δ bpb | held-out tokens | coverage |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['vocab']:,} | {r['params'] / 1e6:.2f} M | "
              f"{100 * (r['params'] - base['params']) / base['params']:+.1f}% | {r['bpb']:.4f} | "
              f"{100 * (r['bpb'] - base['bpb']) / base['bpb']:+.2f}% | {r['tokens']:,} | {r['coverage']} |")
    print("\n### Greedy continuations (fresh process, transformers only)\n")
    print(f"Prompt: `{PROMPT}`\n")
    for name, folder in folders.items():
        r = subprocess.run([sys.executable, "-c", GENERATE, folder, PROMPT], capture_output=True, text=True,
                           timeout=600)
        if r.returncode:
            print(f"- {name}: FAILED\n```\n{r.stderr[-1500:]}\n```")
            continue
        g = json.loads(r.stdout.strip().splitlines()[-1])
        assert not g["engine_imported"]
        print(f"- **{name}** (vocab {g['vocab']:,}):\n\n  > {g['text']!r}\n")


def _row(name, model, tok, texts, block, vinfo=None) -> dict:
    t0 = time.perf_counter()
    res = evaluate.bits_per_byte(model, tok, texts, block)
    print(f"[{name}] bpb {res['bpb']:.4f} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return {"name": name, "vocab": model.get_input_embeddings().weight.shape[0], "params": size.count_params(model),
            "bpb": res["bpb"], "bytes": res["bytes"], "tokens": res["tokens"],
            "coverage": f"{100 * vinfo['coverage']:.2f}%" if vinfo else "100%",
            "vinfo": vinfo}


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
