"""Compare: several sessions side by side (size, % removed, perplexities, MCQ accuracy),
sortable by any column, and their curves overlaid on shared axes (fine-tuning loss and
held-out perplexity, one stable colour and glyph per run, the base model's perplexity pinned
as the reference line). Exports (atomic writes): the table as CSV or Markdown, the curves as
an SVG, or all three with one key."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from engine import atomic
from engine.run import record
from engine.run import session as session_mod
from engine.errors import MinigptError

from ..data import (BASE_STYLE, COLUMN_METRICS, COMPARE_COLUMNS, compare_row, curves_svg, format_cell,
                    session_curves, short_source, sort_key, stable_styles, to_csv, to_markdown)
from ..messages import CompareLoaded
from ..styles import theme_style
from ..widgets import OverlayPlot, TitleBar

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
            "1 shows the table, 2 the curves: fine-tuning loss and held-out perplexity of every run on "
            "shared axes, each run in its own colour and glyph (the same run keeps its colour), the base "
            "model's perplexity as the pinned reference line. 'held-out ∩ ft' is the share of the held-out "
            "text's 13-word windows found in the fine-tune split: where it is high, bits per byte after "
            "recovery reward recall of that text. x writes the table (CSV and Markdown) and "
            "the curves (SVG) under <root>/exports/ at once; e, m and p write one of them.")
    BINDINGS = [
        Binding("escape", "back", "Back", id="compare.back"),
        Binding("1", "tab('table')", "Table", id="compare.tab_table"),
        Binding("2", "tab('curves')", "Curves", id="compare.tab_curves"),
        Binding("s", "sort", "Sort", id="compare.sort"),
        Binding("t", "transpose", "Transpose", id="compare.transpose"),
        Binding("x", "export_all", "Export all", id="compare.export_all"),
        Binding("e", "export('csv')", "CSV", show=False, id="compare.export_csv"),
        Binding("m", "export('md')", "Markdown", show=False, id="compare.export_md"),
        Binding("p", "export('svg')", "SVG", show=False, id="compare.export_svg"),
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
        self.curves: dict[str, dict] = {}
        self.run_styles: dict[str, tuple[str, str, str]] = {}

    def compose(self) -> ComposeResult:
        root = Path(self.app.root).resolve()
        yield TitleBar(f"minigpt · compare {len(self.paths)} sessions in {root}", id="title")
        with TabbedContent(initial="table", id="compare-tabs"):
            with TabPane("Table", id="table"):
                yield DataTable(id="compare-table", cursor_type="cell", zebra_stripes=True)
            with TabPane("Curves", id="curves"):
                with Vertical(id="compare-plots"):
                    yield OverlayPlot("fine-tuning loss", id="compare-loss")
                    yield OverlayPlot("held-out perplexity", id="compare-ppl")
        yield Static("", id="compare-note", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        if self.transposed is None:
            self.transposed = self.app.size.width < WIDE_ENOUGH
        self._load(self.paths)
        self.app.theme_changed_signal.subscribe(self, lambda _t: self._render_table())

    @work(thread=True, exclusive=True, group="compare-load", exit_on_error=False)
    def _load(self, paths: list[Path]) -> None:
        rows, errors, curves = [], [], {}
        for p in paths:
            try:
                s = session_mod.Session(p)
                row = compare_row(s)
                rows.append(row)
                curves[row["id"]] = session_curves(s)
            except (OSError, MinigptError) as e:
                errors.append(f"{p.name}: {e}")
        self.post_message(CompareLoaded(rows, errors, curves))

    def on_compare_loaded(self, msg: CompareLoaded) -> None:
        self.rows = msg.rows
        self.curves = msg.curves
        self.run_styles = stable_styles([r["id"] for r in self.rows])
        for err in msg.errors:
            self.notify(err, severity="error")
        self._render_table()
        self._render_curves()
        # loaded once the table has measured its cells and been painted: DataTable sizes its
        # columns on its own idle, which only comes once something reaches its queue, so
        # call_next (run after that idle; it prompts one) and then wait for the paint. A reader of
        # `loaded` (tests, snapshots) never sees columns sized by their headers alone.
        self.query_one(DataTable).call_next(self.call_after_refresh, self._mark_loaded)

    def _mark_loaded(self) -> None:
        self.loaded = True

    # ---- curves ------------------------------------------------------------------
    def _series(self, key: str) -> list[tuple[str, str, list]]:
        out = []
        for r in self.sorted_rows():
            colour, _svg, glyph = self.run_styles[r["id"]]
            out.append((r["id"], f"{glyph} {colour}", (self.curves.get(r["id"]) or {}).get(key) or []))
        return out

    def base_refs(self) -> list[tuple[str, str, float]]:
        """The unpruned models' held-out perplexity: one pinned line per distinct base."""
        bases = sorted({round(c["base_ppl"], 4) for c in self.curves.values()
                        if isinstance(c.get("base_ppl"), (int, float))})
        return [(f"base {b:.2f}", BASE_STYLE[0], b) for b in bases]

    def _render_curves(self) -> None:
        loss = self._series("loss")
        steps = max((x for _, _, ser in loss for x, _ in ser), default=0)
        self.query_one("#compare-loss", OverlayPlot).set_data(
            loss, f"fine-tuning loss by step (shared axes{f', 0–{steps:g}' if steps else ''})",
            empty="no fine-tuning steps in these runs")
        ppl = self._series("ppl")
        self.query_one("#compare-ppl", OverlayPlot).set_data(
            ppl, "held-out perplexity by step (step 0: pruned; the base model pinned)", self.base_refs(),
            empty="no held-out evaluations in these runs")

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

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

    def _cell(self, key: str, kind: str, value, best: dict) -> Text:
        text = format_cell(kind, value)
        if key in ("model", "domain"):
            text = short_source(text)
        if key in best and value == best[key]:
            return Text(text, style=theme_style(self.app, "success", bold=True))
        return Text(text)

    def _render_table(self) -> None:
        table = self.query_one(DataTable)
        cursor = table.cursor_coordinate
        table.clear(columns=True)
        rows = self.sorted_rows()
        best = self._best()

        def marked(key: str, label: str) -> Text:
            return Text(label + ((" ▼" if self.reverse else " ▲") if key == self.sort_by else ""))

        if self.transposed:
            header = [("field", Text(""))] + [(r["id"], Text(r["id"])) for r in rows]
            body = [(key, [marked(key, label)] + [self._cell(key, kind, r.get(key), best) for r in rows])
                    for key, label, kind in COMPARE_COLUMNS[1:]]
        else:
            header = [(key, marked(key, label)) for key, label, _ in COMPARE_COLUMNS]
            body = [(r["id"], [self._cell(key, kind, r.get(key), best) for key, _, kind in COMPARE_COLUMNS])
                    for r in rows]
        # each column as wide as its widest cell, given up front: left to DataTable, the widths
        # wait for its idle, and a paint before that left a stale zero-width column in its cache
        for i, (key, label) in enumerate(header):
            table.add_column(label, key=key, width=max([label.cell_len] + [cells[i].cell_len for _, cells in body]))
        for key, cells in body:
            table.add_row(*cells, key=key)
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
        self._render_curves()  # the legend follows the table's order; the colours stay

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
        return Path(self.app.root).resolve() / "exports" / f"compare-{stamp}.{ext}"

    def export_text(self, fmt: str) -> str:
        rows = self.sorted_rows()
        if fmt == "csv":
            return to_csv(rows)
        if fmt == "md":
            return to_markdown(rows)
        ordered = {r["id"]: self.curves.get(r["id"]) or {} for r in rows}
        return curves_svg(ordered, {i: self.run_styles[i] for i in ordered},
                          title=f"minigpt compare: {len(rows)} runs")

    def _write(self, fmts: tuple[str, ...]) -> list[Path]:
        written = []
        for fmt in fmts:
            path = self.export_path(fmt)
            try:
                atomic.write_text(path, self.export_text(fmt))
            except OSError as e:
                self.notify(f"cannot write {path}: {getattr(e, 'strerror', None) or e}", severity="error")
                break
            written.append(path)
        if written:
            self.last_export = written[0] if len(written) == 1 else written[0].with_suffix(".{csv,md,svg}")
            self._update_note()
        return written

    def action_export(self, fmt: str) -> None:
        written = self._write((fmt,))
        if written:
            self.notify(f"Wrote {written[0]}")

    def action_export_all(self) -> None:
        """The table (CSV, Markdown) and the curves (SVG) under <root>/exports/, one stamp."""
        written = self._write(("csv", "md", "svg"))
        if written:
            self.notify(f"Wrote {len(written)} files: {written[0].parent}/" + ", ".join(p.name for p in written),
                        title="Exported", timeout=8)

    def action_back(self) -> None:
        self.app.pop_screen()

    def palette_commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        cmds: list[tuple[str, str, Callable[[], object]]] = [
            ("export: CSV", "Write the comparison as CSV under the session root", lambda: self.action_export("csv")),
            ("export: Markdown", "Write the comparison as a Markdown table", lambda: self.action_export("md")),
            ("export: SVG plots", "Write the overlaid curves as an SVG", lambda: self.action_export("svg")),
            ("export: all", "Write CSV, Markdown and the SVG plots at once", self.action_export_all),
            ("view: curves", "Show the overlaid loss and perplexity curves", lambda: self.action_tab("curves")),
            ("view: table", "Show the comparison table", lambda: self.action_tab("table")),
            ("view: transpose", "Swap rows and columns", self.action_transpose),
        ]
        for key, label, _ in COMPARE_COLUMNS:
            cmds.append((f"sort: {label}", f"Sort sessions by {label}", lambda k=key: self.sort_by_column(k)))
        return cmds
