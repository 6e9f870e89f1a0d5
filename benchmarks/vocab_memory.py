"""Peak memory (RSS) of calibration and of evaluation at batch 4 × 512 tokens, on a 262k vocabulary.

Each measurement runs in a fresh Python process (peak RSS is a high-water mark per process):
* load: the model loaded, nothing run (the floor every other figure includes);
* calibrate: `engine.prune.calibrate.calibrate` on --batches batches of 4 × 512 domain tokens, with
  every linear's statistics (the LM head's included, computed a chunk of rows at a time);
* evaluate: held-out perplexity and bits per byte (`engine.evaluate.perplexity`), batch 4, blocks
  of 512, on --batches × 2048 tokens;
* full logits: one plain `model(input_ids)` forward of one 4 × 512 batch, the logits held (what a
  loop that materialises tokens × vocabulary costs), for comparison.
Goal (issue 15): calibration and evaluation ≤ 3 GB on Gemma 3 270M.

Usage: python benchmarks/vocab_memory.py [--model embedded:gemma3-270m] [--batches 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import REPO

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_grad_enabled(False)
from engine.config import ModelConfig, DataConfig
from engine.models import load as models
from engine.data import domain as data_mod
what, source, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, tok, _ = models.load(ModelConfig(source=source, device="cpu", dtype="float32"))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
out = {{"what": what, "rows": int(model.get_input_embeddings().weight.shape[0]), "after_load_gb": round(rss(), 3)}}
n = batches * 4 * 512
d = data_mod.DomainData.build(DataConfig(source="builtin:licenses"), tok, max_calib=n, max_eval=n)
t0 = time.perf_counter()
if what == "calibrate":
    from engine.prune import calibrate
    st = calibrate.calibrate(model, data_mod.blocks(d.calibrate, 512)[: batches * 4], 4, linears=True)
    out["tokens"] = st.n_tokens
elif what == "evaluate":
    from engine.evaluate import perplexity
    from engine.prune.vocab import held_out_texts
    r = perplexity.perplexity(model, d.evaluate, 512, 0, 4)
    b = perplexity.bits_per_byte(model, tok, held_out_texts(tok, d.eval_texts, n), 512, 0, 4)
    out.update(tokens=r["tokens"], ppl=round(r["ppl"], 4), bpb=round(b["bpb"], 4))
elif what == "full_logits":
    x = data_mod.blocks(d.calibrate, 512)[:4]
    lg = model(input_ids=x, use_cache=False).logits
    out["logits_gb"] = round(lg.numel() * lg.element_size() / 2**30, 3)
out["seconds"] = round(time.perf_counter() - t0, 1)
out["peak_rss_gb"] = round(rss(), 3)
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:gemma3-270m")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    rows = []
    for what in ("load", "calibrate", "evaluate", "full_logits"):
        r = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), what, a.model, str(a.batches)],
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{what} failed")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| run ({a.model}, batch 4 × 512) | peak RSS GB | after load GB | seconds |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['peak_rss_gb']:.2f} | {r['after_load_gb']:.2f} | {r['seconds']} |")
    if a.json:
        sys.path.insert(0, str(REPO))
        from engine import atomic

        atomic.write_json(a.json, rows)


if __name__ == "__main__":
    main()
