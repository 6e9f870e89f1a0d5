"""Fold a session's `events.jsonl` into the state a monitor shows.

Pure Python (no Textual, no torch) so the same reducer serves the live monitor, the replay
of a finished run and a headless printout. Replaying is one pass over the events; the UI
renders the folded state, never each event. Event kinds, their fields, the stages and the
metrics (units, which way is better) are the run record's (`engine.run.record`): one
`_on_<kind>` handler per kind the monitor shows (`HANDLED`), unknown kinds are ignored.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from engine.run import record

# The metrics tab's order: quality first, then size; every other metric of the record after,
# in the record's order (a metric added there shows up here by itself).
_FIRST = ("ppl", *record.MCQ_METRICS, "vocab_bpb", "vocab_coverage", "params", "vocab_size")
METRIC_ORDER = _FIRST + tuple(n for n in record.METRICS if n not in _FIRST)


@dataclass
class StageView:
    name: str
    status: str = "pending"  # pending | running | done | skipped | stopped | failed | off
    done: float = 0
    total: float = 0
    unit: str = ""
    phase: str = ""  # what part of the stage the progress is about (prune: sensitivity, sequential)
    rate: float | None = None
    eta_s: float | None = None
    seconds: float | None = None
    tokens_per_s: float | None = None
    note: str = ""

    @property
    def fraction(self) -> float | None:
        if self.status == "done":
            return 1.0
        if self.total and self.total > 0:
            return max(0.0, min(1.0, self.done / self.total))
        return None


@dataclass
class LogLine:
    t: float | None
    level: str
    message: str


@dataclass
class RunView:
    """Everything the monitor displays, built incrementally by `apply(events)`."""

    max_log: int = 2000
    stages: dict[str, StageView] = field(default_factory=dict)
    current: str | None = None
    losses: list[float] = field(default_factory=list)
    loss_steps: list[int] = field(default_factory=list)
    # the loss's parts where the train events carry them (distillation: KL to the teacher, CE on
    # the corpus); None at steps without them, so they stay aligned with loss_steps
    kls: list = field(default_factory=list)
    ces: list = field(default_factory=list)
    # train events of stages other than finetune (a teacher correction, the control run):
    # {stage: [(step, loss)]}; they never enter the fine-tuning curve
    other_losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    planned: set[str] = field(default_factory=set)  # every stage some run_start planned or an event named
    eval_ppl: list[tuple[int, float]] = field(default_factory=list)
    target_ppl: float | None = None
    train_last: dict | None = None
    layer_report: dict | None = None
    metrics: dict[tuple[str, str], float] = field(default_factory=dict)
    gpus: dict[int, dict] = field(default_factory=dict)  # the newest `gpu` sample of each rank
    logs: deque = field(default_factory=deque)
    log_total: int = 0  # lines ever appended (the deque keeps the last max_log)
    error: str | None = None
    end_status: str | None = None
    last_checkpoint: int | None = None
    t0: float | None = None
    last_t: float | None = None
    n_events: int = 0
    runs: int = 0
    left_off: set = field(default_factory=set)  # optional stages a run skipped as off (a resume skips them again)
    # Bumped when the matching part changes, so the UI redraws only what changed.
    layers_version: int = 0
    metrics_version: int = 0

    def __post_init__(self) -> None:
        self.logs = deque(self.logs, maxlen=self.max_log)
        for name in record.STAGES:
            self.stages.setdefault(name, StageView(name))

    # ---- folding -------------------------------------------------------------
    def apply(self, events: Iterable[dict]) -> int:
        n = 0
        for ev in events:
            kind = ev.get("type")
            handler = getattr(self, "_on_" + kind) if kind in HANDLED else None
            t = ev.get("t")
            if isinstance(t, (int, float)):
                if self.t0 is None:
                    self.t0 = float(t)
                self.last_t = float(t)
            if handler is not None:
                try:
                    handler(ev)
                except (TypeError, ValueError, KeyError, AttributeError):
                    # A malformed event must not take the monitor down; note it and go on.
                    self._log(ev, "warning", f"unreadable {ev.get('type')} event")
            n += 1
        self.n_events += n
        return n

    def stage(self, name: Any) -> StageView:
        name = str(name or "?")
        self.planned.add(name)
        if name not in self.stages:
            self.stages[name] = StageView(name)
        return self.stages[name]

    def _log(self, ev: dict, level: str, message: str) -> None:
        t = ev.get("t")
        self.logs.append(LogLine(float(t) if isinstance(t, (int, float)) else None, level, message))
        self.log_total += 1

    def _on_run_start(self, ev: dict) -> None:
        self.runs += 1
        self.end_status = None
        self.error = None
        planned = ev.get("stages")
        if isinstance(planned, list) and planned:
            self.planned.update(str(p) for p in planned)
            for name in list(self.stages):
                st = self.stages[name]
                if name not in planned and st.status in ("pending", "off"):
                    st.status = "off"
            for name in planned:
                st = self.stage(name)
                if st.status in ("off", "stopped", "failed", "died"):
                    st.status = "pending"
        verb = "resumed" if ev.get("resumed") else "started"
        self._log(ev, "info", f"runner {verb} (pid {ev.get('pid', '?')})")

    def _on_stage_start(self, ev: dict) -> None:
        st = self.stage(ev.get("stage"))
        done = 0.0
        if st.name == "finetune" and self.last_checkpoint is not None:
            # a resume continues from the newest checkpoint (the record's `checkpoint` event):
            # steps after it are trained again, so they leave the curve
            done = float(self.last_checkpoint)
            keep = [i for i, step in enumerate(self.loss_steps) if step <= done]
            self.losses = [self.losses[i] for i in keep]
            self.loss_steps = [self.loss_steps[i] for i in keep]
            self.kls = [self.kls[i] for i in keep]
            self.ces = [self.ces[i] for i in keep]
            self.eval_ppl = [(step, p) for step, p in self.eval_ppl if step <= done]
        st.status, st.done, st.rate, st.eta_s, st.note = "running", done, None, None, ""
        self.left_off.discard(st.name)
        self.current = st.name
        self._log(ev, "info", f"stage {st.name} started")

    def _on_stage_skip(self, ev: dict) -> None:
        st = self.stage(ev.get("stage"))
        reason = str(ev.get("reason", ""))
        if st.name in record.OPTIONAL_STAGES and (reason.startswith(record.SKIP_OFF) or st.name in self.left_off):
            st.status = "off"  # teacher correction / the control, left off by the config
            self.left_off.add(st.name)
        elif st.status != "done":
            st.status = "done" if reason == record.SKIP_COMPLETED else "skipped"
        st.note = reason
        self._log(ev, "info", f"stage {st.name} skipped: {reason}")

    def _on_progress(self, ev: dict) -> None:
        st = self.stage(ev.get("stage"))
        if st.status in ("pending", "off"):
            st.status = "running"
        st.done = float(ev.get("done", 0) or 0)
        st.total = float(ev.get("total", 0) or 0)
        st.unit = str(ev.get("unit", st.unit) or "")
        st.phase = str(ev.get("phase") or "")
        st.rate = _num(ev.get("rate"))
        st.eta_s = _num(ev.get("eta_s"))
        if st.unit == "tokens" and st.rate is not None:
            st.tokens_per_s = st.rate
        self.current = st.name

    def _on_train(self, ev: dict) -> None:
        loss = _num(ev.get("loss"))
        step = int(ev.get("step", len(self.losses)))
        # the record's `stage` field names the training stage (absent: finetune, or an older log,
        # where the running teacher/control stage owns it)
        owner = ev.get("stage") or (self.current if self.current in _TRAINING and self.current in self.stages
                                    and self.stages[self.current].status == "running" else "finetune")
        if owner != "finetune":  # a teacher correction or the control: its own curve and count
            if loss is not None:
                self.other_losses.setdefault(owner, []).append((step, loss))
            st = self.stage(owner)
            if ev.get("total_steps"):
                st.done, st.total, st.unit = float(step), float(ev["total_steps"]), "steps"
            st.eta_s = _num(ev.get("eta_s"))
            st.tokens_per_s = _num(ev.get("tokens_per_s"))
            return
        if loss is not None:
            self.losses.append(loss)
            self.loss_steps.append(step)
            self.kls.append(_num(ev.get("kl")))
            self.ces.append(_num(ev.get("ce")))
        self.train_last = ev
        st = self.stage("finetune")
        if st.status in ("pending", "off"):
            st.status = "running"
        total = ev.get("total_steps")
        if total:
            st.done, st.total, st.unit = float(step), float(total), "steps"
        st.eta_s = _num(ev.get("eta_s"))
        st.tokens_per_s = _num(ev.get("tokens_per_s"))

    def _on_eval(self, ev: dict) -> None:
        if (ev.get("stage") or "finetune") != "finetune":
            return  # the curve is the pruned model's recovery
        ppl = _num(ev.get("ppl"))
        if ppl is not None:
            self.eval_ppl.append((int(ev.get("step", 0)), ppl))
        target = _num(ev.get("target_ppl"))
        if target is not None:
            self.target_ppl = target

    def _on_layer_report(self, ev: dict) -> None:
        rows = ev.get("rows") or []
        self.layer_report = {"mode": ev.get("mode", ""), "rows": list(rows), "totals": dict(ev.get("totals") or {})}
        self.layers_version += 1
        totals = self.layer_report["totals"]
        if "pct_removed" in totals:
            self._log(ev, "info", f"layer report: {_num(totals['pct_removed']) or 0:.1f}% of parameters removed")

    def _on_metric(self, ev: dict) -> None:
        value = _num(ev.get("value"))
        if value is None:
            return
        self.metrics[(str(ev.get("model", "?")), str(ev.get("name", "?")))] = value
        self.metrics_version += 1

    def _on_checkpoint(self, ev: dict) -> None:
        if (ev.get("stage") or "finetune") == "finetune":
            self.last_checkpoint = ev.get("step")
        self._log(ev, "info", f"checkpoint at step {ev.get('step')}")

    def _on_stage_end(self, ev: dict) -> None:
        st = self.stage(ev.get("stage"))
        st.status = "done"
        st.seconds = _num(ev.get("seconds"))
        st.eta_s = None
        if st.unit == "steps" and st.total and st.done < st.total:
            # fine-tuning ended before its step limit: the steps done are the truth, not the limit
            last = self.eval_ppl[-1][1] if self.eval_ppl else None
            reached = last is not None and self.target_ppl is not None and last <= self.target_ppl
            st.note = "target" if reached else "early stop"
        elif st.total:
            st.done = st.total
        if self.current == st.name:
            self.current = None
        secs = f" in {st.seconds:.1f}s" if st.seconds is not None else ""
        self._log(ev, "info", f"stage {st.name} done{secs}")

    def _on_log(self, ev: dict) -> None:
        self._log(ev, str(ev.get("level", "info")), str(ev.get("message", "")))

    def _on_error(self, ev: dict) -> None:
        self.error = str(ev.get("message", "error"))
        if ev.get("stage"):
            self.stage(ev["stage"]).status = "failed"
        self._log(ev, "error", self.error)

    def _on_run_end(self, ev: dict) -> None:
        self.end_status = str(ev.get("status", "?"))
        for st in self.stages.values():
            if st.status == "running":
                st.status = "failed" if self.end_status == "failed" else ("stopped" if self.end_status == "stopped" else st.status)
        self._log(ev, "info", f"runner exited: {self.end_status}")

    def _on_runner_died(self, ev: dict) -> None:
        # the death record (a reader appends it): the run ended without a run_end
        self.end_status = record.DISCONNECTED
        self.error = str(ev.get("message", "runner died"))
        for st in self.stages.values():
            if st.status == "running":
                st.status = "died"
                st.eta_s = None
        self._log(ev, "error", self.error)

    def _on_gpu(self, ev: dict) -> None:
        rank = ev.get("rank", 0)
        self.gpus[rank if isinstance(rank, int) else 0] = ev

    # ---- derived views --------------------------------------------------------
    def ordered_stages(self) -> list[StageView]:
        """The record's stages in its order, then any other a log named. Before any run started
        all are shown (pending); after, a stage no run planned and no event named is left out (a
        session older than a stage the record gained, or a run of some stages only)."""
        # an optional stage (teacher correction, the control) shows once a run plans it and it is not off
        known = [self.stages[n] for n in record.STAGES if n in self.stages
                 and not (n in record.OPTIONAL_STAGES and self.stages[n].status == "off")]
        extra = [s for n, s in self.stages.items() if n not in record.STAGES]
        if self.runs:
            known = [s for s in known if s.name in self.planned]
        return known + extra

    def has_loss_parts(self) -> bool:
        return any(x is not None for x in self.kls) or any(x is not None for x in self.ces)

    def gpu_samples(self) -> list[dict]:
        """The newest sample of each rank, rank 0 first (none on a CPU run: `gpu` is CUDA-only)."""
        return [self.gpus[r] for r in sorted(self.gpus)]

    def metric(self, model: str, name: str) -> float | None:
        return self.metrics.get((model, name))

    def metric_names(self) -> list[str]:
        names = {n for (_, n) in self.metrics}
        return [n for n in METRIC_ORDER if n in names] + sorted(names - set(METRIC_ORDER))

    def rel_time(self, t: float | None) -> str:
        """Time since the first event, so logs read the same on every machine and zone."""
        if t is None or self.t0 is None:
            return "     "
        s = max(0, int(t - self.t0))
        h, rem = divmod(s, 3600)
        m, s = divmod(rem, 60)
        return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


# stages whose `train` events are not fine-tuning's: every record stage that trains besides
# finetune (a teacher correction before calibrate, the control after evaluate, where the record has
# them); the names are the record's, so an older record simply has none
_TRAINING = frozenset(n for n in getattr(record, "TRAINING_STAGES", ()) if n != "finetune")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


HANDLED = frozenset(name[len("_on_"):] for name in vars(RunView) if name.startswith("_on_"))


def delta(name: str, base: float | None, value: float | None) -> tuple[str, int]:
    """Text of the change from `base` to `value` and its sign for colouring (+1 good, -1 bad, 0
    neutral), the direction from the record (`lower_is_better`; neutral for sizes and counts)."""
    if base is None or value is None:
        return "", 0
    spec = record.METRICS.get(name)
    lower = spec.lower_is_better if spec else None
    sign = (lambda d: 0 if d == 0 or lower is None else (1 if (d < 0) == lower else -1))
    if spec is not None and spec.unit == "fraction":  # accuracies, coverage: percentage points
        d = (value - base) * 100
        return f"{d:+.1f} pp", sign(d)
    if base == 0:
        return "", 0
    rel = (value - base) / abs(base) * 100
    return f"{rel:+.1f}%", sign(rel)
