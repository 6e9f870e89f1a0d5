"""`minigpt sweep`: criteria × allocation × compensation × ratio on one model, without fine-tuning.

The base model is loaded once and copied per cell; each calibration corpus is calibrated
once (with the Gram matrices if any cell needs them) and shared by all its cells, and
sensitivity measurements are shared by the cells that differ only in ratio. Each
cell's structurally pruned model is scored on the held-out split of every evaluation
corpus (perplexity, and MCQ accuracy when `evaluate.mcq_generate`/`mcq_files` ask for
it). The table is rewritten (CSV and Markdown, atomically) after every cell, so an
interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import atomic
from engine.config import ALLOCATIONS, COMPENSATIONS, CRITERIA, RunConfig
from engine.errors import MinigptError
from engine.models import size
from engine.run import stages


@dataclass
class Grid:
    criteria: list = field(default_factory=lambda: ["paper"])
    allocations: list = field(default_factory=lambda: ["per_layer"])
    compensations: list = field(default_factory=lambda: ["none"])
    ratios: list = field(default_factory=lambda: [0.1, 0.3, 0.5])
    sequential: list = field(default_factory=lambda: [False])
    calibrate_on: list = field(default_factory=list)  # data sources; [] = the config's
    evaluate_on: list = field(default_factory=list)  # data sources; [] = the config's

    def check(self) -> "Grid":
        for name, values, allowed in (("criteria", self.criteria, CRITERIA),
                                      ("allocations", self.allocations, ALLOCATIONS),
                                      ("compensations", self.compensations, COMPENSATIONS)):
            if not values:
                raise MinigptError(f"sweep {name} is empty", f"give at least one of: {', '.join(allowed)}")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise MinigptError(f"sweep {name}: {bad[0]!r} is not valid", f"use some of: {', '.join(allowed)}")
        if not self.ratios or any(not (0.0 < r < 1.0) for r in self.ratios):
            raise MinigptError(f"sweep ratios {self.ratios} must be fractions in (0, 1)", "e.g. --ratios 0.1,0.3,0.5")
        return self


def cells(grid: Grid, calib_sources: list[str]) -> list[dict]:
    return [dict(calibrate_on=c, criterion=cr, allocation=a, compensation=co, sequential=s, ratio=r)
            for c, cr, a, co, s, r in itertools.product(calib_sources, grid.criteria, grid.allocations,
                                                         grid.compensations, grid.sequential, grid.ratios)]


def run(cfg: RunConfig, grid: Grid, out_dir: str | Path, progress=None, log=print,
        stats_dir: str | Path | None = None) -> list[dict]:
    """Measure every cell; returns the rows (also written to out_dir/sweep.csv and sweep.md).

    Calibration statistics come from the calibration cache that runs and grids share
    (`stages.calibration`; `stats_dir` points it elsewhere), keyed by model and blocks.
    `progress(event: dict)` receives {"kind": "cell"|"phase", ...} updates for a display.
    """
    import torch

    from engine.data import domain as data_mod
    from engine.models import adapters
    from engine.prune import compensate
    from engine.evaluate import perplexity as evaluate
    from engine.models import load as models
    from engine.prune import mlp as prune
    from engine.prune import sensitivity

    grid.check()
    out_dir = Path(out_dir)
    for what, folder in (("--out", out_dir), ("--stats", stats_dir)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise MinigptError(f"sweep {what} {folder} is a file, not a folder", f"give a folder for {what}")
    say = progress or (lambda e: None)
    calib_sources = grid.calibrate_on or [cfg.data.source]
    eval_sources = grid.evaluate_on or [cfg.data.source]
    todo = cells(grid, calib_sources)
    torch.manual_seed(cfg.seed)
    log(f"loading model {cfg.model.source}")
    base, tok, _ = models.load(cfg.model)
    bs = min(cfg.calibrate.block_size, adapters.model_context(base))
    e = cfg.evaluate
    corpora: dict[str, object] = {}

    def corpus(src: str):
        if src not in corpora:
            log(f"loading corpus {src}")
            corpora[src] = stages.load_domain(cfg, dataclasses.replace(cfg.data, source=src), tok, bs)
        return corpora[src]

    mcq_sets = {}
    if e.mcq_generate or e.mcq_files:
        from engine.evaluate import mcq

        for src in eval_sources:
            sets = [mcq.load(f, e.mcq_columns) for f in e.mcq_files]
            if e.mcq_generate:
                sets.append(mcq.generate(corpus(src).eval_texts, e.mcq_generate, seed=cfg.seed,
                                         n_choices=e.mcq_choices, name=f"generated:{src}"))
            mcq_sets[src] = sets

    def measure(model, tag: str) -> dict:
        res = {}
        for src in eval_sources:
            say({"kind": "phase", "phase": f"{tag}: perplexity on {src}"})
            res[f"ppl[{src}]"] = evaluate.perplexity(model, corpus(src).evaluate, e.block_size, e.stride,
                                                     e.batch_size)["ppl"]
            if mcq_sets.get(src):
                from engine.evaluate import mcq

                say({"kind": "phase", "phase": f"{tag}: MCQ on {src}"})
                n = correct = 0
                for s in mcq_sets[src]:
                    r = mcq.score(model, tok, s, rules=("acc",), batch_size=e.batch_size, seed=cfg.seed)
                    n, correct = n + r["n"], correct + r["acc"] * r["n"]
                res[f"mcq_acc[{src}]"] = correct / n if n else float("nan")
        return res

    t0 = time.perf_counter()
    baseline = measure(base, "base")
    base_params = size.count_params(base)
    widths = sum(adapters.for_model(base).widths())
    meta = {"model": cfg.model.source, "calibrate_tokens": {}, "evaluate": {}, "block_size": bs,
            "base": baseline, "base_params": base_params, "round_to": cfg.prune.round_to,
            "min_keep": cfg.prune.min_keep, "damping": cfg.prune.damping, "seed": cfg.seed,
            "mcq": {src: sum(len(s.items) for s in sets) for src, sets in mcq_sets.items()}}
    for src in eval_sources:
        meta["evaluate"][src] = int(corpus(src).evaluate.numel())
    stats_by_source, blocks_by_source, sens_cache, rows = {}, {}, {}, []
    def prune_cfg(c: dict):
        return dataclasses.replace(cfg.prune, mode="structural", rule="ratio", ratio=c["ratio"],
                                   criterion=c["criterion"], allocation=c["allocation"],
                                   compensation=c["compensation"], sequential=c["sequential"])

    gram_wanted = any(compensate.needs_gram(prune_cfg(c)) for c in todo)
    for i, c in enumerate(todo):
        src = c["calibrate_on"]
        if src not in stats_by_source:
            blocks = data_mod.blocks(corpus(src).calibrate, bs)
            if blocks.shape[0] == 0:
                raise MinigptError(f"corpus {src} has fewer calibration tokens than one block of {bs}",
                                   "use a larger corpus or a smaller calibrate.block_size")
            say({"kind": "phase", "phase": f"calibrating on {src} ({blocks.numel():,} tokens)"})
            stats, _, _ = stages.calibration(
                base, blocks, cfg, dataclasses.replace(cfg.data, source=src), linears=False, gram=gram_wanted,
                progress=lambda d, t, r=0.0: say({"kind": "phase", "phase": f"calibrating on {src}",
                                                  "done": d, "total": t}), log=log, root=stats_dir)
            stats_by_source[src] = stats
            blocks_by_source[src] = blocks
            meta["calibrate_tokens"][src] = int(blocks.numel())
        stats, blocks = stats_by_source[src], blocks_by_source[src]
        pcfg = prune_cfg(c)
        tag = (f"{c['criterion']}/{c['allocation']}/{c['compensation']}{'/seq' if c['sequential'] else ''}"
               f" {c['ratio']:.0%} (calib {src})")
        say({"kind": "cell", "index": i, "total": len(todo), "cell": tag})
        t = time.perf_counter()
        model = copy.deepcopy(base)
        sens = None
        if pcfg.allocation == "sensitivity":
            key = (src, pcfg.criterion, pcfg.compensation)
            if key not in sens_cache:
                n = max(1, -(-pcfg.sensitivity_tokens // bs))
                say({"kind": "phase", "phase": f"{tag}: layer sensitivities"})
                sens_cache[key] = sensitivity.measure(model, stats, blocks[:n], pcfg.criterion, pcfg.compensation,
                                                      pcfg.damping, pcfg.sensitivity_probe,
                                                      cfg.calibrate.batch_size, cfg.seed)
            sens = sens_cache[key]
        say({"kind": "phase", "phase": f"{tag}: pruning"})
        plan = prune.select_and_compensate(model, stats, pcfg, blocks, cfg.calibrate.batch_size, cfg.seed,
                                           sensitivities=sens)
        prune.apply_structural(model, plan)
        row = {**c, "removed_pct": round(100.0 * (1 - sum(plan.widths_after) / widths), 2),
               "params": size.count_params(model),
               "min_width": min(plan.widths_after), "max_width": max(plan.widths_after)}
        for k, v in measure(model, tag).items():
            row[k] = v
            if k.startswith("ppl["):
                row["x_base" + k[3:]] = v / baseline[k]
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        del model
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        write(rows, meta, out_dir)
        log(f"{tag}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k.startswith(("ppl", "x_base", "mcq"))))
    say({"kind": "cell", "index": len(todo), "total": len(todo), "cell": "done"})
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def write(rows: list[dict], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    csv_path, md_path = out_dir / "sweep.csv", out_dir / "sweep.md"
    atomic.write_text(csv_path, buf.getvalue())
    atomic.write_text(md_path, markdown(rows, meta))
    return csv_path, md_path


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Pruning sweep: {meta['model']}", "",
             f"No fine-tuning. Structural removal of MLP neurons; widths rounded to a multiple of "
             f"{meta['round_to']} (at least {meta['min_keep']}); lstsq damping {meta['damping']:g}; seed {meta['seed']}.",
             "Calibration tokens: " + ", ".join(f"{s} {n:,}" for s, n in meta["calibrate_tokens"].items()) + ".",
             "Held-out tokens (perplexity in non-overlapping blocks of "
             f"{meta['block_size']}): " + ", ".join(f"{s} {n:,}" for s, n in meta["evaluate"].items()) + ".",
             "Base model: " + ", ".join(f"{k} {_fmt(v)}" for k, v in meta["base"].items())
             + f", {meta['base_params']:,} parameters.", ""]
    if not meta.get("mcq"):
        lines += ["MCQ accuracy: not measured (set evaluate.mcq_generate or evaluate.mcq_files).", ""]
    else:
        lines += ["MCQ: " + ", ".join(f"{s}: {n} questions" for s, n in meta["mcq"].items())
                  + " (acc, lm-eval rule).", ""]
    if meta.get("seconds") is not None:
        lines += [f"Sweep time: {meta['seconds']:.0f} s.", ""]
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "seconds")) + ["seconds"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k)) for k in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return _fmt(v)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
