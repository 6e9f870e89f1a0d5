"""Grids: models × domains × threshold settings × methods, one resumable session per cell.

`minigpt grid GRID.toml` is the paper's experiment (three models, five domains, 18
threshold settings) in one command, run with both the paper's mask method and our
structural removal. Each cell is an ordinary session under `<grid>/sessions/`, so the
app can monitor, compare and resume it like any other. Re-running the grid skips done
cells and resumes stopped or failed ones; cells that share model × corpus × calibration
settings share one calibration (the expensive part): the statistics are hard-linked
into the new session and its baseline and calibrate stages are marked complete.

A grid file:

    name = "paper"                    # folder name (default: the file's stem)
    models = ["phi-1.5", "opt-1.3b"]  # preset names (engine.presets) or model sources
    domains = ["skyrim", "economics", {name = "mine", source = "/data/law.jsonl"}]
    methods = ["mask", "structural"]
    thresholds = "paper"              # the 18-point grid, or [{linear = -1, activation = 0.1, embedding = -1}, ...],
                                      # or {linear = [...], activation = [...], embedding = [...]} (their product)
    [run.calibrate]                   # any run-config section: applied to every cell
    max_tokens = 81920

Outputs in the grid folder: `grid.json` (cells → session ids and results), `results.md`
and `results.csv` (the paper-style table: relative size; perplexity base / pruned /
fine-tuned; fine-tune steps to recover; MCQ accuracy before and after; methods side by
side). `load_grid(path)` returns the rows without torch, for the app's compare screen.

This module is the grid's data (spec, cells' sessions, results, tables) and stays torch-free
down its whole import graph, so the app may import it; running lives in `engine.run.gridrun`.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engine import atomic
from engine import config as config_mod
from engine import presets
from engine.run import record
from engine.run import session as session_mod
from engine.errors import MinigptError

GRID_FILE = "grid.json"
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
LOCK_FILE = "grid.lock"
LOG_FILE = "grid.log"
SESSIONS = "sessions"
METHODS = ("mask", "structural")
_SPEC_KEYS = {"name", "folder", "models", "domains", "methods", "thresholds", "run"}


def default_root() -> Path:
    return Path(os.environ.get("MINIGPT_GRIDS", "grids"))


# ---- the grid file -----------------------------------------------------------------------------
@dataclass
class Cell:
    index: int
    model: str  # label (preset name or source)
    domain: str  # label
    method: str
    linear: float
    activation: float
    embedding: float
    cfg: config_mod.RunConfig
    group: str = ""  # cells with one group share baseline + calibration
    digest: str = ""  # the full config's hash: a changed config is a new cell

    @property
    def key(self) -> str:
        return (f"{self.model}|{self.domain}|lin={_eps(self.linear)}|act={_eps(self.activation)}|"
                f"emb={_eps(self.embedding)}|{self.method}")

    @property
    def setting(self) -> str:
        return setting_label(self.linear, self.activation, self.embedding)


@dataclass
class GridSpec:
    name: str
    folder: Path
    cells: list = field(default_factory=list)
    source: str = ""


def _eps(v: float) -> str:
    return "off" if v < 0 else f"{v:g}"


def setting_label(linear: float, activation: float, embedding: float) -> str:
    return f"lin {_eps(linear)} · act {_eps(activation)} · emb {_eps(embedding)}"


def _as_list(value, key: str) -> list:
    if isinstance(value, (str, dict)):
        return [value]
    if not isinstance(value, list) or not value:
        raise MinigptError(f"grid key {key} must be a non-empty list", f'e.g. {key} = ["..."]')
    return value


def _thresholds(value) -> list[dict]:
    if value is None or value == "paper":
        return presets.paper_thresholds()
    if isinstance(value, dict):
        lists = {k: _as_list(value.get(k, [-1.0]), f"thresholds.{k}") for k in ("linear", "activation", "embedding")}
        extra = set(value) - set(lists)
        if extra:
            raise MinigptError(f"unknown key thresholds.{sorted(extra)[0]}", "use linear, activation, embedding")
        return [{"linear": l, "activation": a, "embedding": e}
                for l in lists["linear"] for a in lists["activation"] for e in lists["embedding"]]
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        out = []
        for t in value:
            extra = set(t) - {"linear", "activation", "embedding"}
            if extra:
                raise MinigptError(f"unknown threshold key {sorted(extra)[0]}", "use linear, activation, embedding")
            out.append({"linear": t.get("linear", -1.0), "activation": t.get("activation", -1.0),
                        "embedding": t.get("embedding", -1.0)})
        return out
    raise MinigptError(f"grid key thresholds = {value!r} is not valid",
                       'use "paper", a list of {linear, activation, embedding} tables, or a table of lists')


def _model_part(entry) -> tuple[str, dict]:
    if isinstance(entry, dict):
        label = entry.get("name") or entry.get("preset") or entry.get("source")
        return str(label), {k: v for k, v in entry.items() if k != "name"}
    if not isinstance(entry, str):
        raise MinigptError(f"grid model {entry!r} is not valid", "give a preset name, a model source or a table")
    return entry, ({"preset": entry} if presets.is_model(entry) else {"source": entry})


def _domain_part(entry) -> tuple[str, dict]:
    if isinstance(entry, dict):
        label = entry.get("name") or entry.get("preset") or entry.get("source")
        return str(label), {k: v for k, v in entry.items() if k != "name"}
    if not isinstance(entry, str):
        raise MinigptError(f"grid domain {entry!r} is not valid", "give a preset name, a data source or a table")
    if presets.is_domain(entry):
        return entry, {"preset": entry}
    for d in presets.DOMAINS:  # builtin:licenses and the like: label them by preset name
        if d.source == entry:
            return d.name, {"preset": d.name}
    return entry, {"source": entry}


def _float(v, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MinigptError(f"threshold {key} = {v!r} is not a number", "use a number; -1 turns it off")
    return float(v)


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None, folder: Path | None = None) -> GridSpec:
    """Read a grid file into cells, each with its validated run config."""
    path = Path(path)
    if not path.is_file():
        raise MinigptError(f"grid file {path} not found", "pass the path to a grid .toml (see configs/)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MinigptError(f"grid file {path} is not valid TOML ({e})", "fix the syntax at the position shown") from None
    return spec_from_dict(raw, overrides or [], folder, name=path.stem, source=str(path))


def spec_from_dict(raw: dict, overrides: list[str] | None = None, folder: Path | None = None,
                   name: str = "grid", source: str = "") -> GridSpec:
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise MinigptError(f"unknown grid key {unknown[0]}", f"grid keys: {', '.join(sorted(_SPEC_KEYS))}")
    name = str(raw.get("name") or name)
    folder = Path(folder or raw.get("folder") or default_root() / re.sub(r"[^A-Za-z0-9._-]+", "-", name))
    base = raw.get("run", {})
    if not isinstance(base, dict):
        raise MinigptError("grid key run must be a table", "write [run.calibrate] etc. with run-config keys")
    models = [_model_part(m) for m in _as_list(raw.get("models", [config_mod.EMBEDDED_DEFAULT]), "models")]
    domains = [_domain_part(d) for d in _as_list(raw.get("domains", ["builtin:licenses"]), "domains")]
    methods = _as_list(raw.get("methods", list(METHODS)), "methods")
    for m in methods:
        if m not in METHODS:
            raise MinigptError(f"grid method {m!r} is not valid", f"use {' and/or '.join(METHODS)}")
    settings = _thresholds(raw.get("thresholds"))
    cells: list[Cell] = []
    for mlabel, mpart in models:
        for dlabel, dpart in domains:
            for t in settings:
                lin, act, emb = (_float(t[k], k) for k in ("linear", "activation", "embedding"))
                for method in methods:
                    d = copy.deepcopy(base)
                    d["model"] = {**d.get("model", {}), **mpart}
                    d["data"] = {**d.get("data", {}), **dpart}
                    d["prune"] = {**d.get("prune", {}), "mode": method, "rule": "threshold",
                                  "linear_threshold": lin, "activation_threshold": act, "embedding_threshold": emb}
                    d["name"] = f"{name}: {mlabel} · {dlabel} · {setting_label(lin, act, emb)} · {method}"
                    cfg = config_mod.from_dict(d)
                    if overrides:
                        cfg = config_mod.apply_overrides(cfg, overrides)
                    cell = Cell(len(cells), mlabel, dlabel, method, lin, act, emb, cfg)
                    if all(c.key != cell.key for c in cells):  # a setting listed twice runs once
                        cells.append(cell)
    for c in cells:
        full = c.cfg.to_dict()
        full.pop("name", None)
        c.digest = _digest(full)
        c.group = _digest({k: full[k] for k in ("model", "data", "calibrate", "evaluate", "seed")}
                          | {"criterion": full["prune"]["criterion"]})
    return GridSpec(name, folder, cells, source)


# ---- sessions of cells -------------------------------------------------------------------
def _read_index(folder: Path) -> dict:
    try:
        data = json.loads((folder / GRID_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _cell_session(spec: GridSpec, cell: Cell, known: dict) -> session_mod.Session:
    """The cell's session: the recorded one if its config is unchanged, else a new one."""
    root = spec.folder / SESSIONS
    prev = known.get(cell.key)
    if prev and prev.get("digest") == cell.digest:
        p = root / prev["session"]
        if (p / session_mod.CONFIG_FILE).exists():
            return session_mod.Session(p)
    return session_mod.create(cell.cfg, root, name=f"{cell.index:03d}-{cell.method}")


def refresh(spec: GridSpec) -> list[dict]:
    """Rewrite grid.json and the tables from the sessions as they are now (runs nothing)."""
    known = {c["key"]: c for c in _read_index(spec.folder).get("cells", []) if isinstance(c, dict) and "key" in c}
    root = spec.folder / SESSIONS
    sessions = {}
    for c in spec.cells:
        prev = known.get(c.key)
        if prev and prev.get("digest") == c.digest and (root / prev["session"] / session_mod.CONFIG_FILE).exists():
            sessions[c.key] = session_mod.Session(root / prev["session"])
    spec.folder.mkdir(parents=True, exist_ok=True)
    return write_outputs(spec, sessions)



# ---- results ---------------------------------------------------------------------------------
# the MCQ accuracy the table shows, in order of preference (the paper's rule first)
_MCQ_PREF = ("mcq_acc_paper", "mcq_acc_norm", "mcq_acc")
assert set(_MCQ_PREF) <= set(record.MCQ_METRICS)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mcq_metrics(entry: dict) -> dict:
    return {k: entry[k] for k in record.MCQ_METRICS if _number(entry.get(k))}


def _primary_mcq(names) -> str | None:
    return next((n for n in _MCQ_PREF if n in names), min(names) if names else None)


def cell_row(meta: dict, session: session_mod.Session | None) -> dict:
    """One flat, torch-free row for a cell: its coordinates and its measured results, read from
    results.json as the run record lays it out (engine.run.record.RESULTS): every metric once,
    under models[model][name]; the prune, calibration and finetune sections for the rest."""
    row = {k: meta.get(k) for k in ("key", "model", "domain", "method", "linear", "activation", "embedding")}
    row["setting"] = setting_label(meta["linear"], meta["activation"], meta["embedding"])
    row.update(session=meta.get("session"), session_path=None, status="missing")
    res: dict = {}
    if session is not None and session.path.is_dir():
        row["session_path"] = str(session.path)
        try:
            row["status"] = session.status()
            row["error"] = session.state().get("error")
        except MinigptError as e:
            row["status"], row["error"] = record.CORRUPT, e.problem
        res = session.results()
    models = res.get("models") or {}
    base, pruned, finetuned = (models.get(m) or {} for m in ("base", "pruned", "finetuned"))  # record.MODELS
    final = finetuned or pruned
    pr = res.get("prune") or {}
    before, after = base.get("params"), pruned.get("params")  # stored (structural), nonzero (mask)
    row.update(params_before=before, params_after=after, params_finetuned=finetuned.get("params"),
               relative_size=(after / before) if before and after is not None else None,
               neurons_before=pr.get("neurons_before"), neurons_after=pr.get("neurons_after"),
               vocab_pruned=bool(res.get("vocab")),
               ppl_base=base.get("ppl"), ppl_pruned=pruned.get("ppl"), ppl_finetuned=finetuned.get("ppl"),
               calibration_tokens=base.get("calibration_tokens"),
               calibration_cached=(res.get("calibration") or {}).get("cached"))
    ft = res.get("finetune")
    if ft:
        row.update(ft_steps=ft.get("steps"), ft_epochs=ft.get("epochs"), ft_stopped=ft.get("stopped_because"),
                   recovered=ft.get("stopped_because") == "target_ppl", ft_tokens_per_s=finetuned.get("tokens_per_s"))
    else:
        row.update(ft_steps=None, ft_epochs=None, ft_stopped=None, recovered=None, ft_tokens_per_s=None)
    mb, ma = _mcq_metrics(base), _mcq_metrics(final)
    name = _primary_mcq(set(mb) & set(ma) or set(mb) or set(ma))
    row.update(mcq_metric=name, mcq_before=mb.get(name) if name else None, mcq_after=ma.get(name) if name else None)
    for k, v in mb.items():
        row[f"base_{k}"] = v
    for k, v in ma.items():
        row[f"final_{k}"] = v
    return row


def _rows(spec: GridSpec, sessions: dict) -> list[dict]:
    return [cell_row(_meta(c, sessions.get(c.key)), sessions.get(c.key)) for c in spec.cells]


def _meta(c: Cell, s) -> dict:
    return {"key": c.key, "index": c.index, "model": c.model, "domain": c.domain, "method": c.method,
            "linear": c.linear, "activation": c.activation, "embedding": c.embedding, "group": c.group,
            "digest": c.digest, "session": s.id if s is not None else None}


def write_outputs(spec: GridSpec, sessions: dict) -> list[dict]:
    rows = _rows(spec, sessions)
    cells = []
    for c, r in zip(spec.cells, rows):
        cells.append({**_meta(c, sessions.get(c.key)), "status": r["status"],
                      "results": {k: v for k, v in r.items() if k not in ("key", "model", "domain", "method",
                                                                          "linear", "activation", "embedding",
                                                                          "setting", "session", "session_path")}})
    atomic.write_json(spec.folder / GRID_FILE, {"name": spec.name, "spec": spec.source, "updated": time.time(),
                                                "sessions": SESSIONS, "methods": sorted({c.method for c in spec.cells}),
                                                "cells": cells})
    atomic.write_text(spec.folder / RESULTS_MD, to_markdown(rows, title=f"Grid {spec.name}"))
    atomic.write_text(spec.folder / RESULTS_CSV, to_csv(rows))
    return rows


def load_grid(path: str | os.PathLike) -> list[dict]:
    """A grid's rows (one per cell), read fresh from its sessions. Torch-free.

    `path`: the grid folder or its grid.json. Each row holds the cell's coordinates
    (model, domain, method, linear, activation, embedding, setting), `status`,
    `session_path` (open it like any session) and the measured results (relative_size,
    ppl_base / ppl_pruned / ppl_finetuned, ft_steps, ft_epochs, recovered, mcq_before /
    mcq_after, ...).
    """
    p = Path(path)
    folder = p.parent if p.name == GRID_FILE else p
    index = _read_index(folder)
    if not index:
        raise MinigptError(f"no grid in {folder} ({GRID_FILE} missing or unreadable)",
                           "pass a grid folder written by: minigpt grid GRID.toml")
    root = folder / index.get("sessions", SESSIONS)
    rows = []
    for meta in index.get("cells", []):
        if not isinstance(meta, dict) or "key" not in meta:
            continue
        sid = meta.get("session")
        s = session_mod.Session(root / sid) if sid and (root / sid / session_mod.CONFIG_FILE).exists() else None
        row = cell_row(meta, s)
        if s is None and meta.get("results"):  # sessions moved away: the recorded results still stand
            row.update(meta["results"], status=meta.get("status", "missing"))
        rows.append(row)
    return rows


def session_paths(path: str | os.PathLike) -> list[Path]:
    """The grid's existing session folders, in cell order (for CompareScreen(paths))."""
    return [Path(r["session_path"]) for r in load_grid(path) if r.get("session_path")]


# ---- the table ---------------------------------------------------------------------------------
def _f(v, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return fmt.format(v)


def _ft(r: dict) -> str:
    if r.get("ft_steps") is None:
        return "–"
    ep = r.get("ft_epochs")
    s = f"{r['ft_steps']}" + (f" ({ep:.2g} ep)" if isinstance(ep, (int, float)) else "")
    return s + ("" if r.get("recovered") else " ✗")


def _mcq(r: dict) -> str:
    if r.get("mcq_before") is None and r.get("mcq_after") is None:
        return "–"
    return f"{_f(r.get('mcq_before'), '{:.0%}')} → {_f(r.get('mcq_after'), '{:.0%}')}"


def to_markdown(rows: list[dict], title: str = "") -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["model"], r["domain"], r["linear"], r["activation"], r["embedding"]), {})[r["method"]] = r
    head = ["model", "domain", "lin ε", "act ε", "emb ε", "base ppl"]
    for m in methods:
        head += [f"{m}: size", f"{m}: ppl pruned", f"{m}: ppl FT", f"{m}: FT steps", f"{m}: MCQ"]
    lines = []
    if title:
        lines += [f"# {title}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for (model, domain, lin, act, emb), by in groups.items():
        any_row = next(iter(by.values()))
        base = next((r["ppl_base"] for r in by.values() if r.get("ppl_base") is not None), None)
        cells = [model, domain, _eps(lin), _eps(act), _eps(emb), _f(base)]
        for m in methods:
            r = by.get(m)
            if r is None or r["status"] != "done":
                st = "not run" if r is None else r["status"]
                cells += [st, "", "", "", ""]
                continue
            size = _f(r.get("relative_size"), "{:.2%}") + (" †" if r.get("vocab_pruned") else "")
            cells += [size, _f(r.get("ppl_pruned")), _f(r.get("ppl_finetuned")), _ft(r), _mcq(r)]
        del any_row
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "size: parameters after / before (mask: nonzero parameters, as the paper counted; structural: "
                  "parameters stored). ppl: held-out perplexity (base, right after pruning, after fine-tuning). "
                  "FT steps: optimiser steps until held-out ppl ≤ base (✗: not reached within the step limit). "
                  "MCQ: accuracy of the base model → the final model. † vocabulary pruned: perplexity is over a "
                  "smaller vocabulary."]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- {r['model']} · {r['domain']} · {r['setting']} · {r['method']}: "
                                               f"{r.get('error')}" for r in failed]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("model", "domain", "method", "linear", "activation", "embedding", "status", "session",
               "params_before", "params_after", "params_finetuned", "relative_size", "neurons_before", "neurons_after",
               "vocab_pruned", "ppl_base", "ppl_pruned", "ppl_finetuned", "ft_steps", "ft_epochs", "ft_stopped",
               "recovered",
               "mcq_metric", "mcq_before", "mcq_after", "calibration_tokens", "calibration_cached", "error")


def to_csv(rows: list[dict]) -> str:
    extra = sorted({k for r in rows for k in r if k.startswith(("base_", "final_"))})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*CSV_COLUMNS, *extra])
    for r in rows:
        w.writerow(["" if r.get(k) is None else r.get(k) for k in (*CSV_COLUMNS, *extra)])
    return buf.getvalue()


