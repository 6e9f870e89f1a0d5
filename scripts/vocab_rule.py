"""The held-out vocabulary keep rule against ε_emb = 0, on held-out documents neither rule counted.

Three document-disjoint sets (engine.data.domain's seeded split, plus a hold-back):
* counted: the calibration stream (--calib-tokens) and the finetune split's documents but the last;
* validation: those last finetune documents (--validation-tokens), which only the held-out rule reads,
  to size its cut;
* held-out: the evaluate split, cut at --eval-tokens (base tokenizer), which neither rule sees.
The held-out rule's ranking is count + --prior × N × the model's expected distribution, summed over
the first --prior-tokens calibration tokens (`vocab.expected_counts`; N = the counted tokens).
Rows: the base model; ε_emb = 0 (keep what the counted text used); the held-out rule's ranking cut
to the same number of rows as ε_emb = 0 (the same size, so only the choice of tokens differs); the
held-out rule at the size it chooses itself (smallest cut within --tolerance on the validation
documents); with --rows, the ranking cut to each of those sizes, and ε_emb = 0's frequency order
(then by id) cut there too; with --weights, the ranking under each of those prior weights cut to
ε_emb = 0's size (a negative weight counts the model's expected mass as a cost). With --oracle, two
diagnostic rows that read the held-out text itself, so no rule can reach them: ε_emb = 0's set less
the ids the held-out text never uses (what dropping unused rows is worth: their probability mass goes
back to the used ones) and plus the ids it uses that ε_emb = 0 dropped (what full coverage is worth).
Every row: parameters, vocabulary rows, held-out bits per byte, the relative change, the held-out
tokens kept whole (coverage).

Usage: python scripts/vocab_rule.py --model embedded:smollm2 --corpus builtin:licenses [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from engine import config as config_mod
from engine.data import domain as data_mod
from engine.evaluate import perplexity
from engine.models import load as models
from engine.models import size
from engine.prune import calibrate as cal_mod
from engine.prune import vocab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--corpus", default="builtin:licenses")
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--validation-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--prior", type=float, default=vocab.PRIOR_WEIGHT)
    ap.add_argument("--prior-tokens", type=int, default=16384)
    ap.add_argument("--rows", default="", help="comma-separated sizes to cut the ranking to, e.g. 31000")
    ap.add_argument("--weights", default="", help="comma-separated prior weights cut to ε_emb = 0's size, e.g. -0.17,0.1")
    ap.add_argument("--oracle", action="store_true", help="add the two diagnostic rows that read the held-out text")
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    t0 = time.time()
    model, tok, _ = models.load(config_mod.ModelConfig(source=a.model, device="cpu", dtype="float32"))
    d = data_mod.DomainData.build(config_mod.DataConfig(source=a.corpus), tok, max_calib=a.calib_tokens,
                                  max_eval=1)
    docs, held, n = list(d.finetune_texts), [], 0
    while docs and n < a.validation_tokens:
        t = docs.pop()
        held.insert(0, t)
        n += len(tok(t, add_special_tokens=False)["input_ids"])
    held = vocab.held_out_texts(tok, held, a.validation_tokens)  # the last document may be long: cut it
    rows0 = max(model.get_input_embeddings().weight.shape[0], len(tok))
    counted = torch.cat([d.calibrate, data_mod.tokenize(tok, docs)])
    counts = cal_mod.token_counts(counted, rows0)
    texts = vocab.held_out_texts(tok, d.eval_texts, a.eval_tokens)
    e = config_mod.EvaluateConfig(block_size=a.block, max_tokens=0, batch_size=4)

    def bpb(m, t):
        return perplexity.bits_per_byte(m, t, texts, a.block, 0, 4)

    out = {"model": a.model, "corpus": a.corpus, "counted_tokens": int(counted.numel()),
           "validation_documents": len(held), "validation_tokens": n,
           "eval_documents": len(texts), "eval_bytes": sum(len(t.encode()) for t in texts), "rows": {}}
    base = bpb(model, tok)
    out["rows"]["base"] = {"params": size.count_params(model), "vocab": rows0, "bpb": base["bpb"]}
    print(json.dumps(out["rows"]["base"]), flush=True)

    def row(name, p, extra=None):
        m = copy.deepcopy(model)
        m, t, info = vocab.prune_vocabulary(m, tok, counts, 0.0, the_plan=p)
        r = {"params": size.count_params(m), "vocab": int(p.keep.numel()), "bpb": bpb(m, t)["bpb"],
             "coverage": vocab.coverage(tok, texts, p), "kept_because": p.reasons, **(extra or {})}
        r["bpb_change"] = r["bpb"] / base["bpb"] - 1
        out["rows"][name] = r
        print(name, json.dumps(r), f"{time.time() - t0:.0f}s", flush=True)
        del m

    expected = vocab.expected_counts(model, data_mod.blocks(d.calibrate, a.block), 4, rows0, max_tokens=a.prior_tokens)
    prior_tokens = round(float(expected.sum()))  # one distribution per position, each summing to 1
    order = vocab.ranking(tok, counts, expected, a.prior)
    out["prior"] = {"weight": a.prior, "tokens": prior_tokens}
    print(f"expected counts over {prior_tokens:,} tokens, {time.time() - t0:.0f}s", flush=True)
    p0 = vocab.plan(tok, counts, 0.0, model)
    row("eps0", p0)
    row("heldout_same_size", vocab.plan_of_size(tok, counts, int(p0.keep.numel()), model, order))
    for w in [float(x) for x in a.weights.split(",") if x]:
        row(f"weight_{w:+g}_same_size", vocab.plan_of_size(tok, counts, int(p0.keep.numel()), model,
                                                          vocab.ranking(tok, counts, expected, w)))
    if a.oracle:
        used = torch.zeros(rows0, dtype=torch.bool)
        used[torch.tensor([i for r in tok(texts, add_special_tokens=False)["input_ids"] for i in r])] = True
        kept0 = torch.zeros(rows0, dtype=torch.bool)
        kept0[p0.keep] = True
        q = expected / expected.sum()
        out["oracle"] = {"eps0_rows_unused_held_out": int((kept0 & ~used).sum()),
                         "their_expected_mass_per_position": round(float(q[kept0 & ~used].sum()), 4),
                         "used_ids_eps0_dropped": int((used & ~kept0).sum())}
        print("oracle", json.dumps(out["oracle"]), flush=True)
        row("oracle_eps0_and_used", vocab.plan(tok, counts, 0.0, model, chosen=kept0 & used))
        row("oracle_eps0_or_used", vocab.plan(tok, counts, 0.0, model, chosen=kept0 | used))
    chosen, table = vocab.choose_cut(model, tok, counts, held, e, a.tolerance, expected=expected, weight=a.prior)
    row("heldout_chosen", chosen, {"validation": table})
    for r in [int(x) for x in a.rows.split(",") if x]:
        row(f"heldout_{r}", vocab.plan_of_size(tok, counts, r, model, order))
        row(f"frequency_{r}", vocab.plan_of_size(tok, counts, r, model))
    out["seconds"] = round(time.time() - t0, 1)
    if a.json:
        from engine import atomic

        atomic.write_json(a.json, out)
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
