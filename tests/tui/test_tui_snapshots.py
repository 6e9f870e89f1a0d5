"""SVG snapshots of every screen at 80×24 and 120×40 (plus help, confirm, layers, the
low-colour theme and a disconnected run). Deterministic: fixed fixture times and an
injected clock, relative session root, no cursor blink, no animations.

Update after reviewing a change: .venv/bin/pytest tests/tui/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import pytest

from minigpt_tui.screens.compare import CompareScreen
from minigpt_tui.screens.monitor import MonitorScreen
from minigpt_tui.screens.new_run import NewRunScreen
from minigpt_tui.screens.sessions import SessionsScreen
from tui_helpers import standard_root, wait_for

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


async def _home(pilot) -> None:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, SessionsScreen) and pilot.app.screen.loaded)


async def _monitor(pilot) -> None:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, MonitorScreen) and pilot.app.screen.settled)


@pytest.mark.parametrize("size", SIZES)
def test_sessions(snap_compare, root, make_app, size):
    standard_root(root)
    assert snap_compare(make_app(), terminal_size=size, run_before=_home)


@pytest.mark.parametrize("size", SIZES)
def test_new_run(snap_compare, root, make_app, size):
    async def run_before(pilot):
        await _home(pilot)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, NewRunScreen))

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_monitor_finished_run(snap_compare, root, make_app, size):
    standard_root(root)
    assert snap_compare(make_app(attach="smollm2-licenses-eps"), terminal_size=size, run_before=_monitor)


@pytest.mark.parametrize("size", SIZES)
def test_compare(snap_compare, root, make_app, size):
    sessions = standard_root(root)

    async def run_before(pilot):
        await _home(pilot)
        pilot.app.open_compare([s.path for s in sessions.values()])
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, CompareScreen) and pilot.app.screen.loaded)

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


def test_monitor_layers_tab(snap_compare, root, make_app):
    standard_root(root)
    assert snap_compare(make_app(attach="smollm2-licenses-eps"), terminal_size=(120, 40),
                        run_before=_monitor, press=["2"])


def test_monitor_metrics_tab(snap_compare, root, make_app):
    standard_root(root)
    assert snap_compare(make_app(attach="smollm2-licenses-eps"), terminal_size=(80, 24),
                        run_before=_monitor, press=["3"])


def test_monitor_disconnected(snap_compare, root, make_app):
    standard_root(root)
    assert snap_compare(make_app(attach="opt-licenses-mask"), terminal_size=(80, 24), run_before=_monitor)


def test_help(snap_compare, root, make_app):
    standard_root(root)
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=_home, press=["f1"])


def test_delete_confirmation(snap_compare, root, make_app):
    standard_root(root)
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=_home, press=["d"])


def test_sessions_low_colour_theme(snap_compare, root, make_app):
    standard_root(root)
    assert snap_compare(make_app(theme="minigpt-lowcolor"), terminal_size=(80, 24), run_before=_home)
