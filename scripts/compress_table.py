"""The compression table of issue #13: MLP-only pruning against a searched mix of axes, each
recovered by cross-entropy and by distillation at the same token budget, beside the unpruned
model and the unpruned model after the same recovery (the control).

For each budget (share of all parameters kept, embeddings counted) it runs, in this process,
one after the other (CPU-heavy: start it detached, e.g. `nohup ... &`):

* (c) MLP-only: wanda + lstsq + sequential, with the vocabulary cut to reach the budget
  (`target_params` with `search_axes = ["mlp", "vocab"]`, one candidate);
* (d) the searched mix: `target_params` over every axis, candidates ranked by a short
  distillation each.

Each is pruned once, evaluated before recovery, then copied: one copy recovers by CE, the
other by KD, for the same steps. The CE session of the first budget also runs the control
(`finetune.control`). Rows read back from each session's results.json; the table (Markdown)
and a CSV go to --out, named for the corpus, the teacher and the kept shares (e.g.
`licenses-t32-50.md`). Re-running reuses finished sessions (resume), so a stopped run continues.

With --teacher-steps N (Minitron's teacher correction) the unpruned model is first fine-tuned N
CE steps on the domain; calibration, pruning and distillation then start from that teacher, and
the table names it (sessions and files tagged `-tN`).

With --kd-ce-weight W a third copy of each pruned model recovers by KD with a cross-entropy term
(`finetune.kd_ce_weight` = W: loss = KL + W × CE), at the same steps (sessions `-kc`): the
teacher's distribution and the domain's next tokens together, beside either alone.

With --speedup X the searched mix keeps only candidates that cut the estimated multiply-accumulates
per token by X or more (`prune.search_speedup`, `engine.prune.budget.macs`): the mix for a speed
goal, at the quality it costs (its sessions tagged `-s{10X}`, its files `-sX`).

Usage: .venv/bin/python scripts/compress_table.py --root /tmp/compress --out docs/results/compress_smollm2
       [--budgets 0.5 0.7] [--corpus builtin:licenses] [--steps 48] [--only mlp] [--teacher-steps 32]
       [--only mix --speedup 2.0] [--kd-ce-weight 1.0] [--lr 6e-4] [--vocab-rows 12288]

With --lr X every recovery (CE, KD, KD + CE and the control) runs at learning rate X, while the
teacher correction stays at the table's 2e-4 (`finetune.teacher_lr`), so the rows start from the
same corrected teacher as the default table's (files tagged `-lrX`). With --vocab-rows N the
vocabulary is cut to N rows ranked by domain count plus the unpruned model's expected counts
(`vocab_rule = "heldout"`, `vocab_rows`), not to the ids the domain used, and the budget takes
the rest from the other axes (files tagged `-vN`). A root holds one setting: a session made with
other settings is refused, never read back as this table's.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


LR = 2e-4  # the table's recovery learning rate, and always its teacher correction's


def base_config(corpus: str, steps: int, name: str, model: str = "embedded:smollm2", teacher_steps: int = 0,
                lr: float = LR) -> dict:
    return {
        "name": name, "seed": 0,
        "model": {"source": model},
        "data": {"source": corpus},
        "calibrate": {"block_size": 512, "max_tokens": 16384, "batch_size": 4},
        "prune": {"mode": "structural", "criterion": "wanda", "compensation": "lstsq", "rule": "ratio",
                  "allocation": "per_layer"},
        "finetune": {"enabled": True, "lr": lr, "schedule": "cosine", "warmup_steps": 4, "batch_size": 4,
                     "block_size": 256, "max_steps": steps, "eval_every": steps,
                     "checkpoint_every": max(steps // 2, 1), "keep_checkpoints": 1, "target_ppl_ratio": 0.0,
                     "teacher_steps": teacher_steps, **({"teacher_lr": LR} if lr != LR else {})},
        "evaluate": {"block_size": 512, "max_tokens": 8192, "batch_size": 4, "mcq_generate": 100},
    }


def variants(budget: float, speedup: float = 0.0) -> dict[str, dict]:
    return {
        "mlp": {"target_params": budget, "search_axes": ["mlp", "vocab"], "search_candidates": 1,
                "sequential": True},
        "mix": {"target_params": budget, "search_axes": ["mlp", "heads", "hidden", "depth", "vocab"],
                "search_candidates": 4, "search_steps": 6, "search_speedup": speedup},
    }


COPY_SUFFIX = 3  # "-ce" / "-kd" / "-kc", after the name, inside the store's `session.NAME_MAX`
TAG_MAX = 10  # a longer corpus-and-teacher tag is hashed, so the longest name ("-mix-50-s20") still fits


def session_name(corpus_tag: str, teacher_steps: int, var: str, budget: float, speedup: float = 0.0) -> str:
    """`{corpus}[-tN]-{mlp|mix}-{kept %}`, and `-s{10 × floor}` for a mix searched under a speed
    floor. A corpus name that would push it past what the store keeps is replaced by a hash of
    it: cut names made the CE copy's folder differ from the name a re-run looks for, and could
    make the CE and KD copies collide. The rule reads the corpus and teacher alone, so every
    variant of one corpus and teacher shares the prefix the control is found by."""
    import hashlib

    from engine.run import session as session_mod

    name_max = session_mod.NAME_MAX - COPY_SUFFIX
    corpus = session_mod.slug(corpus_tag)
    teacher = f"-t{teacher_steps}" if teacher_steps else ""
    if len(corpus + teacher) > TAG_MAX:
        corpus = hashlib.sha1(corpus_tag.encode()).hexdigest()[:TAG_MAX - len(teacher)]
    name = f"{corpus}{teacher}-{var}-{int(round(100 * budget))}"
    name += f"-s{int(round(10 * speedup))}" if var == "mix" and speedup else ""
    if len(name) > name_max:
        print(f"error: session name {name} is longer than {name_max} characters — use fewer "
              "teacher steps or a speed floor with one decimal", file=sys.stderr)
        raise SystemExit(2)
    return name


def run_stages(session, stages, redo_from=None):
    from engine.run import pipeline

    return pipeline.run(session, stages=stages, redo_from=redo_from)


def ensure(root: Path, name: str, cfg_dict: dict):
    from engine import config as config_mod
    from engine.run import session as session_mod

    path = root / name
    if path.exists():
        return _reused(session_mod.open_session(path), cfg_dict)
    return session_mod.create(config_mod.from_dict(cfg_dict), root=root, name=name)


def _reused(session, cfg_dict: dict):
    """An existing session is resumed only when it was made with the settings asked for: another
    step count or learning rate in the same root used to be read back as this table's rows."""
    from engine import config as config_mod

    want, have = config_mod.from_dict(cfg_dict).to_dict(), session.config().to_dict()
    for d in (want, have):  # which session of a root runs the control depends on the order the tables ran
        d.get("finetune", {}).pop("control", None)
    for section in sorted(set(want) | set(have)):
        w, h = want.get(section), have.get(section)
        if w != h:
            key = next((f"{section}.{k}" for k in sorted(set(w or {}) | set(h or {}))
                        if (w or {}).get(k) != (h or {}).get(k)), section) if isinstance(w, dict) else section
            print(f"error: {session.path} was made with other settings ({key} differs) — give this table "
                  "another --root, or repeat the settings it was made with", file=sys.stderr)
            raise SystemExit(2)
    return session


def done(session, stage: str) -> bool:
    return stage in session.state().get("completed_stages", [])


def pruned_pair(root: Path, name: str, cfg_dict: dict, control: bool, kd_only: bool = False,
                kd_ce_weight: float = 0.0):
    """Prune once and evaluate the pruned model; then a CE copy and a KD copy, both recovered, and
    with `kd_ce_weight` > 0 a third, KD + that weight × CE. Returns (ce, kd, kc or None)."""
    from engine.run import session as session_mod

    ce = ensure(root, name + "-ce", {**cfg_dict, "finetune": {**cfg_dict["finetune"], "control": control}})
    if not done(ce, "evaluate"):
        run_stages(ce, ["baseline", "teacher", "calibrate", "prune", "evaluate"])
    kd = _copy(ce, root, name + "-kd", cfg_dict, {"loss": "kd"})
    kc = _copy(ce, root, name + "-kc", cfg_dict, {"loss": "kd", "kd_ce_weight": kd_ce_weight}) if kd_ce_weight else None
    for s in ((kd, kc) if kd_only else (ce, kd, kc)):
        if s is None:
            continue
        if not done(s, "finetune"):
            run_stages(s, ["finetune"])
            run_stages(s, ["evaluate"], redo_from="evaluate")
        if s is ce and control and "control" in session_mod.STAGES and not done(s, "control"):
            run_stages(s, ["control"])
    return ce, kd, kc


def _copy(ce, root: Path, name: str, cfg_dict: dict, finetune: dict):
    """A copy of the pruned CE session (before its recovery) that recovers with other `finetune` keys."""
    from engine import atomic
    from engine import config as config_mod
    from engine.run import session as session_mod

    path = root / name
    cfg = {**cfg_dict, "name": name, "finetune": {**cfg_dict["finetune"], **finetune}}
    if not path.exists():
        shutil.copytree(ce.path, path, ignore=shutil.ignore_patterns("checkpoints", "runner.lock", "*.tmp*"))
        atomic.write_text(path / session_mod.CONFIG_FILE, config_mod.from_dict(cfg).to_toml())
    return _reused(session_mod.open_session(path), cfg)


def _has_control(root: Path, name: str) -> bool:
    """Another session of this root, on the same corpus and teacher, already ran the control: it
    is not run twice (use one root per model and step budget)."""
    tag = re.sub(r"-(mlp|mix)-\d+(-s\d+)?$", "", name)  # the corpus (and teacher) part of the name
    same = re.compile(rf"{re.escape(tag)}-(mlp|mix)-\d+(-s\d+)?-ce")
    for res in root.glob("*/results.json"):
        if not same.fullmatch(res.parent.name) or res.parent.name == name + "-ce":
            continue
        if "control" in json.loads(res.read_text()).get("models", {}):
            return True
    return False


def figures(results: dict, label: str) -> dict:
    m = results.get("models", {}).get(label, {})
    return {"params": m.get("params"), "bpb": m.get("bpb"), "ppl": m.get("ppl"), "mcq": m.get("mcq_acc"),
            "mcq_se": _mcq_se(m)}


def _mcq_se(m: dict):
    for s in (m.get("mcq") or {}).values():
        return (s.get("stderr") or {}).get("acc")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="sessions folder for the runs")
    ap.add_argument("--out", type=Path, required=True, help="folder for the table (.md) and its CSV")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--corpus", default="builtin:licenses")
    ap.add_argument("--steps", type=int, default=48, help="recovery steps (x 4 x 256 tokens)")
    ap.add_argument("--only", choices=["mlp", "mix"], default=None, help="one variant only")
    ap.add_argument("--kd-only", action="store_true", help="recover by KD only (no CE copy, no control)")
    ap.add_argument("--model", default="embedded:smollm2", help="model source (a tiny folder for a smoke run)")
    ap.add_argument("--teacher-steps", type=int, default=0,
                    help="teacher correction: CE steps on the unpruned model before calibration (0 = off); "
                         "every row is then pruned from, and distilled from, the corrected teacher")
    ap.add_argument("--speedup", type=float, default=0.0,
                    help="the searched mix only: a speed floor (prune.search_speedup), the least estimated cut "
                         "in MACs per token a candidate must reach (0 = off)")
    ap.add_argument("--kd-ce-weight", type=float, default=0.0,
                    help="also recover each pruned model by KD + this weight x CE (a third copy, -kc; 0 = off)")
    ap.add_argument("--vocab-rows", type=int, default=0,
                    help="cut the vocabulary to this many rows, ranked by domain count plus the model's prior "
                         "(prune.vocab_rule = \"heldout\", vocab_rows), not to the ids the domain used "
                         "(0 = that default); use its own --root")
    ap.add_argument("--lr", type=float, default=LR,
                    help=f"recovery learning rate of every recovered row and the control (the teacher correction "
                         f"stays at {LR:g}); use its own --root")
    args = ap.parse_args()
    if args.vocab_rows < 0:
        print("error: --vocab-rows must be >= 0 — give a row count, e.g. 12288, or 0 for the ids the domain used",
              file=sys.stderr)
        raise SystemExit(2)
    if not args.lr > 0:
        print("error: --lr must be > 0 — give a learning rate, e.g. 2e-4", file=sys.stderr)
        raise SystemExit(2)
    if args.kd_ce_weight < 0:
        print("error: --kd-ce-weight must be >= 0 — give the CE term's weight, e.g. 1.0", file=sys.stderr)
        raise SystemExit(2)
    args.root.mkdir(parents=True, exist_ok=True)
    corpus_tag = re.sub(r"\.(jsonl|json|txt)$", "", Path(args.corpus.split(":")[-1]).name)  # a name, not a path
    # the output files' names: corpus, teacher and kept shares, so another budget's table does not replace this one
    tag = (corpus_tag + (f"-t{args.teacher_steps}" if args.teacher_steps else "")
           + "".join(f"-{int(round(100 * b))}" for b in args.budgets)
           + (f"-s{args.speedup:g}" if args.speedup else "") + (f"-kc{args.kd_ce_weight:g}" if args.kd_ce_weight else "")
           + (f"-lr{args.lr:g}" if args.lr != LR else "") + (f"-v{args.vocab_rows}" if args.vocab_rows else ""))
    for b in args.budgets:  # a name too long stops here, before any run
        for var in ("mlp", "mix"):
            session_name(corpus_tag, args.teacher_steps, var, b, args.speedup)
    rows = []
    t0 = time.time()
    for i, b in enumerate(args.budgets):
        for var, keys in variants(b, args.speedup).items():
            if args.only and var != args.only:
                continue
            cfg = base_config(args.corpus, args.steps, session_name(corpus_tag, args.teacher_steps, var, b, args.speedup),
                              args.model, args.teacher_steps, args.lr)
            cfg["prune"].update(keys)
            if args.vocab_rows:
                cfg["prune"].update(vocab_rule="heldout", vocab_rows=args.vocab_rows)
            # the first variant of the first budget runs the control, unless this root has it already
            first = var == (args.only or "mlp")
            control = i == 0 and first and not args.kd_only and not _has_control(args.root, cfg["name"])
            ce, kd, kc = pruned_pair(args.root, cfg["name"], cfg, control=control,
                                     kd_only=args.kd_only, kd_ce_weight=args.kd_ce_weight)
            rce, rkd = ce.results(), kd.results()
            if not rows:
                proto = rce.get("models", {}).get("base", {}).get("bpb_protocol") or {}
                corpus_sha256 = proto.get("corpus_sha256", "")  # which install's corpus the table is of
                overlap = (proto.get("finetune_overlap") or {}).get("share")  # how much of held-out CE trains on
                rows.append({"row": "(a) unpruned", "budget": 1.0, **figures(rce, "base")})
                if "teacher" in rce.get("models", {}):
                    rows.append({"row": f"(a') corrected teacher ({args.teacher_steps} CE steps)", "budget": 1.0,
                                 **figures(rce, "teacher")})
                if "control" in rce.get("models", {}):
                    who = "corrected teacher" if args.teacher_steps else "unpruned"
                    rows.append({"row": f"(b) {who} + same recovery (CE)", "budget": 1.0,
                                 **figures(rce, "control")})
            name = "(c) MLP-only + vocab" if var == "mlp" else (
                f"(d) searched mix, ≥ {args.speedup:g}x fewer MACs" if args.speedup else "(d) searched mix")
            chosen = (rce.get("search") or {}).get("chosen", {}).get("label", "")
            rows.append({"row": f"{name}, before recovery", "budget": b, "mix": chosen, **figures(rce, "pruned")})
            size = figures(rce, "pruned")["params"]
            if not args.kd_only:
                rows.append({"row": f"{name}, CE", "budget": b, "mix": chosen, **figures(rce, "finetuned"),
                             "params": size})
            rows.append({"row": f"{name}, KD", "budget": b, "mix": chosen, **figures(rkd, "finetuned"), "params": size})
            if kc is not None:
                rows.append({"row": f"{name}, KD + {args.kd_ce_weight:g} x CE", "budget": b, "mix": chosen,
                             **figures(kc.results(), "finetuned"), "params": size})
            write(args.out, tag, rows, args, time.time() - t0, corpus_sha256, overlap)
    print(json.dumps(rows, indent=1))


def write(out: Path, tag: str, rows: list[dict], args, seconds: float, corpus_sha256: str = "",
          overlap: float | None = None) -> None:
    from engine import atomic

    out.mkdir(parents=True, exist_ok=True)
    keys = ["row", "budget", "mix", "params", "bpb", "ppl", "mcq", "mcq_se"]
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic.write_text(out / f"{tag}.csv", buf.getvalue())
    base = rows[0]["params"] or 1
    lines = [f"Corpus `{args.corpus}`, SmolLM2-135M-Instruct fp32 on CPU; recovery {args.steps} steps x 4 x 256 "
             f"tokens ({args.steps * 1024:,} tokens, lr {args.lr:g}) for every recovered row; held-out bits per byte and ppl "
             f"(8,192 tokens), generated MCQ (100 questions, acc ± SE)"
             + (f"; every pruned row pruned from, and distilled from, a teacher first fine-tuned {args.teacher_steps}"
                f" CE steps at lr {LR:g} (the control: that teacher after the same recovery)" if args.teacher_steps else "")
             + (f"; the vocabulary cut to {args.vocab_rows:,} rows ranked by domain count and the model's prior"
                if args.vocab_rows else "")
             + (f"; corpus sha256 {corpus_sha256[:16]}" if corpus_sha256 else "")
             + (f"; {overlap:.0%} of the held-out 13-word windows occur in the fine-tune split"
                if overlap is not None else "")
             + f". {seconds / 60:.0f} min in all.", "",
             "| row | kept | mix | params | bpb | ppl | MCQ |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mcq = f"{r['mcq']:.2f} ± {r['mcq_se']:.2f}" if r.get("mcq") is not None and r.get("mcq_se") is not None \
            else (f"{r['mcq']:.2f}" if r.get("mcq") is not None else "")
        params = f"{r['params']:,} ({r['params'] / base:.1%})" if r.get("params") else ""
        lines.append(f"| {r['row']} | {r['budget']:.0%} | {r.get('mix', '')} | {params} | "
                     f"{_f(r.get('bpb'), 4)} | {_f(r.get('ppl'), 2)} | {mcq} |")
    atomic.write_text(out / f"{tag}.md", "\n".join(lines) + "\n")


def _f(v, n):
    return f"{v:.{n}f}" if isinstance(v, (int, float)) else ""


if __name__ == "__main__":
    main()
