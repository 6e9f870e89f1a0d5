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
