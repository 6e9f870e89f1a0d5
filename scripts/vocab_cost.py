"""What the vocabulary cut alone costs the model a session prunes, at several row budgets.

For a session past its calibrate stage: its unpruned model (the corrected teacher once that
stage is done, else the base model), its token counts and the held-out bytes its bits per byte
are measured on, so the figures sit beside the session's own rows. Each row is that model with
only its vocabulary cut:
* to the ids the domain used (ε_emb = 0, `vocab_rule = "seen"`, the default);
* to each --rows budget, ranked by domain count alone (unused ids then by id, i.e. BPE merge
  order), and by domain count plus --prior × the model's expected counts (`vocab_rule =
  "heldout"`'s ranking, as `vocab_rows` cuts it).
Each row gives rows kept, parameters removed, held-out coverage (tokens kept whole) and bits per
byte against the uncut model's. A cut's cost here is one that domain fine-tuning cannot undo: the
counted text uses only kept ids, so recovery never sees the held-out words they split.

Usage: .venv/bin/python scripts/vocab_cost.py SESSION --rows 8192 12288 16384 [--prior 0.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def unpruned(cfg, session):
    """(model, tokenizer, name): the corrected teacher once its stage is done, else the base model."""
    from engine.models import load as models
    from engine.run import teacher

    if teacher.ready(cfg, session):
        return (*teacher.load_corrected(cfg, session), "corrected teacher")
    model, tok, _ = models.load(cfg.model)
    return model, tok, "base model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("session", type=Path, help="a session folder past its calibrate stage")
    ap.add_argument("--rows", type=int, nargs="*", default=[], help="row budgets to cut the two rankings to")
    ap.add_argument("--prior", type=float, default=None, help="the prior's weight (default: the session's vocab_prior)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    from engine import atomic
    from engine.data.domain import blocks
    from engine.errors import MinigptError
    from engine.models.adapters import model_context
    from engine.prune import calibrate as cal_mod
    from engine.prune import vocab
    from engine.run import session as session_mod
    from engine.run import stages

    try:
        session = session_mod.open_session(args.session)
        if "calibrate" not in session.state().get("completed_stages", []):
            raise MinigptError(f"session {session.id} has no calibration statistics yet",
                               f"run its calibrate stage first: minigpt resume {session.id}")
        if any(r < 1 for r in args.rows):
            raise MinigptError(f"--rows {args.rows} holds a budget under 1", "give row counts, e.g. --rows 8192 12288")
    except MinigptError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        raise SystemExit(2)
    cfg = session.config()
    prior = cfg.prune.vocab_prior if args.prior is None else args.prior
    counts = cal_mod.Stats.load(session.stats_dir).token_counts
    model, tok, name = unpruned(cfg, session)
    block = max(1, min(cfg.calibrate.block_size, model_context(model)))  # the stage's calibration blocks
    d = stages.load_domain(cfg, cfg.data, tok, block)
    protocol = session.results().get("models", {}).get("base", {}).get("bpb_protocol") or {}
    texts = (stages.cut_bytes(d.eval_texts, int(protocol["bytes"])) if protocol.get("bytes")
             else vocab.held_out_texts(tok, d.eval_texts, cfg.evaluate.max_tokens))
    every = dataclasses.replace(cfg.evaluate, max_tokens=10**12)  # the texts are already cut
    t0 = time.time()
    expected = vocab.expected_counts(model, blocks(d.calibrate, block),
                                     cfg.calibrate.batch_size, counts.numel(), max_tokens=cfg.prune.vocab_prior_tokens)
    print(f"{name} of {session.id}: the model's expected counts over {cfg.prune.vocab_prior_tokens:,} calibration "
          f"tokens in {time.time() - t0:.0f} s; {sum(len(t.encode()) for t in texts):,} held-out bytes", flush=True)
    cuts = [("ids the domain used (ε_emb = 0)", None, None)]
    for rows in args.rows:
        cuts.append((f"{rows:,} rows, domain count then id", rows, vocab.ranking(tok, counts)))
        cuts.append((f"{rows:,} rows, domain count + {prior:g} × prior", rows, vocab.ranking(tok, counts, expected, prior)))
    out = []
    for label, rows, order in cuts:
        m, t, _ = unpruned(cfg, session)
        the_plan = None if rows is None else vocab.plan_of_size(t, counts, rows, m, order)
        _, _, info = vocab.prune_vocabulary(m, t, counts, 0.0, held_out=texts, eval_cfg=every, the_plan=the_plan)
        row = {"cut": label, "rows": info["rows_after"], "params_removed": info["params_saved"],
               "coverage": round(info["coverage"], 6), "bpb_uncut": round(info["bpb_before"], 6),
               "bpb": round(info["bpb_after"], 6)}
        out.append(row)
        print(f"| {label} | {row['rows']:,} | {row['params_removed']:,} | {row['coverage']:.2%} | "
              f"{row['bpb_uncut']:.4f} → {row['bpb']:.4f} ({row['bpb'] / row['bpb_uncut'] - 1:+.1%}) |", flush=True)
    if args.json:
        atomic.write_text(args.json, json.dumps({"session": str(session.path), "model": name, "prior": prior,
                                                 "rows": out}, indent=1))


if __name__ == "__main__":
    main()
