"""`minigpt sweep`: criteria × allocation × compensation × ratio on one model, without fine-tuning.

The base model is loaded once and copied per cell; each calibration corpus is calibrated
once (with the Gram matrices if any cell needs them) and shared by all its cells, and
sensitivity measurements are shared by the cells that differ only in ratio. Each
cell's structurally pruned model is scored on the held-out split of every evaluation
corpus (perplexity, and MCQ accuracy when `evaluate.mcq_generate`/`mcq_files` ask for
it). The table is rewritten (CSV and Markdown, atomically) after every cell, so an
interrupted sweep keeps what it measured.

A sweep is one process running one cell at a time (the point is one model load and shared
calibrations), so it has no `--max-parallel`; `minigpt grid --max-parallel N` runs cells as
separate runner processes.
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

    from engine.prune import compensate

    grid.check()
    out_dir = Path(out_dir)
    for what, folder in (("--out", out_dir), ("--stats", stats_dir)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise MinigptError(f"sweep {what} {folder} is a file, not a folder", f"give a folder for {what}")
    todo = cells(grid, grid.calibrate_on or [cfg.data.source])
    torch.manual_seed(cfg.seed)
    sw = _Sweep(cfg, grid.evaluate_on or [cfg.data.source], progress or (lambda e: None), log, stats_dir)
    t0 = time.perf_counter()
    baseline = sw.measure(sw.base, "base")
    meta = sw.meta(baseline)
    sw.gram = any(compensate.needs_gram(sw.prune_cfg(c)) for c in todo)
    rows = []
    for i, c in enumerate(todo):
        stats, blocks = sw.calibrated(c["calibrate_on"], meta)
        rows.append(sw.cell(i, len(todo), c, stats, blocks, baseline))
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        write(rows, meta, out_dir)
    sw.say({"kind": "cell", "index": len(todo), "total": len(todo), "cell": "done"})
    return rows


class _Sweep:
    """One sweep's shared state: the base model, corpora, MCQ sets, calibrations and
    sensitivity measurements, each made once and reused by every cell that needs it."""

    def __init__(self, cfg: RunConfig, eval_sources: list[str], say, log, stats_dir):
        from engine.models import adapters
        from engine.models import load as models

        self.cfg, self.eval_sources, self.say, self.log, self.stats_dir = cfg, eval_sources, say, log, stats_dir
        log(f"loading model {cfg.model.source}")
        self.base, self.tok, _ = models.load(cfg.model)
        self.bs = min(cfg.calibrate.block_size, adapters.model_context(self.base))
        self.widths = sum(adapters.for_model(self.base).widths())
        self.corpora: dict[str, object] = {}
        self.stats: dict[str, tuple] = {}
        self.sens: dict[tuple, object] = {}
        self.gram = False
        self.mcq_sets = {}
        e = cfg.evaluate
        if e.mcq_generate or e.mcq_files:
            from engine.evaluate import mcq

            self.mcq_sets = {src: mcq.sets_for(e, self.corpus(src).eval_texts, cfg.seed, src, log=None)
                             for src in eval_sources}

    def corpus(self, src: str):
        if src not in self.corpora:
            self.log(f"loading corpus {src}")
            self.corpora[src] = stages.load_domain(self.cfg, dataclasses.replace(self.cfg.data, source=src),
                                                   self.tok, self.bs)
        return self.corpora[src]

    def meta(self, baseline: dict) -> dict:
        cfg = self.cfg
        return {"model": cfg.model.source, "calibrate_tokens": {}, "block_size": self.bs,
                "evaluate": {src: int(self.corpus(src).evaluate.numel()) for src in self.eval_sources},
                "base": baseline, "base_params": size.count_params(self.base), "round_to": cfg.prune.round_to,
                "min_keep": cfg.prune.min_keep, "damping": cfg.prune.damping, "seed": cfg.seed,
                "mcq": {src: sum(len(s.items) for s in sets) for src, sets in self.mcq_sets.items()}}

    def prune_cfg(self, c: dict):
        return dataclasses.replace(self.cfg.prune, mode="structural", rule="ratio", ratio=c["ratio"],
                                   criterion=c["criterion"], allocation=c["allocation"],
                                   compensation=c["compensation"], sequential=c["sequential"])

    def measure(self, model, tag: str) -> dict:
        from engine.evaluate import mcq, perplexity

        e, res = self.cfg.evaluate, {}
        for src in self.eval_sources:
            self.say({"kind": "phase", "phase": f"{tag}: perplexity on {src}"})
            res[f"ppl[{src}]"] = perplexity.perplexity(model, self.corpus(src).evaluate, e.block_size, e.stride,
                                                       e.batch_size)["ppl"]
            if self.mcq_sets.get(src):
                self.say({"kind": "phase", "phase": f"{tag}: MCQ on {src}"})
                n = correct = 0
                for s in self.mcq_sets[src]:
                    r = mcq.score(model, self.tok, s, rules=("acc",), batch_size=e.batch_size, seed=self.cfg.seed)
                    n, correct = n + r["n"], correct + r["acc"] * r["n"]
                res[f"mcq_acc[{src}]"] = correct / n if n else float("nan")
        return res

    def calibrated(self, src: str, meta: dict) -> tuple:
        """(statistics, blocks) of calibration corpus `src`, from the shared cache or measured once."""
        from engine.data.domain import blocks as pack

        if src not in self.stats:
            blocks = pack(self.corpus(src).calibrate, self.bs)
            if blocks.shape[0] == 0:
                raise MinigptError(f"corpus {src} has fewer calibration tokens than one block of {self.bs}",
                                   "use a larger corpus or a smaller calibrate.block_size")
            self.say({"kind": "phase", "phase": f"calibrating on {src} ({blocks.numel():,} tokens)"})
            stats, _, _ = stages.calibration(
                self.base, blocks, self.cfg, dataclasses.replace(self.cfg.data, source=src), linears=False,
                gram=self.gram, log=self.log, root=self.stats_dir,
                progress=lambda d, t, r=0.0: self.say({"kind": "phase", "phase": f"calibrating on {src}",
                                                       "done": d, "total": t}))
            self.stats[src] = (stats, blocks)
            meta["calibrate_tokens"][src] = int(blocks.numel())
        return self.stats[src]

    def sensitivities(self, model, stats, blocks, pcfg, src: str, tag: str):
        from engine.prune import sensitivity

        if pcfg.allocation != "sensitivity":
            return None
        key = (src, pcfg.criterion, pcfg.compensation)
        if key not in self.sens:
            n = max(1, -(-pcfg.sensitivity_tokens // self.bs))
            self.say({"kind": "phase", "phase": f"{tag}: layer sensitivities"})
            self.sens[key] = sensitivity.measure(model, stats, blocks[:n], pcfg.criterion, pcfg.compensation,
                                                 pcfg.damping, pcfg.sensitivity_probe,
                                                 self.cfg.calibrate.batch_size, self.cfg.seed)
        return self.sens[key]

    def cell(self, i: int, n: int, c: dict, stats, blocks, baseline: dict) -> dict:
        from engine.prune import mlp as prune

        pcfg, src = self.prune_cfg(c), c["calibrate_on"]
        tag = (f"{c['criterion']}/{c['allocation']}/{c['compensation']}{'/seq' if c['sequential'] else ''}"
               f" {c['ratio']:.0%} (calib {src})")
        self.say({"kind": "cell", "index": i, "total": n, "cell": tag})
        t = time.perf_counter()
        model = copy.deepcopy(self.base)
        sens = self.sensitivities(model, stats, blocks, pcfg, src, tag)
        self.say({"kind": "phase", "phase": f"{tag}: pruning"})
        plan = prune.select_and_compensate(model, stats, pcfg, blocks, self.cfg.calibrate.batch_size, self.cfg.seed,
                                           sensitivities=sens)
        prune.apply_structural(model, plan)
        row = {**c, "removed_pct": round(100.0 * (1 - sum(plan.widths_after) / self.widths), 2),
               "params": size.count_params(model),
               "min_width": min(plan.widths_after), "max_width": max(plan.widths_after)}
        for k, v in self.measure(model, tag).items():
            row[k] = v
            if k.startswith("ppl["):
                row["x_base" + k[3:]] = v / baseline[k]
        row["seconds"] = round(time.perf_counter() - t, 1)
        self.log(f"{tag}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in row.items()
                                        if k.startswith(("ppl", "x_base", "mcq"))))
        return row


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
