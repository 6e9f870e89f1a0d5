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
"""

from __future__ import annotations

import copy
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
import signal
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import atomic
from . import config as config_mod
from . import presets
from . import session as session_mod
from .errors import MinigptError

GRID_FILE = "grid.json"
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
LOCK_FILE = "grid.lock"
LOG_FILE = "grid.log"
SESSIONS = "sessions"
METHODS = ("mask", "structural")
_SPEC_KEYS = {"name", "folder", "models", "domains", "methods", "thresholds", "run"}
_SHARED_STAGES = ("baseline", "calibrate")


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


# ---- running ---------------------------------------------------------------------------------
class GridLock:
    """One runner per grid folder (the kernel drops the lock when it dies)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._f = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise MinigptError(f"grid {self.path.parent} is already being run by another process",
                               f"wait for it, or follow it in {self.path.parent / LOG_FILE}") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()


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


def _donor(cell: Cell, sessions: dict, cells: list[Cell]) -> session_mod.Session | None:
    from .calibrate import STATS_FILE

    for other in cells:
        s = sessions.get(other.key)
        if other is cell or s is None or other.group != cell.group:
            continue
        try:
            done = s.state().get("completed_stages", [])
        except MinigptError:
            continue
        if "calibrate" in done and (s.stats_dir / STATS_FILE).exists() and \
                ("baseline" in done or not cell.cfg.evaluate.evaluate_base):
            return s
    return None


def seed_from(donor: session_mod.Session, s: session_mod.Session) -> None:
    """Give a fresh session the donor's calibration statistics and baseline results."""
    s.stats_dir.mkdir(parents=True, exist_ok=True)
    for f in donor.stats_dir.iterdir():
        if not f.is_file() or f.name.startswith(".") or f.name == "partial.pt":
            continue
        dest = s.stats_dir / f.name
        if dest.exists():
            dest.unlink()
        try:
            os.link(f, dest)  # stats files are replaced, never edited in place: a link is safe
        except OSError:
            atomic.write_bytes(dest, f.read_bytes())
    dres, res = donor.results(), s.results()
    if "calibration" in dres:
        res["calibration"] = {**dres["calibration"], "reused_from": donor.id}
    base = dres.get("models", {}).get("base")
    if base:
        res.setdefault("models", {})["base"] = base
    s.write_results(res)
    done = [st for st in _SHARED_STAGES if st in donor.state().get("completed_stages", [])]
    w = s.writer()
    try:
        w.emit("log", level="info", message=f"baseline and calibration reused from session {donor.id} "
                                             "(same model, corpus, calibration and evaluation settings)")
        for e in donor.events():
            if e.get("type") == "metric" and e.get("stage") in _SHARED_STAGES:
                w.emit("metric", **{k: v for k, v in e.items() if k not in ("t", "type")}, reused_from=donor.id)
    finally:
        w.close()
    s.update_state(completed_stages=done, reused_from=donor.id)


class _Stopper:
    """SIGINT/SIGTERM stop the grid: the running cell checkpoints and stops, no new cell starts."""

    def __init__(self):
        self.stopped = False
        self.current: Path | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on)
        if hasattr(signal, "SIGHUP"):
            self._old[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return self

    def _on(self, signum, frame):
        from .reporter import STOP_FILE

        self.stopped = True
        if self.current is not None:
            try:
                (self.current / STOP_FILE).write_text("stop\n")
            except OSError:
                pass

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def prefetch(spec: GridSpec, display: Callable | None = None, only: list[Cell] | None = None) -> None:
    """Download what the cells need (hub models, question sets, URL corpora) before the first cell
    runs, and pin the question sets to their local copies, so a network failure shows at once."""
    from . import download

    def prog(label):
        if display is None:
            return None
        return lambda done, total, rate=0.0: display({"type": "progress", "stage": f"download {label}",
                                                     "done": done, "total": total, "unit": "bytes", "rate": rate})

    fetched: dict[str, Path] = {}
    for src in dict.fromkeys(c.cfg.model.source for c in only or spec.cells):
        if download.is_hub_id(src):
            download.model_snapshot(src, prog(src))
    for c in only or spec.cells:
        files = []
        for ref in c.cfg.evaluate.mcq_files:
            if download.is_url(ref):
                if ref not in fetched:
                    fetched[ref] = download.fetch(ref, "evaluate.mcq_files", prog(Path(ref).name))
                files.append(str(fetched[ref]))
            else:
                files.append(ref)
        c.cfg.evaluate.mcq_files = files
        src = c.cfg.data.source
        if download.is_url(src) and src not in fetched:
            fetched[src] = download.fetch(src, "data.source", prog(Path(src).name))
        elif c.cfg.data.files and download.is_hub_id(src) and src not in fetched:
            fetched[src] = download.hub_snapshot(src, "dataset", c.cfg.data.files, "data.source", prog(src))


def run_grid(spec: GridSpec, display_factory: Callable | None = None, echo: Callable = print,
             retry_failed: bool = True, cells: list[Cell] | None = None) -> dict:
    """Run every cell not done yet; returns {"status": .., "done": n, "failed": n, ...}."""
    from . import pipeline

    spec.folder.mkdir(parents=True, exist_ok=True)
    todo = cells or spec.cells
    with GridLock(spec.folder), _Stopper() as stopper:
        index = _read_index(spec.folder)
        known = {c["key"]: c for c in index.get("cells", []) if isinstance(c, dict) and "key" in c}
        disp = display_factory() if display_factory else None
        try:
            prefetch(spec, disp, todo)
        finally:
            if disp is not None and hasattr(disp, "close"):
                disp.close()
        sessions = {c.key: _cell_session(spec, c, known) for c in spec.cells}
        write_outputs(spec, sessions)
        for i, cell in enumerate(todo, 1):
            if stopper.stopped:
                break
            s = sessions[cell.key]
            status = s.status()
            head = f"[{i}/{len(todo)}] {cell.model} · {cell.domain} · {cell.setting} · {cell.method} ({s.id})"
            if status == "done":
                continue
            if status == "running":
                echo(f"{head}: already running in another process; skipped")
                continue
            if status == "failed" and not retry_failed:
                echo(f"{head}: failed before ({s.state().get('error')}); skipped (--no-retry-failed)")
                continue
            how = "resuming" if s.state().get("completed_stages") else "starting"
            if how == "starting":
                donor = _donor(cell, sessions, spec.cells)
                if donor is not None:
                    seed_from(donor, s)
                    how = f"starting (baseline and calibration reused from {donor.id})"
            echo(f"{head}: {how}")
            stopper.current = s.path
            disp = display_factory() if display_factory else None
            try:
                pipeline.run(s, display=disp, handle_signals=False)
            except MinigptError as e:
                echo(f"{head}: failed: {e.line()}")
            except Exception as e:  # a bug or OOM in one cell must not lose the others
                echo(f"{head}: failed: {type(e).__name__}: {e}")
            finally:
                stopper.current = None
                if disp is not None and hasattr(disp, "close"):
                    disp.close()
            write_outputs(spec, sessions)
            if s.status() == "stopped":
                stopper.stopped = True
        rows = write_outputs(spec, sessions)
    statuses = [r["status"] for r in rows]
    overall = ("stopped" if stopper.stopped else "done" if all(x == "done" for x in statuses)
               else "failed" if any(x == "failed" for x in statuses) else "partial")
    return {"status": overall, "cells": len(rows), "done": statuses.count("done"),
            "failed": statuses.count("failed"), "folder": str(spec.folder)}


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


def launch_detached(spec_path: Path, folder: Path, overrides: list[str]) -> int:
    """Run the grid in its own process session (survives the terminal); log in the grid folder."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "engine.grid", str(Path(spec_path).resolve()), "--folder", str(folder.resolve())]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(folder / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                close_fds=True, env=env)
    return proc.pid


# ---- results ---------------------------------------------------------------------------------
_MCQ_PREF = ("acc_paper", "acc_norm", "acc")


def _mcq_metrics(entry: dict) -> dict:
    return {k: v for k, v in entry.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and ("mcq" in k or k.startswith("acc"))
            and "stderr" not in k}


def _primary_mcq(names) -> str | None:
    names = sorted(names)
    for pref in _MCQ_PREF:
        for n in names:
            if n.endswith(pref) or n == pref:
                return n
    return names[0] if names else None


def cell_row(meta: dict, session: session_mod.Session | None) -> dict:
    """One flat, torch-free row for a cell: its coordinates and its measured results."""
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
            row["status"], row["error"] = "corrupt", e.problem
        res = session.results()
    models = res.get("models", {})
    base, pruned = models.get("base", {}), models.get("pruned", {})
    final = models.get("finetuned") or pruned
    pr = res.get("prune", {})
    before, after = pr.get("params_before"), pr.get("params_after")
    row.update(params_before=before, params_after=after,
               relative_size=(after / before) if before and after is not None else None,
               neurons_before=pr.get("neurons_before"), neurons_after=pr.get("neurons_after"),
               vocab_pruned=bool(res.get("vocab")),
               ppl_base=base.get("ppl"), ppl_pruned=pruned.get("ppl"), ppl_finetuned=models.get("finetuned", {}).get("ppl"),
               calibration_tokens=res.get("calibration", {}).get("tokens"),
               calibration_reused_from=res.get("calibration", {}).get("reused_from"))
    ft = res.get("finetune")
    if ft:
        row.update(ft_steps=ft.get("steps"), ft_epochs=ft.get("epochs"), ft_stopped=ft.get("stopped_because"),
                   recovered=ft.get("stopped_because") == "target_ppl", ft_tokens_per_s=ft.get("tokens_per_s"))
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
               "params_before", "params_after", "relative_size", "neurons_before", "neurons_after", "vocab_pruned",
               "ppl_base", "ppl_pruned", "ppl_finetuned", "ft_steps", "ft_epochs", "ft_stopped", "recovered",
               "mcq_metric", "mcq_before", "mcq_after", "calibration_tokens", "calibration_reused_from", "error")


def to_csv(rows: list[dict]) -> str:
    extra = sorted({k for r in rows for k in r if k.startswith(("base_", "final_"))})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*CSV_COLUMNS, *extra])
    for r in rows:
        w.writerow(["" if r.get(k) is None else r.get(k) for k in (*CSV_COLUMNS, *extra)])
    return buf.getvalue()


# ---- python -m engine.grid (the detached runner) -----------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m engine.grid")
    ap.add_argument("spec")
    ap.add_argument("--folder", default=None)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec, args.set, Path(args.folder) if args.folder else None)
        out = run_grid(spec, echo=lambda m: print(m, flush=True))
    except MinigptError as e:
        print(f"error: {e.line()}", file=sys.stderr, flush=True)
        return 2
    print(f"grid {out['status']}: {out['done']}/{out['cells']} cells done, {out['failed']} failed; "
          f"table in {Path(out['folder']) / RESULTS_MD}", flush=True)
    return 0 if out["status"] in ("done", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
