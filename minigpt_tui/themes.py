"""Themes from TOML files in `themes/` (or $MINIGPT_THEMES), mapped onto `textual.theme.Theme`.

A file holds the Theme fields at the top level and an optional [variables] table:

    name = "minigpt-dark"
    dark = true
    primary = "#4aa3ff"
    [variables]
    footer-key-foreground = "#4aa3ff"

A broken file is reported and skipped; it never stops the app from starting.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import fields
from pathlib import Path

from textual.color import ColorParseError
from textual.theme import Theme

THEMES_DIR = Path(__file__).resolve().parent.parent / "themes"
DEFAULT_THEME = "minigpt-dark"
_FIELDS = {f.name for f in fields(Theme)}


def themes_dir() -> Path:
    return Path(os.environ.get("MINIGPT_THEMES", THEMES_DIR))


def load_theme_file(path: Path) -> Theme:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (valid: {', '.join(sorted(_FIELDS))})")
    if "primary" not in data:
        raise ValueError("missing key 'primary'")
    data.setdefault("name", path.stem)
    theme = Theme(**data)
    theme.to_color_system()  # parse every colour now, so a typo fails here and not mid-render
    return theme


def load_themes(directory: Path | None = None) -> tuple[list[Theme], list[str]]:
    """All themes in the folder, sorted by file name, and one message per broken file."""
    directory = Path(directory or themes_dir())
    themes, errors = [], []
    if not directory.is_dir():
        return themes, [f"theme folder {directory} not found"]
    for path in sorted(directory.glob("*.toml")):
        try:
            themes.append(load_theme_file(path))
        except (OSError, ValueError, TypeError, ColorParseError, tomllib.TOMLDecodeError) as e:
            errors.append(f"theme {path.name}: {e}")
    return themes, errors
