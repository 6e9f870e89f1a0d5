"""Read-only views of the session store for the tables: session rows, compare rows, exports.

Torch-free and Textual-free: workers call these in threads and post the results; the
formatting helpers are pure so snapshots do not depend on the clock (pass `now`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from engine.run import record
from engine.run import session as session_mod
from engine.errors import MinigptError

TAIL_BYTES = 65536


# ---- formatting --------------------------------------------------------------
def fmt_ago(ts: float | None, now: float) -> str:
    """"12s ago" / "5m ago" / "3h ago" / "2d ago" relative to an injected `now`."""
    if not isinstance(ts, (int, float)):
        return "—"
    s = max(0, int(now - ts))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


def fmt_count(n: float | None) -> str:
    """1.71B / 135.0M / 12.3K / 950."""
    if n is None:
        return "—"
    a = abs(n)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if a >= div:
            return f"{n / div:.2f}{suffix}" if div == 1e9 else f"{n / div:.1f}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def fmt_rate(rate: float | None, unit: str, compact: bool = True) -> str:
    """A progress rate: `1.2K tok/s` (compact: the monitor's table) or `1,234 tokens/s` (the CLI).
    Under one per second it reads as seconds each, so a search at one candidate a minute does
    not show "0.02 it/s" (or "0 items/s")."""
    if not rate:
        return ""
    if rate < 1:
        return f"{1 / rate:,.0f} s per {unit[:-1] if unit.endswith('s') else unit}"
    if compact:
        short = {"tokens": "tok", "steps": "step", "items": "it", "bytes": "B"}.get(unit, unit)
        return f"{fmt_count(rate)} {short}/s"
    return f"{rate:,.0f} {unit}/s" if rate >= 10 else f"{rate:.1f} {unit}/s"


_COUNTED = {"parameters", "tokens", "rows", "tokens/s"}  # record units shown as 1.2K / 3.4M


def fmt_metric(name: str, v: float | None) -> str:
    """A metric's value in its record unit (engine.run.record.METRICS)."""
    if v is None:
        return "—"
    spec = record.METRICS.get(name)
    unit = spec.unit if spec else ""
    if unit in _COUNTED:
        return fmt_count(v)
    if unit == "fraction":
        return f"{v * 100:.1f}%"
    if unit == "s":
        return fmt_duration(v)
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def fmt_gpu(sample: dict, with_rank: bool = False) -> str:
    """One `gpu` event (engine.run.record KINDS["gpu"]): memory used of total, peak, utilisation."""
    used, total, peak = (_num(sample.get(k)) for k in ("mem_used_mb", "mem_total_mb", "mem_peak_mb"))
    frac = used / total if used is not None and total else None
    gb = (lambda mb: "?" if mb is None else f"{mb / 1024:.1f}")
    who = f"GPU {sample.get('device', '?')}" + (f" (rank {sample.get('rank', 0)})" if with_rank else "")
    text = f"{who} mem {gb(used)}/{gb(total)} GB {bar(frac, 10)}"
    if peak is not None:
        text += f" · peak {gb(peak)} GB"
    util = _num(sample.get("util_pct"))
    if util is not None:  # null without nvidia-ml-py
        text += f" · util {util:.0f}%"
    return text


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def bar(fraction: float | None, width: int = 12) -> str:
    """A text bar that stays readable in 16-colour and monochrome terminals."""
    if fraction is None:
        return "·" * width
    fraction = max(0.0, min(1.0, fraction))
    full = int(fraction * width + 1e-9)
    return "█" * full + "░" * (width - full)


def short_source(source: str) -> str:
    """"microsoft/phi-1_5" → "phi-1_5", "builtin:licenses" → "licenses"."""
    s = str(source or "?")
    for prefix in ("embedded:", "builtin:"):
        if s.startswith(prefix):
            return s[len(prefix):]
    return s.rstrip("/").rsplit("/", 1)[-1] or s


def short_method(row: dict) -> str:
    mode = {"structural": "struct", "mask": "mask"}.get(row.get("mode", ""), row.get("mode", "?"))
    method = str(row.get("method", "?")).replace("paper ", "").replace(" per_layer", "")
    return f"{mode} {method}"


# ---- session rows ---------------------------------------------------------------
def last_progress(events_path: Path, tail_bytes: int = TAIL_BYTES) -> dict | None:
    """The newest `progress`/`train` event, from the log's tail only (cheap on huge logs)."""
    try:
        with open(events_path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            chunk = f.read()
    except OSError:
        return None
    for line in reversed(chunk.split(b"\n")):
        if b'"progress"' not in line and b'"train"' not in line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("type") in ("progress", "train"):
            return ev
    return None


def progress_text(row: dict, tail: dict | None) -> str:
    completed = row.get("completed") or []
    status = row.get("status")
    if status == "done":
        return "100%"
    # an optional stage (teacher correction, the control) counts once the run has reached it
    optional = getattr(record, "OPTIONAL_STAGES", ())
    stages = [st for st in record.STAGES if st not in optional or st in completed or st == row.get("stage")]
    text = f"{len([c for c in completed if c in stages])}/{len(stages)}"
    prog = row.get("progress")
    frac = None
    if isinstance(prog, (int, float)) and not isinstance(prog, bool):
        frac = float(prog) if prog <= 1 else float(prog) / 100
    elif isinstance(prog, dict) and prog.get("total"):
        frac = float(prog.get("done", 0)) / float(prog["total"])
    elif tail and status in (*record.LIVE_STATUSES, record.DISCONNECTED, "stopped"):
        if tail.get("type") == "train" and tail.get("total_steps"):
            frac = float(tail.get("step", 0)) / float(tail["total_steps"])
        elif tail.get("total"):
            frac = float(tail.get("done", 0)) / float(tail["total"])
    if frac is not None:
        text += f" {min(1.0, max(0.0, frac)):.0%}"
    return text


def session_rows(root: Path) -> list[dict]:
    """Every session under `root`, newest first, as plain dicts (safe to build in a thread)."""
    rows = []
    for s in session_mod.list_sessions(root):
        try:
            row = session_mod.summary(s)
        except (OSError, MinigptError) as e:  # vanished or unreadable mid-listing
            row = {"id": s.id, "path": str(s.path), "model": "?", "domain": "?", "mode": "?",
                   "method": "?", "status": record.CORRUPT, "stage": None, "updated": None,
                   "completed": [], "error": str(e)}
        tail = last_progress(s.events_path) if row.get("status") != "done" else None
        row["progress_text"] = progress_text(row, tail)
        row["disk"] = session_disk(s)
        row["model_dir"] = str(s.model_dir.resolve()) if s.model_dir.is_dir() else None
        rows.append(row)
    rows.sort(key=lambda r: (-(r.get("updated") or 0), r["id"]))
    return rows


# ---- compare -------------------------------------------------------------------
# key, label, kind (for formatting and CSV)
COMPARE_COLUMNS: list[tuple[str, str, str]] = [
    ("id", "session", "str"),
    ("model", "model", "str"),
    ("domain", "domain", "str"),
    ("method", "method", "str"),
    ("recipe", "axes · loss", "str"),
    ("status", "state", "str"),
    ("params_base", "params base", "params"),
    ("params_pruned", "params pruned", "params"),
    ("params_finetuned", "params ft", "params"),
    ("pct_removed", "% removed", "pct"),
    ("ppl_base", "ppl base", "ppl"),
    ("ppl_pruned", "ppl pruned", "ppl"),
    ("ppl_finetuned", "ppl ft", "ppl"),
    ("mcq_base", "MCQ base", "acc"),
    ("mcq_pruned", "MCQ pruned", "acc"),
    ("mcq_finetuned", "MCQ ft", "acc"),
    ("mcq_ft_se", "MCQ ft ± SE (n)", "str"),
    ("ppl_control", "ppl control", "ppl"),
    ("bpb_pruned", "bpb pruned", "bpb"),
    ("bpb_finetuned", "bpb ft", "bpb"),
    ("heldout_overlap", "held-out ∩ ft", "pct"),
    ("tokens_per_s", "tok/s ft", "rate"),
    ("disk", "disk", "bytes"),
    ("model_bytes", "model size", "bytes"),
]


# the columns read from results.json's models[model][name]: column key -> (model, metric name)
COLUMN_METRICS: dict[str, tuple[str, str]] = {
    f"{prefix}_{model}": (model, name)
    for prefix, name in (("params", "params"), ("ppl", "ppl"), ("mcq", "mcq_acc")) for model in record.MODELS}


def results_metrics(results: dict) -> dict[tuple[str, str], float]:
    """results.json's metrics, {(model, name): value} as written (counts stay integers): the
    record keeps each one once, under models[model][name] (the value of its `metric` event)."""
    models = results.get("models") if isinstance(results, dict) else None
    out: dict[tuple[str, str], float] = {}
    for model in record.MODELS:
        entry = models.get(model) if isinstance(models, dict) else None
        for name, v in (entry.items() if isinstance(entry, dict) else ()):
            if name in record.METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[(model, name)] = v
    return out


def compare_row(s: session_mod.Session) -> dict:
    """One comparable row, from the session's state and its results.json: the metrics under
    `models` (params, ppl, MCQ accuracy per model) and the prune section's % removed. A session
    still inside its first stage has no results yet: its cells are empty."""
    row = session_mod.summary(s)
    results = s.results()
    metrics = results_metrics(results)
    prune = results.get("prune") if isinstance(results.get("prune"), dict) else {}
    out: dict[str, Any] = {
        "id": row["id"],
        "model": row.get("model", "?"),
        "domain": row.get("domain", "?"),
        "method": short_method(row),
        "status": row.get("status", "?"),
        "pct_removed": prune.get("pct_removed"),
    }
    for key, metric in COLUMN_METRICS.items():
        out[key] = metrics.get(metric)
    out["mcq_ft_se"] = mcq_with_error(results, "finetuned")
    out["bpb_pruned"] = metrics.get(("pruned", "bpb"), metrics.get(("pruned", "vocab_bpb")))
    out["bpb_finetuned"] = metrics.get(("finetuned", "bpb"))
    out["heldout_overlap"] = heldout_overlap(results)
    out["recipe"] = recipe(s)
    ft = results.get("finetune") if isinstance(results.get("finetune"), dict) else {}
    out["tokens_per_s"] = _num(ft.get("tokens_per_s"))
    disk = session_disk(s)
    out["disk"], out["model_bytes"] = disk["total"], (disk["model"] or None)
    return out


def heldout_overlap(results: dict) -> float | None:
    """The share (%) of the held-out text's 13-word windows found in the fine-tune split, from
    a bits-per-byte protocol (engine.data.overlap): high, and bpb after recovery rewards recall."""
    models = results.get("models") if isinstance(results.get("models"), dict) else {}
    for entry in models.values():
        proto = entry.get("bpb_protocol") if isinstance(entry, dict) else None
        found = proto.get("finetune_overlap") if isinstance(proto, dict) else None
        share = found.get("share") if isinstance(found, dict) else None
        if isinstance(share, (int, float)):
            return round(100 * share, 1)
    return None


def recipe(s: session_mod.Session) -> str | None:
    """The compression axes beyond the MLP and the recovery loss, from the session's config:
    `heads 25% · depth 2 · budget 50% · kd`; `mlp · ce` for a plain run."""
    try:
        cfg = s.config()
    except (OSError, MinigptError):
        return None
    p, ft = cfg.prune, cfg.finetune
    parts = []
    if getattr(p, "target_params", 0):
        t = p.target_params
        parts.append(f"budget {t:.0%}" if t < 1 else f"budget {fmt_count(t)}")
        parts.append("/".join(getattr(p, "search_axes", [])))
    else:
        parts.append("mlp")
        if getattr(p, "head_ratio", 0):
            parts.append(f"heads {p.head_ratio:.0%}{' per layer' if p.head_mode == 'per_layer' else ''}")
        if getattr(p, "hidden_ratio", 0):
            parts.append(f"hidden {p.hidden_ratio:.0%}")
        if getattr(p, "depth", 0):
            parts.append(f"depth {p.depth}")
    if ft.enabled:
        loss = getattr(ft, "loss", "ce")
        parts.append(loss + (f"+teacher {ft.teacher_steps}" if getattr(ft, "teacher_steps", 0) else "")
                     + (" +control" if getattr(ft, "control", False) else ""))
    return " · ".join(parts)


def mcq_with_error(results: dict, model: str) -> str | None:
    """MCQ accuracy as `value ± SE (n=…)` over all the model's sets (binomial standard error of
    the pooled accuracy), so +6 points on 16 questions reads as the noise it is."""
    entry = (results.get("models") or {}).get(model) if isinstance(results.get("models"), dict) else None
    sets = entry.get("mcq") if isinstance(entry, dict) else None
    if not isinstance(sets, dict) or not sets:
        return None
    n = sum(int(v.get("n", 0)) for v in sets.values() if isinstance(v, dict))
    if n <= 0:
        return None
    p = sum(float(v.get("acc", 0)) * int(v.get("n", 0)) for v in sets.values() if isinstance(v, dict)) / n
    se = math.sqrt(max(p * (1 - p), 0.0) / n)
    return f"{p:.1%} ± {se * 100:.1f} (n={n})"


def format_cell(kind: str, v: Any) -> str:
    if v is None:
        return "—"
    if kind == "params":
        return fmt_count(v)
    if kind == "pct":
        return f"{v:.1f}%"
    if kind == "ppl":
        return fmt_metric("ppl", v)
    if kind == "acc":
        return fmt_metric("mcq_acc", v)
    if kind == "bytes":
        return fmt_bytes(v)
    if kind == "bpb":
        return f"{v:.3f}"
    if kind == "rate":
        return f"{fmt_count(v)} tok/s"
    return str(v)


def sort_key(kind: str) -> Callable[[Any], Any]:
    if kind == "str":
        return lambda v: (v is None, str(v or "").lower())
    return lambda v: (v is None, v if v is not None else 0.0)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([k for k, _, _ in COMPARE_COLUMNS])
    for r in rows:
        w.writerow(["" if r.get(k) is None else r.get(k) for k, _, _ in COMPARE_COLUMNS])
    return buf.getvalue()


def to_markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(label for _, label, _ in COMPARE_COLUMNS) + " |"
    sep = "|" + "|".join("---" if kind == "str" else "---:" for _, _, kind in COMPARE_COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [format_cell(kind, r.get(k)).replace("|", "\\|") for k, _, kind in COMPARE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- disk ------------------------------------------------------------------------
def dir_size(path: Path) -> int:
    """Bytes under `path` (files only; links not followed; 0 if it does not exist)."""
    total = 0
    stack = [Path(path)]
    while stack:
        p = stack.pop()
        try:
            with os.scandir(p) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return total


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def session_disk(s: session_mod.Session) -> dict:
    """Disk use of a session: total, the final model folder, the fine-tuning checkpoints."""
    return {"total": dir_size(s.path), "model": dir_size(s.model_dir), "checkpoints": dir_size(s.checkpoints_dir)}


def snapshot(s: session_mod.Session) -> dict:
    """`minigpt status SESSION --json`: one JSON-able picture of a session for scripts."""
    from engine.run import death

    row = session_mod.summary(s)
    events = s.events()
    died = death.recorded(events) if row.get("status") == record.DISCONNECTED else None
    tail = next((e for e in reversed(events) if e.get("type") in ("progress", "train")), None)
    metrics = {f"{m}.{n}": v for (m, n), v in results_metrics(s.results()).items()}
    return {**row, "path": str(Path(row["path"]).resolve()), "model_dir": str(s.model_dir.resolve()),
            "model_exists": s.model_dir.is_dir(), "disk_bytes": session_disk(s),
            "last_progress": tail, "runner_died": died, "metrics": metrics, "events": len(events)}


def drop_checkpoints(s: session_mod.Session) -> int:
    """Remove a finished session's fine-tuning checkpoints, keeping the final model; returns
    the bytes freed. Refused while a runner holds the session, or before the run is done
    (a stopped run resumes from them)."""
    import shutil

    if s.runner_alive():
        raise MinigptError(f"session {s.id} is running", f"stop it first: minigpt stop {s.id}")
    if s.status() != "done" or not s.model_dir.is_dir():
        raise MinigptError(f"session {s.id} is {s.status()}: its checkpoints are what a resume continues from",
                           "clean up once the run is done (the final model is then in model/)")
    freed = dir_size(s.checkpoints_dir)
    if s.checkpoints_dir.exists():
        shutil.rmtree(s.checkpoints_dir)
    return freed


# ---- compare: curves on shared axes ------------------------------------------------------
# (terminal colour name, SVG colour, glyph): ANSI names render in every theme (the 16-colour
# one included); the glyph tells the runs apart in a plain capture or a monochrome terminal
RUN_STYLES: list[tuple[str, str, str]] = [
    ("cyan", "#1f9fb4", "●"), ("magenta", "#c2409e", "▲"), ("yellow", "#b8a000", "■"),
    ("green", "#2ca02c", "◆"), ("blue", "#1f5fd4", "✚"), ("bright_red", "#d62728", "✖"),
    ("bright_cyan", "#17becf", "○"), ("bright_magenta", "#9467bd", "△"),
]
BASE_STYLE = ("bright_black", "#7f7f7f", "─")  # the unpruned model's reference line


def stable_styles(ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """A style per run that depends on the run, not on the table's order: each id asks for the
    slot its name hashes to (crc32, the same in every process) and takes the next free one, in
    sorted-id order, so the same marked set always gets the same colours, whatever is sorted."""
    import zlib

    free = list(range(len(RUN_STYLES)))
    out: dict[str, tuple[str, str, str]] = {}
    for i in sorted(set(ids)):
        if not free:
            free = list(range(len(RUN_STYLES)))
        want = zlib.crc32(i.encode()) % len(RUN_STYLES)
        slot = next((s for s in free if s >= want), free[0])
        free.remove(slot)
        out[i] = RUN_STYLES[slot]
    return out


def session_curves(s: session_mod.Session) -> dict:
    """A session's fine-tuning curves from its event log, folded by the monitor's reducer (so a
    resume's retrained steps are dropped the same way): loss (and KL / CE where the train events
    carry them) by step, held-out perplexity by step (step 0: the pruned model) and the base
    model's perplexity, the baseline every curve is read against."""
    from .runview import RunView

    v = RunView(max_log=1)
    v.apply(s.events())
    def pairs(values):  # noqa: E306
        return [(st, x) for st, x in zip(v.loss_steps, values) if x is not None]
    return {"loss": pairs(v.losses), "kl": pairs(v.kls), "ce": pairs(v.ces),
            "ppl": [(st, p) for st, p in v.eval_ppl], "base_ppl": v.metric("base", "ppl"),
            "total_steps": v.stages["finetune"].total if "finetune" in v.stages else 0}


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out, x = [], start
    while x <= hi + step * 1e-9:
        out.append(round(x, 10))
        x += step
    return out


def _esc(text: str) -> str:
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"))


def curves_svg(curves: dict[str, dict], styles: dict[str, tuple[str, str, str]], title: str = "") -> str:
    """One SVG with two panels on shared axes: fine-tuning loss and held-out perplexity of every
    run (one colour per run, `styles`), the base models' perplexity as a dashed reference line,
    axes with ticks and a legend. Plain SVG 1.1: opens in any browser or editor."""
    W, H, pw, ph, left, top = 960, 420, 400, 280, 70, 50
    gap = 80
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>']
    if title:
        out.append(f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="15" font-weight="bold">'
                   f'{_esc(title)}</text>')
    bases = sorted({round(c["base_ppl"], 4) for c in curves.values() if isinstance(c.get("base_ppl"), (int, float))})
    panels = [("fine-tuning loss", "loss", []), ("held-out perplexity", "ppl", bases)]
    for k, (name, key, refs) in enumerate(panels):
        x0 = left + k * (pw + gap)
        series = {sid: c.get(key) or [] for sid, c in curves.items()}
        pts = [p for ser in series.values() for p in ser if math.isfinite(p[1])]
        ys = [y for _, y in pts] + list(refs)
        xmax = max([x for x, _ in pts] + [1])
        ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if yhi - ylo < 1e-9:
            ylo, yhi = ylo - 0.5, yhi + 0.5
        pad = (yhi - ylo) * 0.05
        ylo, yhi = ylo - pad, yhi + pad
        sx = lambda x: x0 + pw * x / xmax  # noqa: E731
        sy = lambda y: top + ph * (1 - (y - ylo) / (yhi - ylo))  # noqa: E731
        out.append(f'<text x="{x0 + pw / 2}" y="{top - 10}" text-anchor="middle" font-weight="bold">{_esc(name)}</text>')
        out.append(f'<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
        for t in _ticks(ylo, yhi):
            y = sy(t)
            out.append(f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
        for t in _ticks(0, xmax):
            x = sx(t)
            out.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#444"/>')
            out.append(f'<text x="{x:.1f}" y="{top + ph + 17}" text-anchor="middle">{t:g}</text>')
        out.append(f'<text x="{x0 + pw / 2}" y="{top + ph + 34}" text-anchor="middle">step</text>')
        for ref in refs:
            out.append(f'<line x1="{x0}" y1="{sy(ref):.1f}" x2="{x0 + pw}" y2="{sy(ref):.1f}" '
                       f'stroke="{BASE_STYLE[1]}" stroke-width="1.5" stroke-dasharray="6,4"/>')
            out.append(f'<text x="{x0 + pw - 4}" y="{sy(ref) - 4:.1f}" text-anchor="end" fill="{BASE_STYLE[1]}">'
                       f'base {ref:g}</text>')
        for sid, ser in series.items():
            good = [(x, y) for x, y in ser if math.isfinite(y)]
            if not good:
                continue
            colour = styles.get(sid, RUN_STYLES[0])[1]
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2">'
                       f'<title>{_esc(sid)}</title></polyline>')
            for x, y in good if len(good) <= 60 else good[-1:]:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>')
    # legend: the baseline first (pinned), then the runs in the table's order
    ly = top + ph + 52
    items = ([(f"base model ppl ({', '.join(f'{b:g}' for b in bases)})", BASE_STYLE[1], True)] if bases else [])
    items += [(sid, styles.get(sid, RUN_STYLES[0])[1], False) for sid in curves]
    x = left
    for label, colour, dashed in items:
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        out.append(f'<line x1="{x}" y1="{ly}" x2="{x + 24}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{x + 30}" y="{ly + 4}">{_esc(label)}</text>')
        x += 40 + 7 * len(label)
        if x > W - 150:
            x, ly = left, ly + 18
    out.append("</svg>")
    return "\n".join(out) + "\n"
