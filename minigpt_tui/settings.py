"""The app's remembered choices (theme, last sessions root, screenshot folder) in a small TOML
file in the user's config folder: `$MINIGPT_CONFIG_DIR`, else platformdirs'
`user_config_dir("minigpt")` (Textual depends on platformdirs), else `$XDG_CONFIG_HOME/minigpt`
or `~/.config/minigpt`. Unreadable or unwritable files are ignored: never a crash."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

FILE = "tui.toml"
KEYS = ("theme", "root", "screenshots")


def config_dir() -> Path:
    if os.environ.get("MINIGPT_CONFIG_DIR"):
        return Path(os.environ["MINIGPT_CONFIG_DIR"])
    try:
        from platformdirs import user_config_dir

        return Path(user_config_dir("minigpt"))
    except ImportError:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "minigpt"


def path() -> Path:
    return config_dir() / FILE


def load() -> dict[str, str]:
    try:
        data = tomllib.loads(path().read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}
    return {k: str(v) for k, v in data.items() if k in KEYS and isinstance(v, str)}


def save(**changes: str) -> str | None:
    """Merge `changes` into the file; returns a problem line if it could not be written."""
    import tomli_w

    from engine import atomic

    data = {**load(), **{k: str(v) for k, v in changes.items() if k in KEYS and v is not None}}
    try:
        path().parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path(), tomli_w.dumps(data))
    except OSError as e:
        return f"cannot save settings to {path()}: {e.strerror or e}"
    return None
