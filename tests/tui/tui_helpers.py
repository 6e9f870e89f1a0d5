"""Recorded event streams and session folders for the TUI tests.

Everything is built with fixed timestamps (T0) so snapshots never depend on the clock,
and sessions are created through the engine's own `session.create`, so the folders are
exactly what a real run leaves behind: every event written passes the run record's check
(`engine.run.record.event`), and results.json holds what the engine writes beside them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engine import atomic
from engine import config as config_mod
from engine.run import record
from engine.run import session as session_mod  # noqa: E402

T0 = 1767225600.0  # 2026-01-01 00:00:00 UTC
NOW = T0 + 3 * 3600  # the app's injected clock in every test
LAYERS = 6
NEURONS = 1536
HIDDEN = 576


def layer_rows(pcts: list[float]) -> list[dict]:
    rows = []
    for i, pct in enumerate(pcts):
        after = int(round(NEURONS * (1 - pct / 100)))
        pb, pa = 3 * HIDDEN * NEURONS, 3 * HIDDEN * after
        rows.append({"layer": i, "module": f"model.layers.{i}.mlp", "neurons_before": NEURONS,
                     "neurons_after": after, "params_before": pb, "params_after": pa,
                     "pct_removed": round(100 * (pb - pa) / pb, 2)})
    return rows


def layer_report_event(t: float, pcts: list[float], total_before: int = 134_515_008) -> dict:
    rows = layer_rows(pcts)
    removed = sum(r["params_before"] - r["params_after"] for r in rows)
    after = total_before - removed
    return {"t": t, "type": "layer_report", "mode": "structural", "rows": rows,
            "totals": {"params_before": total_before, "params_after": after,
                       "pct_removed": round(100 * removed / total_before, 2),
                       "neurons_before": NEURONS * len(rows),
                       "neurons_after": sum(r["neurons_after"] for r in rows)}}


def head_events(t0: float = T0) -> list[dict]:
    """A run that has finished baseline and is half-way through calibration."""
    t = t0
    ev = [
        {"t": t, "type": "run_start", "pid": 4242, "resumed": False,
         "stages": ["baseline", "calibrate", "prune", "finetune", "evaluate"]},
        {"t": t + 0.1, "type": "stage_start", "stage": "baseline"},
        {"t": t + 0.2, "type": "log", "level": "info", "message": "loading corpus builtin:licenses"},
    ]
    for i in range(1, 5):
        ev.append({"t": t + i, "type": "progress", "stage": "baseline", "done": i * 4096, "total": 16384,
                   "unit": "tokens", "rate": 4096.0, "eta_s": float(4 - i)})
    ev += [
        {"t": t + 5, "type": "metric", "stage": "baseline", "model": "base", "name": "ppl", "value": 12.4031,
         "protocol": {"block_size": 512, "stride": 0}},
        {"t": t + 5.1, "type": "metric", "stage": "baseline", "model": "base", "name": "mcq_acc", "value": 0.62},
        {"t": t + 5.2, "type": "stage_end", "stage": "baseline", "seconds": 5.1},
        {"t": t + 5.3, "type": "stage_start", "stage": "calibrate"},
        {"t": t + 6, "type": "gpu", "device": 0, "rank": 0, "mem_used_mb": 10240, "mem_peak_mb": 9216,
         "mem_total_mb": 81920, "util_pct": 87},
    ]
    for i in range(1, 9):
        ev.append({"t": t + 5.3 + i, "type": "progress", "stage": "calibrate", "done": i * 4096,
                   "total": 65536, "unit": "tokens", "rate": 4096.0, "eta_s": float(16 - i)})
    return ev


def tail_events(t0: float = T0, steps: int = 40, pcts: list[float] | None = None) -> list[dict]:
    """Calibration finishes, prune writes its layer report, fine-tune trains, evaluate ends."""
    t = t0 + 30
    ev = []
    for i in range(9, 17):
        ev.append({"t": t + i * 0.1, "type": "progress", "stage": "calibrate", "done": i * 4096,
                   "total": 65536, "unit": "tokens", "rate": 4096.0, "eta_s": float(16 - i)})
    report = layer_report_event(t + 3, pcts or [12.5, 25.0, 37.5, 50.0, 41.67, 20.83])
    ev += [
        {"t": t + 2, "type": "stage_end", "stage": "calibrate", "seconds": 26.7},
        {"t": t + 2.1, "type": "stage_start", "stage": "prune"},
        report,
        {"t": t + 3.1, "type": "metric", "stage": "prune", "model": "base", "name": "params",
         "value": report["totals"]["params_before"]},
        {"t": t + 3.2, "type": "metric", "stage": "prune", "model": "pruned", "name": "params",
         "value": report["totals"]["params_after"]},
        {"t": t + 3.3, "type": "log", "level": "info", "message": "pruned 2160 of 9216 MLP neurons"},
        {"t": t + 3.4, "type": "stage_end", "stage": "prune", "seconds": 1.3},
        {"t": t + 3.5, "type": "stage_start", "stage": "finetune"},
        {"t": t + 3.6, "type": "eval", "step": 0, "ppl": 16.9, "target_ppl": None},
        {"t": t + 3.7, "type": "metric", "stage": "finetune", "model": "pruned", "name": "ppl", "value": 16.9012},
        {"t": t + 3.8, "type": "metric", "stage": "finetune", "model": "pruned", "name": "mcq_acc", "value": 0.55},
    ]
    for s in range(1, steps + 1):
        loss = 3.2 * (0.97 ** s) + 0.05 * ((s * 7) % 5) / 5
        ev.append({"t": t + 4 + s, "type": "train", "step": s, "total_steps": steps, "loss": round(loss, 4),
                   "lr": 5e-5, "grad_norm": 1.1, "tokens_per_s": 8123.0, "eta_s": float(steps - s), "epoch": 0.1})
        if s % 10 == 0:
            ev.append({"t": t + 4 + s + 0.5, "type": "eval", "step": s, "ppl": round(16.9 - s * 0.08, 3),
                       "target_ppl": None})
        if s % 20 == 0:
            ev.append({"t": t + 4 + s + 0.6, "type": "checkpoint", "step": s, "path": f"checkpoints/step-{s}"})
    t = t + 4 + steps + 1
    ev += [
        {"t": t, "type": "gpu", "device": 0, "rank": 0, "mem_used_mb": 22528, "mem_peak_mb": 20480,
         "mem_total_mb": 81920, "util_pct": 93},
        {"t": t + 0.05, "type": "metric", "stage": "finetune", "model": "finetuned", "name": "params",
         "value": report["totals"]["params_after"]},
        {"t": t + 0.1, "type": "stage_end", "stage": "finetune", "seconds": float(steps)},
        {"t": t + 0.2, "type": "stage_start", "stage": "evaluate"},
        {"t": t + 1, "type": "progress", "stage": "evaluate", "done": 16384, "total": 16384, "unit": "tokens",
         "rate": 5120.0, "eta_s": 0.0},
        {"t": t + 1.1, "type": "metric", "stage": "evaluate", "model": "finetuned", "name": "ppl", "value": 13.7718},
        {"t": t + 1.2, "type": "metric", "stage": "evaluate", "model": "finetuned", "name": "mcq_acc", "value": 0.6},
        {"t": t + 1.3, "type": "stage_end", "stage": "evaluate", "seconds": 3.2},
        {"t": t + 1.4, "type": "run_end", "status": "done"},
    ]
    return ev


def finished_events(t0: float = T0, steps: int = 40) -> list[dict]:
    return head_events(t0) + tail_events(t0, steps)


def write_events(path: Path, events: list[dict], mode: str = "a", check: bool = True) -> None:
    """Append events; `check=False` for tests that feed the readers what the engine never writes."""
    with open(path, mode, encoding="utf-8") as f:
        for e in events:
            if check:
                record.event(e["type"], {k: v for k, v in e.items() if k not in ("t", "type")})
            f.write(json.dumps(e) + "\n")


def results_of(events: list[dict]) -> dict:
    """results.json as the engine leaves it beside these events: each metric's value under
    models[model][name] (and its protocol), the layer report's totals as the prune section."""
    res: dict = {}
    for e in events:
        if e["type"] == "metric":
            entry = res.setdefault("models", {}).setdefault(e["model"], {})
            entry[e["name"]] = e["value"]
            if "protocol" in e:
                entry[f"{e['name']}_protocol"] = e["protocol"]
        elif e["type"] == "layer_report":
            res["prune"] = {"mode": e["mode"], **e["totals"]}
    return res


def make_session(root: Path, name: str, events: list[dict] | None = None, *, status: str = "done",
                 stage: str | None = None, completed: list[str] | None = None, updated: float = T0,
                 overrides: dict | None = None, results: dict | None = None,
                 error: str | None = None, check: bool = True) -> session_mod.Session:
    """A session folder as the runner leaves it: config.toml, state.json, events.jsonl and
    results.json (by default the one the events imply, `results_of(events)`)."""
    data: dict = {"model": {"source": "embedded:smollm2"}, "data": {"source": "builtin:licenses"}}
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    cfg = config_mod.from_dict(data)
    s = session_mod.create(cfg, root, name=name)
    if completed is None:
        completed = list(session_mod.STAGES) if status == "done" else []
    atomic.write_json(s.path / session_mod.STATE_FILE, {
        "status": status, "stage": stage, "completed_stages": completed, "pid": 4242,
        "created": T0, "updated": updated, "error": error})
    if events:
        write_events(s.events_path, events, "w", check=check)
    if results is None and events:
        results = results_of(events)
    if results is not None:
        s.write_results(results)
    return s


def standard_root(root: Path) -> dict[str, session_mod.Session]:
    """Three sessions in three states, the fixture behind the sessions and compare screens."""
    root.mkdir(parents=True, exist_ok=True)
    done = make_session(root, "smollm2-licenses-eps", finished_events(), status="done", updated=NOW - 600)
    ratio_events = head_events() + tail_events(pcts=[30.0] * LAYERS)
    for e in ratio_events:  # a second run with its own numbers (and curves: compare overlays them)
        if e["type"] == "metric" and e["name"] == "ppl" and e["model"] != "base":
            e["value"] = round(e["value"] * 1.1, 4)
        elif e["type"] == "eval":
            e["ppl"] = round(e["ppl"] * 1.1, 3)
        elif e["type"] == "train":
            e["loss"] = round(e["loss"] * 1.15 + 0.1, 4)
    ratio = make_session(root, "phi-stdlib-ratio", ratio_events, status="done", updated=NOW - 7200,
                         overrides={"model": {"source": "microsoft/phi-1_5"},
                                    "data": {"source": "builtin:stdlib-docs"},
                                    "prune": {"rule": "ratio", "ratio": 0.3}})
    stopped = make_session(root, "opt-licenses-mask", head_events(), status="running", stage="calibrate",
                           completed=["baseline"], updated=NOW - 90000,
                           overrides={"model": {"source": "facebook/opt-1.3b"}, "prune": {"mode": "mask"}})
    return {"done": done, "ratio": ratio, "disconnected": stopped}


class FakeRunner:
    """Stands in for engine.run.launch at the launch boundary; records calls."""

    def __init__(self) -> None:
        self.launched: list[Path] = []
        self.stopped: list[Path] = []

    def launch_detached(self, session_path, stages=None) -> int:
        self.launched.append(Path(session_path))
        return 31337

    def request_stop(self, session_path) -> bool:
        self.stopped.append(Path(session_path))
        return True


async def wait_for(pilot, predicate, timeout: float = 10.0, step: float = 0.02) -> None:
    """Pause the pilot until `predicate()` holds (no fixed sleeps: fast and not flaky)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {getattr(predicate, '__name__', predicate)}")
        await pilot.pause(step)
    await pilot.pause()  # let layout and paint catch up with the state just reached


async def tables_measured(pilot, timeout: float = 10.0) -> None:
    """Pause until every DataTable on the screen has run its idle (where it sizes columns to
    their cells; until then they are only as wide as their headers) and the screen has painted
    that. The idle comes only once something reaches a table's queue: call_next prompts one and
    runs after it. On a loaded machine a snapshot taken without this caught header-wide columns."""
    from textual.widgets import DataTable

    tables = list(pilot.app.screen.query(DataTable))
    done: list[DataTable] = []
    for table in tables:
        table.call_next(done.append, table)
    await wait_for(pilot, lambda: len(done) == len(tables), timeout=timeout)


def screen_text(app) -> str:
    """The current screen as plain text, exactly as composited (for asserting what users see)."""
    import io

    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


class FixedProbe:
    """The monitor's system probe, pinned: snapshots never show this machine's load or disk."""

    def __init__(self, session=None) -> None:
        pass

    def sample(self, pid):
        from minigpt_tui.messages import SystemSample

        return SystemSample(cpu_pct=87.0, cpus=2, runner_rss=(1_234_000_000 if pid else None),
                            runner_cpu_pct=95.0, session_bytes=2_600_000_000, disk_free=41_200_000_000)


def _cut_after(events: list[dict], pred) -> list[dict]:
    i = next(i for i, e in enumerate(events) if pred(e))
    return events[:i + 1]


def resumed_events(stop_at: int = 26, new_steps: int = 2) -> list[dict]:
    """Stopped gracefully at step `stop_at` of 40 (checkpoint there), resumed: the stages
    before fine-tuning skipped, fine-tuning continues from the checkpoint."""
    ev = _cut_after(finished_events(), lambda e: e["type"] == "train" and e["step"] == stop_at)
    t = ev[-1]["t"]
    ev += [{"t": t + 0.5, "type": "checkpoint", "step": stop_at, "path": f"checkpoints/step-{stop_at}"},
           {"t": t + 0.6, "type": "log", "level": "info", "message": f"stopped at step {stop_at}; continue with: "
                                                                      "minigpt resume r03"},
           {"t": t + 0.7, "type": "run_end", "status": "stopped"},
           {"t": t + 60, "type": "run_start", "pid": 4343, "resumed": True, "stages": ev[0]["stages"]}]
    ev += [{"t": t + 60.1, "type": "stage_skip", "stage": st, "reason": record.SKIP_COMPLETED}
           for st in ("baseline", "calibrate", "prune")]
    ev += [{"t": t + 61, "type": "stage_start", "stage": "finetune"},
           {"t": t + 62, "type": "log", "level": "info",
            "message": f"resuming fine-tuning from checkpoint at step {stop_at} (step-{stop_at})"}]
    for s in range(stop_at + 1, stop_at + 1 + new_steps):
        ev.append({"t": t + 62 + s - stop_at, "type": "train", "step": s, "total_steps": 40, "loss": 1.2,
                   "lr": 5e-5, "grad_norm": 1.0, "tokens_per_s": 8000.0, "eta_s": float(40 - s), "epoch": 0.2})
    return ev


def early_stop_events(stop_at: int = 10) -> list[dict]:
    """Fine-tuning reaches its held-out target at step `stop_at` of 40 and stops; evaluate ends the run."""
    full = finished_events()
    ev = _cut_after(full, lambda e: e["type"] == "train" and e["step"] == stop_at)
    for e in ev:
        if e["type"] == "eval":
            e["target_ppl"] = 13.0
    t = ev[-1]["t"]
    ev += [{"t": t + 0.4, "type": "eval", "step": stop_at, "ppl": 12.9, "target_ppl": 13.0},
           {"t": t + 0.5, "type": "log", "level": "info",
            "message": f"fine-tuning stopped after {stop_at} steps (target_ppl)"},
           {"t": t + 0.6, "type": "checkpoint", "step": stop_at, "path": f"checkpoints/step-{stop_at}"}]
    tail = full[next(i for i, e in enumerate(full) if e["type"] == "stage_end" and e["stage"] == "finetune"):]
    ev += [dict(e, t=e["t"] - 30) for e in tail]
    return ev
