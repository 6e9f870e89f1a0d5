"""Theme-aware Rich styles for table cells (DataTable cells are Rich text, not CSS)."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.app import App
from textual.color import Color, ColorParseError

STATUS_VAR = {
    "running": "accent",
    "starting": "accent",
    "stopping": "warning",
    "stopped": "warning",
    "failed": "error",
    "corrupt": "error",
    "disconnected": "error",
    "died": "error",
    "done": "success",
    "new": "secondary",
    "pending": "foreground",
    "skipped": "secondary",
    "off": "secondary",
}


def theme_style(app: App, var: str, bold: bool = False) -> Style:
    value = app.theme_variables.get(var) if app.theme_variables else None
    if not value:
        return Style(bold=bold)
    try:
        return Style(color=Color.parse(value).rich_color, bold=bold)
    except (ColorParseError, ValueError):
        return Style(bold=bold)


def status_text(app: App, status: str, label: str | None = None, bold: bool = False) -> Text:
    style = theme_style(app, STATUS_VAR.get(status, "foreground"), bold=bold or status == "running")
    return Text(label if label is not None else status, style=style)


def signed_text(app: App, text: str, sign: int) -> Text:
    var = "success" if sign > 0 else ("error" if sign < 0 else "foreground")
    return Text(text, style=theme_style(app, var))
