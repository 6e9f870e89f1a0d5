"""Fixtures for the TUI tests: isolated session roots, a fixed clock, no cursor blink,
and the runner boundary (`engine.run.launch.launch_detached` / `request_stop`) mocked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tui_helpers import NOW, FakeRunner, FixedProbe  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch, tmp_path_factory):
    """No blinking cursor, no animations, no user theme choice: snapshots are stable."""
    from textual.widgets import Input

    monkeypatch.setattr(Input, "_toggle_cursor", lambda self: None)
    monkeypatch.setenv("TEXTUAL_ANIMATIONS", "none")
    monkeypatch.delenv("MINIGPT_THEME", raising=False)
    monkeypatch.delenv("MINIGPT_THEMES", raising=False)
    monkeypatch.delenv("MINIGPT_SESSIONS", raising=False)
    monkeypatch.delenv("MINIGPT_SCREENSHOTS", raising=False)
    # remembered theme/root go to a folder of the test's own, never the user's config
    monkeypatch.setenv("MINIGPT_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))


@pytest.fixture
def runner(monkeypatch) -> FakeRunner:
    """Mock exactly the launch boundary: engine.run.launch's two functions."""
    from engine.run import launch

    fake = FakeRunner()
    monkeypatch.setattr(launch, "launch_detached", fake.launch_detached)
    monkeypatch.setattr(launch, "request_stop", fake.request_stop)
    return fake


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A relative session root, so absolute tmp paths never reach a snapshot."""
    monkeypatch.chdir(tmp_path)
    return Path("sessions")


@pytest.fixture
def make_app(root, runner):
    from minigpt_tui.app import MinigptApp

    def make(**kw):
        kw.setdefault("root", root)
        kw.setdefault("clock", lambda: NOW)
        kw.setdefault("poll_interval", 0.05)
        kw.setdefault("refresh_interval", 60.0)
        app = MinigptApp(**kw)
        app.system_probe = FixedProbe
        app.animation_level = "none"  # tab underline etc. land at once: stable snapshots
        return app

    return make
