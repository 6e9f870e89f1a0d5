"""Rendering engine events in a terminal: rich progress on a TTY, plain lines otherwise.

The same renderer serves `minigpt run --foreground` (events straight from the pipeline)
and `minigpt run` / `logs -f` (events tailed from events.jsonl), so both look alike.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table


def _fmt_rate(rate, unit) -> str:
    return f"{rate:,.0f} {unit}/s" if rate else ""


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

    def __call__(self, e: dict) -> None:
        kind = e.get("type")
        c = self.console
        if kind == "progress":
            stage, unit = e.get("stage", "?"), e.get("unit", "")
            if self.plain:
                now = time.monotonic()
                if now - self._last_plain >= 5 or e.get("done") == e.get("total"):
                    self._last_plain = now
                    eta = e.get("eta_s")
                    c.print(f"\\[{stage}] {e.get('done'):,}/{e.get('total'):,} {unit}  {_fmt_rate(e.get('rate'), unit)}"
                            + (f"  ETA {eta:.0f}s" if eta else ""), highlight=False)
                return
            bar = self._bar()
            if stage not in self.tasks:
                self.tasks[stage] = bar.add_task(stage, total=e.get("total") or 1, rate="")
            bar.update(self.tasks[stage], completed=e.get("done", 0), total=e.get("total") or 1,
                       rate=_fmt_rate(e.get("rate"), unit))
            return
        if kind == "train":
            if self.plain or e.get("step", 0) % 10 == 0:
                msg = (f"\\[finetune] step {e.get('step')}/{e.get('total_steps')} loss {e.get('loss', 0):.4f} "
                       f"lr {e.get('lr', 0):.2e} {e.get('tokens_per_s', 0):,.0f} tok/s")
                (c.print if self.plain else (self.progress.console.print if self.progress else c.print))(msg, highlight=False)
            return
        out = self.progress.console if self.progress else c
        if kind == "stage_start":
            out.print(f"[bold cyan]▶ {e['stage']}[/]")
        elif kind == "stage_end":
            out.print(f"[green]✓ {e['stage']}[/] ({e.get('seconds', 0):.1f} s)")
        elif kind == "stage_skip":
            out.print(f"[dim]↷ {e['stage']} ({e.get('reason')})[/]")
        elif kind == "log":
            out.print(f"  {e.get('message')}", highlight=False)
        elif kind == "metric":
            v = e.get("value")
            vs = f"{v:,.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)
            out.print(f"  {e.get('model')} {e.get('name')} = [bold]{vs}[/]")
        elif kind == "eval":
            out.print(f"  \\[finetune] step {e.get('step')}: held-out ppl {e.get('ppl'):.3f}")
        elif kind == "layer_report":
            out.print(layer_table(e))
        elif kind == "checkpoint":
            out.print(f"  [dim]checkpoint at step {e.get('step')}[/]")
        elif kind == "error":
            out.print(f"[red]error: {e.get('message')}[/]", highlight=False)
        elif kind == "run_end":
            self.close()
            c.print(f"[bold]run {e.get('status')}[/]")


def plain_console() -> Console:
    return Console(file=sys.stdout, force_terminal=False, no_color=True, width=120, soft_wrap=True)
