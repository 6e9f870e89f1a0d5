"""Small widgets: a text plot (loss / perplexity / GPU util) and a one-line title bar."""

from __future__ import annotations

import math
from typing import Sequence

from rich.text import Text
from textual.app import RenderResult
from textual.widget import Widget
from textual.content import Content
from textual.widgets import Checkbox, Static

BLOCKS = " ▁▂▃▄▅▆▇█"


def resample(values: Sequence[float], width: int) -> list[float]:
    """Mean of equal buckets so a 100k-step loss curve fits the width without aliasing;
    a short series is stretched into steps instead."""
    n = len(values)
    if n == 0:
        return []
    if n <= width:  # stretch short series into steps so they fill the plot
        return [values[i * n // width] for i in range(width)]
    out = []
    for i in range(width):
        a, b = i * n // width, max(i * n // width + 1, (i + 1) * n // width)
        chunk = values[a:b]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_lines(values: Sequence[float], width: int, height: int, label_width: int = 7,
               zero_based: bool = False, empty: str = "waiting for data") -> list[str]:
    """A column chart in `height` rows of eighth-blocks, with max/min labels on the left.
    `zero_based` starts the axis at 0 so bar heights compare (e.g. % removed per layer)."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if width <= label_width + 2 or height < 1:
        return []
    plot_w = width - label_width - 1
    if not vals:
        return [" " * label_width + "│" + f" {empty}".ljust(plot_w)[:plot_w]] + \
               [" " * label_width + "│" + " " * plot_w for _ in range(height - 1)]
    pts = resample(vals, plot_w)
    lo, hi = min(pts), max(pts)
    if zero_based:
        lo = min(0.0, lo)
    span = hi - lo or 1.0
    levels = [int(round((v - lo) / span * (height * 8 - 1))) + 1 if hi > lo else height * 4 for v in pts]
    rows = []
    for r in range(height):  # r = 0 is the top row
        floor = (height - 1 - r) * 8
        cells = "".join(BLOCKS[max(0, min(8, lv - floor))] for lv in levels)
        label = _short(hi) if r == 0 else (_short(lo) if r == height - 1 else "")
        rows.append(label.rjust(label_width)[:label_width] + "│" + cells.ljust(plot_w))
    return rows


def _short(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e4:
        return f"{v:.2g}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


class TextPlot(Widget):
    """A captioned column chart drawn with block characters; colours come from CSS, so it
    follows the theme and stays legible in the 16-colour theme."""

    DEFAULT_CSS = """
    TextPlot { height: 6; }
    """

    def __init__(self, caption: str = "", zero_based: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.caption = caption
        self.zero_based = zero_based
        self.values: list[float] = []
        self.empty = "waiting for data"

    def set_data(self, values: Sequence[float], caption: str, empty: str = "waiting for data") -> None:
        """`empty`: why there is nothing to draw (shown in the plot instead of the data)."""
        self.values = list(values)
        self.caption = caption
        self.empty = empty
        self.refresh()

    def render(self) -> RenderResult:
        w, h = self.content_size.width, self.content_size.height
        text = Text(no_wrap=True, overflow="crop")
        text.append(self.caption[:w], style="bold")
        for line in plot_lines(self.values, w, max(1, h - 1), zero_based=self.zero_based, empty=self.empty):
            text.append("\n" + line)
        return text


class TitleBar(Static):
    """One line: what this screen shows; replaces Header (no clock, so snapshots are stable)."""

    DEFAULT_CSS = """
    TitleBar { height: 1; background: $panel; color: $foreground; padding: 0 1; text-style: bold; }
    """


class Tick(Checkbox):
    """A checkbox whose two states differ by glyph, not only by colour: `[x]` on, `[ ]` off
    (Textual's draws `▐X▌` either way), readable in a plain capture or a 16-colour terminal."""

    @property
    def _button(self) -> Content:
        style = self.get_visual_style("toggle--button")
        return Content.assemble("[", ("x" if self.value else " ", style), "]")


def overlay_grid(series: list[tuple[str, str, list[tuple[float, float]]]], width: int, height: int,
                 refs: Sequence[tuple[str, str, float]] = (), label_width: int = 7,
                 empty: str = "no curves") -> list[list[tuple[str, str]]]:
    """Several (name, style, [(x, y)]) series on one pair of shared axes, as rows of
    (character, style) cells: y labels on the left, x from 0 to the largest x at the bottom.
    Each series is drawn with its own glyph (a style is "GLYPH colour"), interpolated across
    columns, the first series on top; `refs` are horizontal reference lines (label, style, y),
    drawn first so the runs stay on top of them."""
    plot_w, plot_h = width - label_width - 1, height - 1
    if plot_w < 4 or plot_h < 2:
        return []
    pts = [(x, y) for _, _, ser in series for x, y in ser if math.isfinite(y)]
    ys = [y for _, y in pts] + [y for _, _, y in refs if math.isfinite(y)]
    grid = [[(" ", "")] * plot_w for _ in range(plot_h)]
    rows: list[list[tuple[str, str]]] = []
    if not pts:
        msg = f" {empty}"[:plot_w]
        grid[0] = [(c, "") for c in msg.ljust(plot_w)]
        lo = hi = 0.0
        xmax = 0.0
    else:
        lo, hi = min(ys), max(ys)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        xmax = max(x for x, _ in pts) or 1.0
        row_of = lambda y: max(0, min(plot_h - 1, int(round((hi - y) / (hi - lo) * (plot_h - 1)))))  # noqa: E731
        for _label, style, y in refs:
            if math.isfinite(y):
                r = row_of(y)
                grid[r] = [("─", style) if c == " " else (c, s) for c, s in grid[r]]
        for _name, style, ser in reversed(series):  # the first series is drawn last: on top
            glyph, colour = style.split(" ", 1) if " " in style else ("•", style)
            good = sorted((x, y) for x, y in ser if math.isfinite(y))
            if not good:
                continue
            col_of = lambda x: max(0, min(plot_w - 1, int(round(x / xmax * (plot_w - 1)))))  # noqa: E731
            cols = [(col_of(x), y) for x, y in good]
            if len(cols) == 1:
                grid[row_of(cols[0][1])][cols[0][0]] = (glyph, colour)
                continue
            for (c0, y0), (c1, y1) in zip(cols, cols[1:]):
                for c in range(c0, max(c0, c1) + 1):
                    y = y0 if c1 == c0 else y0 + (y1 - y0) * (c - c0) / (c1 - c0)
                    grid[row_of(y)][c] = (glyph, colour)
    for r in range(plot_h):
        label = _short(hi) if (r == 0 and pts) else (_short(lo) if (r == plot_h - 1 and pts) else "")
        rows.append([(ch, "") for ch in label.rjust(label_width)[:label_width]] + [("│", "")] + grid[r])
    foot = " " * label_width + "└" + ("0" + f"step {xmax:g}".rjust(plot_w - 1) if pts else "─" * plot_w)
    rows.append([(ch, "") for ch in foot[:width]])
    return rows


class OverlayPlot(Widget):
    """Runs overlaid on shared axes: each series in its own colour and glyph (the legend line
    under the caption names them), reference lines (the baseline) pinned first. Used by
    Compare (loss and held-out ppl of the marked runs) and by the monitor (loss with its KL
    and CE parts)."""

    DEFAULT_CSS = """
    OverlayPlot { height: 8; }
    """

    def __init__(self, caption: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.caption = caption
        self.series: list[tuple[str, str, list[tuple[float, float]]]] = []
        self.refs: list[tuple[str, str, float]] = []
        self.empty = "no curves"

    def set_data(self, series: list[tuple[str, str, list[tuple[float, float]]]], caption: str,
                 refs: Sequence[tuple[str, str, float]] = (), empty: str = "no curves") -> None:
        """`series`: (name, "GLYPH colour", [(x, y)]); `refs`: (label, colour, y)."""
        self.series, self.caption, self.refs, self.empty = list(series), caption, list(refs), empty
        self.refresh()

    def legend(self) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        for label, style, y in self.refs:
            text.append("── ", style=style)
            text.append(f"{label}  ")
        for name, style, ser in self.series:
            glyph, colour = style.split(" ", 1) if " " in style else ("•", style)
            text.append(glyph + " ", style=colour)
            last = next((y for _, y in reversed(ser) if math.isfinite(y)), None)
            text.append(f"{name}{'' if last is None else ' ' + _short(last)}  ")
        return text

    def render(self) -> RenderResult:
        w, h = self.content_size.width, self.content_size.height
        text = Text(no_wrap=True, overflow="crop")
        text.append(self.caption[:w], style="bold")
        legend = self.legend()
        legend.truncate(w, overflow="ellipsis")
        text.append("\n")
        text.append_text(legend)
        for row in overlay_grid(self.series, w, max(3, h - 2), self.refs, empty=self.empty):
            text.append("\n")
            for ch, style in row:
                text.append(ch, style=style or None)
        return text
