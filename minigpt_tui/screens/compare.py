"""Compare: several sessions side by side (size, % removed, perplexities, MCQ accuracy),
sortable by any column, exported to CSV or Markdown with an atomic write."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from engine import atomic
from engine.run import record
from engine.run import session as session_mod
from engine.errors import MinigptError

from ..data import (COLUMN_METRICS, COMPARE_COLUMNS, compare_row, format_cell, short_source, sort_key, to_csv,
                    to_markdown)
from ..messages import CompareLoaded
from ..styles import theme_style
from ..widgets import TitleBar

if TYPE_CHECKING:
    from ..app import MinigptApp

WIDE_ENOUGH = 180  # columns needed to show one row per session without scrolling


def lower_is_better(key: str) -> bool | None:
    """Which way a column is better: its metric's direction in the run record; more removed is
    better; None for the rest (no best cell marked)."""
    if key == "pct_removed":
        return False
    metric = COLUMN_METRICS.get(key)
    return record.METRICS[metric[1]].lower_is_better if metric else None


class CompareScreen(Screen):
    """Sessions side by side. Terminals narrower than the full table start transposed (one
    column per session);
    s sorts the sessions by the field under the cursor (again: reverse) in either layout."""

    HELP = ("Sessions side by side. Put the cursor on a field and press s to sort the sessions by it "
            "(again to reverse), or click a column header. t swaps rows and columns. "
            "e writes CSV, m writes Markdown, under <root>/exports/.")
    BINDINGS = [
        Binding("escape", "back", "Back", id="compare.back"),
        Binding("s", "sort", "Sort", id="compare.sort"),
        Binding("t", "transpose", "Transpose", id="compare.transpose"),
        Binding("e", "export('csv')", "CSV", id="compare.export_csv"),
        Binding("m", "export('md')", "Markdown", id="compare.export_md"),
    ]

    app: "MinigptApp"

    def __init__(self, paths: list[Path]) -> None:
        super().__init__()
        self.paths = [Path(p) for p in paths]
        self.rows: list[dict] = []
        self.sort_by: str | None = None
        self.reverse = False
        self.transposed: bool | None = None  # decided on mount from the terminal width
        self.loaded = False
        self.last_export: Path | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar(f"minigpt · compare {len(self.paths)} sessions", id="title")
        yield DataTable(id="compare-table", cursor_type="cell", zebra_stripes=True)
        yield Static("", id="compare-note", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        if self.transposed is None:
            self.transposed = self.app.size.width < WIDE_ENOUGH
        self._load(self.paths)
        self.app.theme_changed_signal.subscribe(self, lambda _t: self._render_table())

    @work(thread=True, exclusive=True, group="compare-load", exit_on_error=False)
    def _load(self, paths: list[Path]) -> None:
        rows, errors = [], []
        for p in paths:
            try:
                rows.append(compare_row(session_mod.Session(p)))
            except (OSError, MinigptError) as e:
                errors.append(f"{p.name}: {e}")
        self.post_message(CompareLoaded(rows, errors))

    def on_compare_loaded(self, msg: CompareLoaded) -> None:
        self.rows = msg.rows
        self.loaded = True
        for err in msg.errors:
            self.notify(err, severity="error")
        self._render_table()

    # ---- table -----------------------------------------------------------------
    def sorted_rows(self) -> list[dict]:
        if not self.sort_by:
            return list(self.rows)
        kind = next(k for key, _, k in COMPARE_COLUMNS if key == self.sort_by)
        keyf = sort_key(kind)
        present = [r for r in self.rows if r.get(self.sort_by) is not None]
        missing = [r for r in self.rows if r.get(self.sort_by) is None]
        return sorted(present, key=lambda r: keyf(r.get(self.sort_by)), reverse=self.reverse) + missing

    def _best(self) -> dict[str, float]:
        best = {}
        for key, _, kind in COMPARE_COLUMNS:
            vals = [r[key] for r in self.rows if isinstance(r.get(key), (int, float))]
            lower = lower_is_better(key)
            if len(set(vals)) >= 2 and lower is not None:
                best[key] = min(vals) if lower else max(vals)
        return best

    def _cell(self, key: str, kind: str, value, best: dict) -> Text | str:
        text = format_cell(kind, value)
        if key in ("model", "domain"):
            text = short_source(text)
        if key in best and value == best[key]:
            return Text(text, style=theme_style(self.app, "success", bold=True))
        return escape(text)

    def _render_table(self) -> None:
        table = self.query_one(DataTable)
        cursor = table.cursor_coordinate
        table.clear(columns=True)
        rows = self.sorted_rows()
        best = self._best()
        if self.transposed:
            table.add_column("", key="field")
            for r in rows:
                table.add_column(escape(r["id"]), key=r["id"])
            for key, label, kind in COMPARE_COLUMNS[1:]:
                mark = (" ▼" if self.reverse else " ▲") if key == self.sort_by else ""
                table.add_row(label + mark, *[self._cell(key, kind, r.get(key), best) for r in rows], key=key)
        else:
            for key, label, _ in COMPARE_COLUMNS:
                mark = ""
                if key == self.sort_by:
                    mark = " ▼" if self.reverse else " ▲"
                table.add_column(label + mark, key=key)
            for r in rows:
                table.add_row(*[self._cell(key, kind, r.get(key), best) for key, _, kind in COMPARE_COLUMNS],
                              key=r["id"])
        if table.row_count:
            table.move_cursor(row=min(cursor.row, table.row_count - 1),
                              column=min(cursor.column, len(table.columns) - 1), animate=False)
        self._update_note()

    def _update_note(self) -> None:
        parts = [f"{len(self.rows)} sessions"]
        if self.sort_by:
            label = next(lbl for key, lbl, _ in COMPARE_COLUMNS if key == self.sort_by)
            parts.append(f"sorted by {label} ({'descending' if self.reverse else 'ascending'})")
        if self.last_export:
            parts.append(f"exported to {self.last_export}")
        self.query_one("#compare-note", Static).update(" · ".join(parts))

    # ---- actions ---------------------------------------------------------------
    def sort_by_column(self, key: str) -> None:
        if key not in {k for k, _, _ in COMPARE_COLUMNS}:
            return
        if self.sort_by == key:
            self.reverse = not self.reverse
        else:
            self.sort_by, self.reverse = key, False
        self._render_table()

    def action_sort(self) -> None:
        table = self.query_one(DataTable)
        if self.transposed:  # rows are fields: sort the session columns by the cursor's row
            row = table.cursor_coordinate.row
            self.sort_by_column(COMPARE_COLUMNS[1:][row][0])
        else:
            self.sort_by_column(COMPARE_COLUMNS[table.cursor_coordinate.column][0])

    @on(DataTable.HeaderSelected)
    def _header(self, event: DataTable.HeaderSelected) -> None:
        if not self.transposed and event.column_key.value:
            self.sort_by_column(event.column_key.value)

    def action_transpose(self) -> None:
        self.transposed = not self.transposed
        self._render_table()

    def export_path(self, ext: str) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.app.clock()))
        return Path(self.app.root) / "exports" / f"compare-{stamp}.{ext}"

    def action_export(self, fmt: str) -> None:
        rows = self.sorted_rows()
        path = self.export_path("csv" if fmt == "csv" else "md")
        try:
            atomic.write_text(path, to_csv(rows) if fmt == "csv" else to_markdown(rows))
        except OSError as e:
            self.notify(f"cannot write {path}: {e}", severity="error")
            return
        self.last_export = path
        self._update_note()
        self.notify(f"Wrote {path}")

    def action_back(self) -> None:
        self.app.pop_screen()

    def palette_commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        cmds: list[tuple[str, str, Callable[[], object]]] = [
            ("export: CSV", "Write the comparison as CSV under the session root", lambda: self.action_export("csv")),
            ("export: Markdown", "Write the comparison as a Markdown table", lambda: self.action_export("md")),
            ("view: transpose", "Swap rows and columns", self.action_transpose),
        ]
        for key, label, _ in COMPARE_COLUMNS:
            cmds.append((f"sort: {label}", f"Sort sessions by {label}", lambda k=key: self.sort_by_column(k)))
        return cmds
