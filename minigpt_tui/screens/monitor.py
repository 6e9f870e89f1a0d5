"""Run monitor: stage timeline, loss/perplexity plots, layer-by-layer sizes, metrics, log.

A thread worker tails `events.jsonl` with `EventReader.poll()` and checks the runner's
liveness; it only reads files and posts `RunEvents` / `RunStatus`. Handlers fold events
into a `RunView` and mark the screen dirty; a 10 Hz timer redraws at most ten times a
second however fast events arrive, and a finished run's whole log is folded in one pass.
"""

from __future__ import annotations

import math
import shutil
import time
from typing import TYPE_CHECKING, Callable

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Log, Static, TabbedContent, TabPane
from textual.worker import get_current_worker

from engine.run import record
from engine.run import session as session_mod
from engine.errors import MinigptError
from engine.run.events import EventReader

from ..data import bar, dir_size, fmt_bytes, fmt_count, fmt_duration, fmt_gpu, fmt_metric, fmt_rate, short_method
from ..messages import Alert, RunEvents, RunStatus, SystemSample
from ..runview import RunView, delta
from ..styles import signed_text, status_text, theme_style
from ..widgets import OverlayPlot, TextPlot, TitleBar

if TYPE_CHECKING:
    from ..app import MinigptApp

RENDER_INTERVAL = 0.1  # seconds: at most 10 redraws per second
BANNERS = {
    record.DISCONNECTED: "disconnected — the runner is gone (state says running but nobody holds runner.lock). "
                         "r resumes from the last completed stage.",
    "stopped": "stopped — r resumes from the last completed stage or checkpoint.",
    "new": "not started yet — r launches it.",
    "starting": "starting — waiting for the runner to take the lock.",
    record.CORRUPT: "this session's files are corrupt",
}
RESUMABLE = ("stopped", "failed", record.DISCONNECTED, "new")
SYSTEM_EVERY = 2.0  # seconds between CPU/memory samples
DISK_EVERY = 10.0  # seconds between walks of the session folder (a fine-tuned one holds GBs)
LOW_DISK = 2 * 1024**3  # free bytes below which the monitor alerts once
RISING = 3  # held-out perplexity rising this many evaluations in a row: an alert


class MonitorScreen(Screen):
    """One session, live or replayed."""

    HELP = ("Follows the session's events.jsonl live (or replays a finished run). 1–4 switch tabs: "
            "progress, layers, metrics, log. s stops the runner, r resumes a stopped/disconnected run, "
            "e exports a finished run's model as GGUF.")
    BINDINGS = [
        Binding("escape", "back", "Back", id="monitor.back"),
        Binding("s", "stop", "Stop", id="monitor.stop"),
        Binding("r", "resume", "Resume", id="monitor.resume"),
        Binding("e", "export", "Export", id="monitor.export"),
        Binding("1", "tab('progress')", "Progress", id="monitor.tab_progress"),
        Binding("2", "tab('layers')", "Layers", id="monitor.tab_layers"),
        Binding("3", "tab('metrics')", "Metrics", id="monitor.tab_metrics"),
        Binding("4", "tab('log')", "Log", id="monitor.tab_log"),
    ]

    app: "MinigptApp"

    def __init__(self, session: session_mod.Session) -> None:
        super().__init__()
        self.session = session
        self.view = RunView()
        self.status = "loading"
        self.state: dict = {}
        self.status_error: str | None = None
        self.loaded = False  # the first poll (whole log so far + status) has been applied
        self.render_count = 0
        self._dirty = False
        self._last_render = 0.0
        self._log_written = 0
        self._layers_drawn = -1
        self._metrics_drawn = -1
        self.system: SystemSample | None = None
        self._alerted: set[str] = set()
        self.config_off: set[str] = set()  # optional stages this session's config leaves off
        try:
            cfg = session.config()
            ft = cfg.finetune
            self.config_off = {name for name, on in (("teacher", getattr(ft, "teacher_steps", 0) > 0),
                                                     ("control", bool(getattr(ft, "control", False))))
                               if not on}
            p = cfg.prune
            method = (f"{p.criterion} eps={p.activation_threshold:g}" if p.rule == "threshold"
                      else f"{p.criterion} {p.ratio:.0%} {p.allocation}")
            self.describe = (f"{cfg.model.source} · {cfg.data.source} · "
                             f"{short_method({'mode': p.mode, 'method': method})}"
                             f"{' · finetune ' + str(cfg.finetune.max_steps) + ' steps' if cfg.finetune.enabled else ''}")
        except MinigptError as e:
            self.describe = e.problem

    # ---- layout ----------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield TitleBar(f"minigpt · {self.session.id}", id="title")
        yield Static("", id="run-info")
        yield Static("", id="banner", markup=False)
        with TabbedContent(initial="progress", id="tabs"):
            with TabPane("Progress", id="progress"):
                yield DataTable(id="timeline", cursor_type="none", show_cursor=False)
                yield Static("", id="summary")
                with Horizontal(id="plots"):
                    yield TextPlot("loss", id="loss-plot")
                    yield OverlayPlot("loss = KL + w·CE", id="loss-parts")  # distillation: the loss's parts
                    yield TextPlot("held-out ppl", id="ppl-plot")
                yield Static("", id="system", markup=False)
                yield Static("", id="gpu")
            with TabPane("Layers", id="layers"):
                yield DataTable(id="layer-table", cursor_type="row", zebra_stripes=True)
                yield Static("no layer report yet (written by the prune stage)", id="layer-totals")
                yield TextPlot("% removed by layer", zero_based=True, id="layer-chart")
            with TabPane("Metrics", id="metrics"):
                yield DataTable(id="metric-table", cursor_type="row", zebra_stripes=True)
                yield Static("", id="metric-note")
            with TabPane("Log", id="log"):
                yield Log(id="log-view", max_lines=self.view.max_log, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#loss-parts").display = False
        mt = self.query_one("#metric-table", DataTable)
        for label, key in (("metric", "metric"), ("base", "base"), ("pruned", "pruned"), ("Δ pruned", "d_pruned"),
                           ("finetuned", "finetuned"), ("Δ finetuned", "d_finetuned")):
            mt.add_column(label, key=key)
        self._render_all()
        self.set_interval(RENDER_INTERVAL, self._flush_if_dirty)
        self._tail(self.session, self.app.poll_interval)
        self.app.theme_changed_signal.subscribe(self, lambda _t: self._render_all(force=True))

    # ---- reading (worker thread: files only, then post) ------------------------------
    @work(thread=True, exclusive=True, group="monitor-tail", exit_on_error=False)
    def _tail(self, session: session_mod.Session, interval: float) -> None:
        from engine.run import death

        worker = get_current_worker()
        reader = EventReader(session.events_path)
        last = None
        probe = (getattr(self.app, "system_probe", None) or _SystemProbe)(session)  # tests pin it
        next_sample = 0.0
        while not worker.is_cancelled:
            events = reader.poll()
            if events:
                self.post_message(RunEvents(events))
            try:
                status, state, err = session.status(), session.state(), None
            except MinigptError as e:
                status, state, err = "corrupt", {}, e.line()
            except OSError as e:
                status, state, err = "corrupt", {}, f"cannot read the session: {e}"
            key = (status, state.get("stage"), state.get("error"), tuple(state.get("completed_stages") or ()), err)
            if key != last:
                if status == record.DISCONNECTED:
                    try:
                        death.record_death(session)  # the next poll reads it back like any event
                    except OSError:
                        pass
                self.post_message(RunStatus(status, state, err))
                last = key
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + SYSTEM_EVERY
                self.post_message(probe.sample(state.get("pid") if status in record.LIVE_STATUSES else None))
            if worker.cancelled_event.wait(interval):
                break

    # ---- handlers (UI thread: the only place widgets change) -------------------------
    def on_run_events(self, msg: RunEvents) -> None:
        n_losses, n_evals = len(self.view.losses), len(self.view.eval_ppl)
        self.view.apply(msg.events)
        self._dirty = True
        if self.loaded:  # live events, not the replay of what was there already
            self._check_alerts(n_losses, n_evals)

    def _check_alerts(self, n_losses: int, n_evals: int) -> None:
        v = self.view
        bad = [x for x in v.losses[n_losses:] if not math.isfinite(x)]
        if bad and "nan" not in self._alerted:
            self._alerted.add("nan")
            step = v.loss_steps[v.losses.index(bad[0])] if bad[0] in v.losses else "?"
            self.app.post_message(Alert(f"{self.session.id}: loss is {bad[0]}", f"at step {step}: the run diverged "
                                        "— stop it (s) and lower finetune.lr", "error"))
        ppl = [p for _, p in v.eval_ppl]
        if len(v.eval_ppl) > n_evals and len(ppl) > RISING and all(
                ppl[-i] > ppl[-i - 1] for i in range(1, RISING + 1)):
            key = f"rising-{len(ppl)}"
            if key not in self._alerted:
                self._alerted.add(key)
                self.app.post_message(Alert(f"{self.session.id}: held-out ppl rising",
                                            f"up {RISING} evaluations in a row, now {ppl[-1]:.2f}", "warning"))

    def on_system_sample(self, msg: SystemSample) -> None:
        self.system = msg
        self._dirty = True
        if msg.disk_free is not None and msg.disk_free < LOW_DISK and "disk" not in self._alerted:
            self._alerted.add("disk")
            self.app.post_message(Alert(f"{self.session.id}: low disk", f"{fmt_bytes(msg.disk_free)} free under "
                                        f"{self.session.path} — clean up checkpoints (sessions: x)", "error"))

    def on_resize(self) -> None:
        self._render_all(force=True)  # bar widths and column widths follow the new size

    def on_run_status(self, msg: RunStatus) -> None:
        self.status, self.state, self.status_error = msg.status, msg.state, msg.error
        self.loaded = True
        self._dirty = True

    def _flush_if_dirty(self) -> None:
        if self._dirty:
            self._render_all()

    @property
    def settled(self) -> bool:
        """Loaded and nothing waiting to be drawn (tests and snapshots wait for this)."""
        return self.loaded and not self._dirty

    # ---- rendering ---------------------------------------------------------------
    def _render_all(self, force: bool = False) -> None:
        self._dirty = False
        self._last_render = time.monotonic()
        self.render_count += 1
        with self.app.batch_update():
            self._render_header()
            self._render_timeline()
            self._render_plots()
            if force or self._layers_drawn != self.view.layers_version:
                self._render_layers()
            if force or self._metrics_drawn != self.view.metrics_version:
                self._render_metrics()
            self._render_log()

    def _render_header(self) -> None:
        info = Text()
        info.append_text(status_text(self.app, self.status, self.status.upper(), bold=True))
        info.append("  " + self.describe)
        if self.view.runs > 1:
            info.append(f" · run {self.view.runs}")
        self.query_one("#run-info", Static).update(info)
        banner = self.query_one("#banner", Static)
        text = BANNERS.get(self.status)
        if self.status == record.DISCONNECTED and self.view.end_status == record.DISCONNECTED and self.view.error:
            text = f"{self.view.error} — r resumes from the last completed stage or checkpoint."
        if self.status == "failed":
            text = f"failed: {self.view.error or self.state.get('error') or 'see the log'} — fix it, then r resumes."
        if self.status == record.CORRUPT and self.status_error:
            text = self.status_error
        banner.display = bool(text) and self.loaded
        banner.set_classes("banner-" + "".join(c for c in self.status if c.isalnum()))
        banner.update(text or "")

    def _render_timeline(self) -> None:
        tl = self.query_one("#timeline", DataTable)
        # columns rebuilt each time: DataTable widths only ever grow, so after a resize (or a
        # long phase name) they would stay too wide
        tl.clear(columns=True)
        rows = []
        width = 20 if self.app.size.width >= 110 else 10
        for st in self.view.ordered_stages():
            if st.name in self.config_off and st.status in ("pending", "off"):
                continue  # a teacher correction / control the config leaves off: before its skip event arrives
            frac = st.fraction
            if st.status in ("off", "skipped"):
                frac_txt, done = "", st.note if st.status == "skipped" else "disabled"
            else:
                frac_txt = bar(frac, width) + (f" {frac:4.0%}" if frac is not None else "     ")
                unit = {"tokens": "tok"}.get(st.unit, st.unit)
                done = (f"{fmt_count(st.done)}/{fmt_count(st.total)} {unit}" if st.total else "")
                if st.phase and st.status == "running":
                    done = f"{st.phase} {done}"
                if st.note and st.status == "done" and st.note != record.SKIP_COMPLETED:
                    done = f"{done} ({st.note})"
            rate = fmt_rate(st.tokens_per_s, "tokens") if st.tokens_per_s else fmt_rate(st.rate, st.unit)
            if st.status == "done":
                eta = fmt_duration(st.seconds) if st.seconds is not None else "done"
            elif st.status == "running":
                eta = f"eta {fmt_duration(st.eta_s)}" if st.eta_s is not None else "…"
            else:
                eta = ""
            rows.append((st.name, (st.name, status_text(self.app, st.status), frac_txt, done, rate, eta)))
        columns = (("stage", "stage"), ("state", "state"), ("progress", "bar"), ("done", "done"),
                   ("rate", "rate"), ("eta / time", "eta"))
        for i, (label, key) in enumerate(columns):  # each column as wide as its widest cell, now
            cells = [Text(c) if isinstance(c, str) else c for _, r in rows for c in (r[i],)]
            tl.add_column(label, key=key, width=max([len(label)] + [c.cell_len for c in cells]))
        for key, cells in rows:
            tl.add_row(*cells, key=key)
        v = self.view
        parts = []
        for name in ("ppl", "mcq_acc"):
            base = v.metric("base", name)
            cells = []
            for model in record.MODELS:
                val = v.metric(model, name)
                if val is None:
                    continue
                d, _ = delta(name, base, val) if model != "base" else ("", 0)
                cells.append(f"{model} {fmt_metric(name, val)}{' (' + d + ')' if d else ''}")
            if cells:
                parts.append(f"{name}: " + " → ".join(cells))
        summary = self.query_one("#summary", Static)
        summary.update(escape("\n".join(parts)) if parts else "no metrics yet")

    def _render_plots(self) -> None:
        v = self.view
        ft = v.stages.get("finetune")
        if v.losses:
            # the step count is the stage's (the record's train/checkpoint events), as in the table
            steps = f" · step {fmt_count(ft.done)}/{fmt_count(ft.total)}" if ft and ft.total else ""
            cap = f"loss {v.losses[-1]:.3f} · min {min(v.losses):.3f}{steps}"
        else:
            cap = "loss (fine-tuning steps)"
        empty = self._why_empty(ft, "step")
        self.query_one("#loss-plot", TextPlot).set_data(v.losses, cap, empty)
        parts = v.has_loss_parts()  # train events with kl/ce (finetune.loss = kd): the loss and its parts
        self.query_one("#loss-plot").display = not parts
        self.query_one("#loss-parts").display = parts
        if parts:
            series = [(name, style, [(float(st), x) for st, x in zip(v.loss_steps, vals) if x is not None])
                      for name, style, vals in (("loss", "● cyan", v.losses), ("KL", "▲ magenta", v.kls),
                                                ("CE", "■ yellow", v.ces))]
            self.query_one("#loss-parts", OverlayPlot).set_data(series, cap, empty=empty)
        ppl = [p for _, p in v.eval_ppl]
        base = v.metric("base", "ppl")
        ref = ", ".join(x for x in (f"base {base:.2f}" if base else "",
                                    f"target {v.target_ppl:.2f}" if v.target_ppl else "") if x)
        cap = "held-out ppl" + (f" {ppl[-1]:.2f}" if ppl else "") + (f" ({ref})" if ref else "")
        self.query_one("#ppl-plot", TextPlot).set_data(ppl, cap, self._why_empty(ft, "evaluation"))
        self._render_system()
        # `gpu` events come only from CUDA runs (record: only_on="cuda"); without any the line is
        # hidden rather than waiting for samples a CPU run never writes
        samples = v.gpu_samples()
        gpu = self.query_one("#gpu", Static)
        gpu.display = bool(samples)
        gpu.update(escape("\n".join(fmt_gpu(g, with_rank=len(samples) > 1) for g in samples)))

    def _why_empty(self, ft, what: str) -> str:
        """What an empty fine-tuning plot means (short: it must fit an 80-column half), from the
        stage's state and the run's status."""
        if ft is None or ft.status in ("off", "skipped"):
            return "fine-tuning is off in this run"
        if ft.status == "done":
            return "no held-out evaluations (eval_every = 0)" if what == "evaluation" else "no steps recorded"
        if self.status in record.END_STATUSES or self.status == record.DISCONNECTED:
            return f"ended before any {what}"
        return f"waiting for the first {what}"

    def _render_system(self) -> None:
        box = self.query_one("#system", Static)
        m = self.system
        if m is None:
            box.update("system: sampling…")
            return
        parts = [f"CPU {m.cpu_pct:.0f}%/{m.cpus} cores"]
        if m.runner_rss is not None:
            parts.append(f"runner {m.runner_cpu_pct:.0f}% RSS {fmt_bytes(m.runner_rss)}")
        else:
            parts.append("runner not running")
        parts.append(f"session {fmt_bytes(m.session_bytes)}")
        if m.disk_free is not None:
            parts.append(f"free {fmt_bytes(m.disk_free)}")
        box.update(" · ".join(parts))

    def _render_layers(self) -> None:
        self._layers_drawn = self.view.layers_version
        rep = self.view.layer_report
        lt = self.query_one("#layer-table", DataTable)
        lt.clear()
        if not rep:
            return
        rows = rep["rows"]
        width = 20 if self.app.size.width >= 110 else 10
        pairs = layer_pairs(rows, changed_only=True)
        lt.clear(columns=True)  # the columns are the report's: heads, kv groups where this run changed them
        for label, key in (("layer", "layer"), ("module", "module"), *((_PAIR_LABELS.get(p, p), p) for p in pairs),
                           ("removed", "pct"), ("", "bar")):
            lt.add_column(label, key=key)
        for r in rows:
            pct = float(r.get("pct_removed", 0) or 0)
            cells = []
            for p in pairs:
                b, a = r.get(f"{p}_before"), r.get(f"{p}_after")
                if b is None and a is None:
                    cells.append("")
                elif r.get("dropped") and p != "params":
                    cells.append(f"{_pair_cell(p, b)}→dropped")
                else:
                    cells.append(f"{_pair_cell(p, b)}→{_pair_cell(p, a)}")
            lt.add_row(str(r.get("layer", "?")), escape(str(r.get("module", ""))), *cells,
                       f"{pct:5.1f}%", Text(bar(pct / 100, width), style=theme_style(self.app, "accent")),
                       key=f"layer-{r.get('layer')}-{r.get('module')}")
        t = rep["totals"]
        mode = rep.get("mode") or ""
        extra = ""
        if mode == "mask" and t.get("stored_params") is not None:  # mask mode counts nonzero parameters
            extra = f" · non-zero counts; stored {fmt_count(t['stored_params'])}"
        others = "".join(f" · {_PAIR_LABELS.get(p, p)} {_pair_cell(p, t[p + '_before'])}→{_pair_cell(p, t[p + '_after'])}"
                         for p in layer_pairs([t], changed_only=True) if p not in ("params", "neurons"))
        dropped = [str(r.get("layer")) for r in rows if r.get("dropped")]
        if not dropped and isinstance(t.get("dropped_blocks"), list):
            dropped = [str(x) for x in t["dropped_blocks"]]
        if dropped:
            others += f" · blocks dropped: {', '.join(dropped)}"
        self.query_one("#layer-totals", Static).update(
            f"total ({mode}): {fmt_count(t.get('params_before'))} → {fmt_count(t.get('params_after'))} params, "
            f"{float(t.get('pct_removed', 0) or 0):.1f}% removed · neurons "
            f"{t.get('neurons_before', '?')}→{t.get('neurons_after', '?')}{others}{extra}")
        pcts = [float(r.get("pct_removed", 0) or 0) for r in rows]
        self.query_one("#layer-chart", TextPlot).set_data(pcts, f"% removed by layer (0–{len(rows) - 1})")

    def _render_metrics(self) -> None:
        self._metrics_drawn = self.view.metrics_version
        v = self.view
        mt = self.query_one("#metric-table", DataTable)
        mt.clear()
        for name in v.metric_names():
            base = v.metric("base", name)
            cells: list = [name, fmt_metric(name, base)]
            for model in ("pruned", "finetuned"):
                val = v.metric(model, name)
                d, sign = delta(name, base, val)
                cells += [fmt_metric(name, val), signed_text(self.app, d, sign)]
            mt.add_row(*cells, key=name)
        note = self.query_one("#metric-note", Static)
        note.update("" if v.metrics else "no metrics yet (baseline and evaluate stages write them)")

    def _render_log(self) -> None:
        v = self.view
        new = v.log_total - self._log_written
        if new <= 0:
            return
        lines = list(v.logs)[-min(new, len(v.logs)):]
        self.query_one("#log-view", Log).write_lines(
            f"{v.rel_time(line.t)} {line.level:<5} {line.message}" for line in lines)
        self._log_written = v.log_total

    # ---- actions ---------------------------------------------------------------
    def action_back(self) -> None:
        self.app.pop_screen()

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    def action_stop(self) -> None:
        if self.status not in record.LIVE_STATUSES:
            self.notify(f"not running ({self.status})", severity="warning")
            return
        self.app.stop_session(self.session)

    def action_resume(self) -> None:
        if self.status in (*record.LIVE_STATUSES, "done"):
            self.notify(f"nothing to resume ({self.status})", severity="warning")
            return
        self.app.launch_session(self.session)

    def action_export(self) -> None:
        self.app.open_export(self.session)

    def palette_commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        cmds: list[tuple[str, str, Callable[[], object]]] = []
        if self.status not in record.LIVE_STATUSES:
            cmds.append(("run: export GGUF", f"Export the model of {self.session.id} for llama.cpp", self.action_export))
        if self.status in record.LIVE_STATUSES:
            cmds.append(("run: stop", f"Ask the runner of {self.session.id} to stop", self.action_stop))
        if self.status in RESUMABLE:
            cmds.append(("run: resume", f"Launch {self.session.id} again from its last stage", self.action_resume))
        for tab, label in (("progress", "progress"), ("layers", "layer sizes"), ("metrics", "metrics"), ("log", "log")):
            cmds.append((f"view: {label}", f"Show the {label} tab", lambda t=tab: self.action_tab(t)))
        cmds.append(("run: back to sessions", "Return to the session list", self.action_back))
        return cmds


# the layer report's before/after pairs in display order (engine.prune.mlp.layer_report): MLP
# neurons, query heads, KV groups, hidden width, then any other pair a newer report carries,
# parameters last
_PAIR_ORDER = ("neurons", "heads", "kv", "hidden")
_PAIR_LABELS = {"kv": "kv groups"}
_ALWAYS = ("neurons", "params")


def layer_pairs(rows: list[dict], changed_only: bool = False) -> list[str]:
    """The `X` of every `X_before` / `X_after` pair the rows carry (old reports: neurons, params);
    `changed_only`: besides neurons and params, only the pairs some row changed (a run that cut
    no heads shows no head column)."""
    found: list[str] = []
    for r in rows:
        for k in r:
            x = k[:-len("_before")]
            if k.endswith("_before") and x + "_after" in r and x not in found:
                found.append(x)
    if changed_only:
        found = [x for x in found if x in _ALWAYS or any(
            r.get(x + "_before") != r.get(x + "_after") and (r.get(x + "_before") is not None) for r in rows)]
    ranked = [p for p in _PAIR_ORDER if p in found] + [p for p in found if p not in _PAIR_ORDER and p != "params"]
    return ranked + (["params"] if "params" in found else [])


def _pair_cell(name: str, v) -> str:
    if v is None:
        return "?"
    if name == "params":
        return fmt_count(v)
    return str(v)


class _SystemProbe:
    """CPU and memory (psutil), the session's disk use and the free disk: read in the worker."""

    def __init__(self, session: session_mod.Session) -> None:
        import psutil

        self.psutil = psutil
        self.session = session
        self.proc = None
        self.disk_at = 0.0
        self.session_bytes = 0
        psutil.cpu_percent(None)  # the first call only starts the interval

    def sample(self, pid) -> SystemSample:
        ps = self.psutil
        rss = cpu = None
        if pid:
            try:
                if self.proc is None or self.proc.pid != int(pid):
                    self.proc = ps.Process(int(pid))
                    self.proc.cpu_percent(None)
                rss, cpu = self.proc.memory_info().rss, self.proc.cpu_percent(None)
            except (ps.Error, ValueError):
                self.proc = None
        if time.monotonic() >= self.disk_at:
            self.disk_at = time.monotonic() + DISK_EVERY
            self.session_bytes = dir_size(self.session.path)
        try:
            free = shutil.disk_usage(self.session.path).free
        except OSError:
            free = None
        return SystemSample(cpu_pct=ps.cpu_percent(None), cpus=ps.cpu_count() or 1, runner_rss=rss,
                            runner_cpu_pct=cpu or 0.0, session_bytes=self.session_bytes, disk_free=free)
