"""README table (issue 15, Must show 3): one model on one corpus, four rows, measured in one process.

Rows: the base model; vocabulary only at ε_emb = 0 (tokens the training splits used, as the
prune stage counts them: calibration stream + finetune split); vocabulary + 30% of the MLP neurons
(wanda, same ratio per layer, least-squares refit of down_proj on the calibration Gram, structural);
that model after a short CE recovery on the finetune split (re-tokenized with the pruned tokenizer).
Columns: parameters, vocabulary rows, held-out bits per byte (the evaluate split's first
--eval-tokens base tokens, the same bytes for every row), generated-MCQ accuracy (--mcq sentence
completions generated from the evaluate split, lm-eval's acc). The held-out documents are disjoint
from every counted, calibration and training document.

Usage: python scripts/gemma_table.py --model embedded:gemma3-270m --corpus builtin:licenses --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time

import torch

from engine import config as config_mod
from engine.data import domain as data_mod
from engine.evaluate import mcq
from engine.evaluate import perplexity
from engine.models import load as models
from engine.models import size
from engine.prune import calibrate as cal_mod
from engine.prune import mlp as prune
from engine.prune import vocab
from engine.train import finetune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:gemma3-270m")
    ap.add_argument("--corpus", default="builtin:licenses")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--mcq", type=int, default=40)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ft-batch", type=int, default=2)
    ap.add_argument("--ft-block", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    model, tok, _ = models.load(config_mod.ModelConfig(source=a.model, device="cpu", dtype="float32"))
    dcfg = config_mod.DataConfig(source=a.corpus)
    d = data_mod.DomainData.build(dcfg, tok, max_calib=a.calib_tokens, max_eval=1)
    texts = vocab.held_out_texts(tok, d.eval_texts, a.eval_tokens)
    qs = mcq.generate(d.eval_texts, a.mcq, seed=0)
    out = {"model": a.model, "corpus": a.corpus, "args": vars(a), "eval_documents": len(texts),
           "eval_bytes": sum(len(t.encode()) for t in texts), "mcq_items": len(qs.items), "rows": {}}

    def measure(name, m, t, extra=None):
        t1 = time.time()
        b = perplexity.bits_per_byte(m, t, texts, a.block, 0, 4)
        acc = mcq.score(m, t, qs, rules=("acc",), batch_size=4)["acc"]
        r = {"params": size.count_params(m), "vocab": int(m.get_input_embeddings().weight.shape[0]),
             "bpb": b["bpb"], "eval_tokens": b["tokens"], "mcq_acc": acc, "seconds": round(time.time() - t1, 1),
             **(extra or {})}
        out["rows"][name] = r
        print(name, json.dumps(r), f"t={time.time() - t0:.0f}s", flush=True)
        _save(a, out)

    measure("base", model, tok)
    rows = max(model.get_input_embeddings().weight.shape[0], len(tok))
    counts = cal_mod.token_counts(torch.cat([d.calibrate, d.finetune]), rows)
    m1 = copy.deepcopy(model)
    m1, tok1, info = vocab.prune_vocabulary(m1, tok, counts, 0.0)
    measure("vocab_eps0", m1, tok1, {"kept_because": info["kept_because"],
                                     "coverage": vocab.coverage(tok, texts, vocab.plan(tok, counts, 0.0, model))})
    del m1
    t1 = time.time()
    stats = cal_mod.calibrate(model, data_mod.blocks(d.calibrate, a.block), 4, linears=False, gram=True)
    cal_s = time.time() - t1
    pcfg = config_mod.PruneConfig(rule="ratio", ratio=a.ratio, criterion="wanda", compensation="lstsq",
                                  allocation="per_layer", round_to=8)
    plan = prune.select_and_compensate(model, stats, pcfg)  # compensation refits down_proj in place
    prune.apply_structural(model, plan)
    model, tok2, _ = vocab.prune_vocabulary(model, tok, counts, 0.0)
    measure("vocab_mlp30", model, tok2, {"calibration_tokens": stats.n_tokens, "calibration_s": round(cal_s, 1),
                                         "widths": plan.widths_after})
    ft_ids = data_mod.tokenize(tok2, d.finetune_texts)
    blocks = data_mod.blocks(ft_ids, a.ft_block)
    fcfg = config_mod.FinetuneConfig(enabled=True, lr=a.lr, batch_size=a.ft_batch, block_size=a.ft_block,
                                     max_steps=a.steps, warmup_steps=2)
    ft = finetune.Finetuner(model, blocks, fcfg, seed=0, total_steps=a.steps)
    t1, losses = time.time(), []
    for _ in range(a.steps):
        losses.append(round(ft.train_step()["loss"], 4))
    ft_s = time.time() - t1
    model = ft.finished_model()
    measure("recovered", model, tok2, {"steps": a.steps, "train_tokens": a.steps * a.ft_batch * a.ft_block,
                                       "train_s": round(ft_s, 1), "losses": losses})
    out["seconds"] = round(time.time() - t0, 1)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    _save(a, out)
    print(json.dumps(out, indent=1, default=str))


def _save(a, out):
    if a.json:
        from engine import atomic

        atomic.write_json(a.json, out)


if __name__ == "__main__":
    main()
