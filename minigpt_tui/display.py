"""Rendering engine events in a terminal: rich progress on a TTY, plain lines otherwise.

The same renderer serves `minigpt run --foreground` (events straight from the pipeline)
and `minigpt run` / `logs -f` (events tailed from events.jsonl), so both look alike. One
`_on_<kind>` method per event kind of the run record (`engine.run.record.KINDS`; `HANDLED`
lists them); kinds it does not know are ignored.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from engine.run import record

from .data import fmt_gpu, fmt_rate


def layer_table(report: dict) -> Table:
    t = Table(title=f"pruning report ({report.get('mode')})", show_lines=False)
    for col in ("module", "neurons before", "after", "params before", "after", "% removed"):
        t.add_column(col, justify="left" if col == "module" else "right", no_wrap=True)
    for r in report.get("rows", []):
        t.add_row(r["module"], str(r["neurons_before"]), str(r["neurons_after"]), f"{r['params_before']:,}",
                  f"{r['params_after']:,}", f"{r['pct_removed']:.1f}")
    tot = report.get("totals", {})
    if tot:
        t.add_row("[b]total (whole model)[/b]", str(tot.get("neurons_before", "")), str(tot.get("neurons_after", "")),
                  f"{tot['params_before']:,}", f"{tot['params_after']:,}", f"{tot['pct_removed']:.2f}")
    return t


class Display:
    """Callable sink for events."""

    def __init__(self, console: Console | None = None, plain: bool | None = None):
        self.console = console or (Console(stderr=False) if sys.stdout.isatty() else plain_console())
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self.progress = None
        self.tasks: dict[str, int] = {}
        self._last_plain = 0.0

    def _bar(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                                     TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.progress.start()
        return self.progress

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.tasks = {}  # ids of the stopped bars: a resumed run (or the next one) starts new bars

    def __call__(self, e: dict) -> None:
        kind = e.get("type")
        if kind in HANDLED:
            getattr(self, "_on_" + kind)(e)

    @property
    def out(self) -> Console:
        """Lines go above the live bars while there are any."""
        return self.progress.console if self.progress else self.console

    def _on_run_start(self, e: dict) -> None:
        verb = "resumed" if e.get("resumed") else "started"
        self.out.print(f"[bold]run {verb}[/] (pid {e.get('pid')}): {' → '.join(map(str, e.get('stages') or []))}",
                       highlight=False)

    def _on_progress(self, e: dict) -> None:
        stage, unit = e.get("stage", "?"), e.get("unit", "")
        label = f"{stage} {e['phase']}" if e.get("phase") else stage
        if self.plain:
            now = time.monotonic()
            if now - self._last_plain >= 5 or e.get("done") == e.get("total"):
                self._last_plain = now
                eta = e.get("eta_s")
                self.console.print(f"\\[{label}] {e.get('done'):,}/{e.get('total'):,} {unit}  "
                                   f"{fmt_rate(e.get('rate'), unit, compact=False)}" + (f"  ETA {eta:.0f}s" if eta else ""),
                                   highlight=False)
            return
        bar = self._bar()
        if stage not in self.tasks:
            self.tasks[stage] = bar.add_task(label, total=e.get("total") or 1, rate="")
        bar.update(self.tasks[stage], description=label, completed=e.get("done", 0), total=e.get("total") or 1,
                   rate=fmt_rate(e.get("rate"), unit, compact=False))

    def _on_train(self, e: dict) -> None:
        if self.plain or e.get("step", 0) % 10 == 0:
            self.out.print(f"\\[finetune] step {e.get('step')}/{e.get('total_steps')} loss {e.get('loss', 0):.4f} "
                           f"lr {e.get('lr', 0):.2e} {e.get('tokens_per_s', 0):,.0f} tok/s", highlight=False)

    def _on_stage_start(self, e: dict) -> None:
        self.out.print(f"[bold cyan]▶ {e['stage']}[/]")

    def _on_stage_end(self, e: dict) -> None:
        self.out.print(f"[green]✓ {e['stage']}[/] ({e.get('seconds', 0):.1f} s)")

    def _on_stage_skip(self, e: dict) -> None:
        self.out.print(f"[dim]↷ {e['stage']} ({e.get('reason')})[/]")

    def _on_log(self, e: dict) -> None:
        level = e.get("level", "info")
        prefix = "" if level == "info" else f"[{'red' if level == 'error' else 'yellow'}]{level}:[/] "
        self.out.print(f"  {prefix}{escape(str(e.get('message')))}", highlight=False)

    def _on_metric(self, e: dict) -> None:
        v = e.get("value")
        spec = record.METRICS.get(str(e.get("name")))
        if isinstance(v, float) and spec and spec.unit == "tokens/s":
            vs = f"{v:,.0f}"
        else:
            vs = f"{v:,.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
        unit = f" {spec.unit}" if spec and spec.unit and spec.unit != "fraction" else ""
        reused = f" [dim](reused from {e['reused_from']})[/]" if e.get("reused_from") else ""
        self.out.print(f"  {e.get('model')} {e.get('name')} = [bold]{vs}[/]{unit}{reused}", highlight=False)

    def _on_eval(self, e: dict) -> None:
        target = e.get("target_ppl")
        self.out.print(f"  \\[finetune] step {e.get('step')}: held-out ppl {e.get('ppl'):.3f}"
                       + (f" (target {target:.3f})" if isinstance(target, (int, float)) else ""), highlight=False)

    def _on_layer_report(self, e: dict) -> None:
        self.out.print(layer_table(e))

    def _on_checkpoint(self, e: dict) -> None:
        self.out.print(f"  [dim]checkpoint at step {e.get('step')}[/]")

    def _on_error(self, e: dict) -> None:
        self.out.print(f"[red]error: {escape(str(e.get('message')))}[/]", highlight=False)

    def _on_gpu(self, e: dict) -> None:
        self.out.print(f"  [dim]{fmt_gpu(e, with_rank=True)}[/]", highlight=False)

    def _on_runner_died(self, e: dict) -> None:
        self.close()
        self.console.print(f"[bold red]{escape(str(e.get('message')))}[/]", highlight=False)

    def _on_run_end(self, e: dict) -> None:
        self.close()
        self.console.print(f"[bold]run {e.get('status')}[/]")


HANDLED = frozenset(name[len("_on_"):] for name in vars(Display) if name.startswith("_on_"))


def plain_console() -> Console:
    return Console(file=sys.stdout, force_terminal=False, no_color=True, width=120, soft_wrap=True)


def sessions_table(rows: list[dict], root) -> Table:
    """`minigpt sessions`: fits 80 columns (short names, one line per session), the absolute root
    in the title."""
    from rich import box

    from .data import short_method, short_source

    t = Table(title=f"sessions in {root}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
              show_edge=False, collapse_padding=True)
    t.add_column("id", no_wrap=True, overflow="ellipsis", max_width=26)
    t.add_column("model · domain", no_wrap=True, overflow="ellipsis", max_width=22)
    t.add_column("method", no_wrap=True, overflow="ellipsis", max_width=20)
    t.add_column("status", no_wrap=True)
    t.add_column("updated", no_wrap=True)
    for r in rows:
        upd = time.strftime("%m-%d %H:%M", time.localtime(r["updated"])) if r.get("updated") else ""
        status = str(r.get("status"))
        if r.get("stage") and status not in ("done",):
            status += f" ({r['stage']})"
        t.add_row(r["id"], f"{short_source(r.get('model'))} · {short_source(r.get('domain'))}",
                  short_method(r), status, upd)
    return t
