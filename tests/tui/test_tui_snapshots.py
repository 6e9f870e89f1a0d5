"""SVG snapshots of every screen at 80×24 and 120×40 (plus help, confirm, layers, the
low-colour theme and a disconnected run). Deterministic: fixed fixture times and an
injected clock, relative session root, no cursor blink, no animations.

Update after reviewing a change: .venv/bin/pytest tests/tui/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

from pathlib import Path

import pytest

from minigpt_tui.screens.compare import CompareScreen
from minigpt_tui.screens.monitor import MonitorScreen
from minigpt_tui.screens.new_run import NewRunScreen
from minigpt_tui.screens.sessions import SessionsScreen
from tui_helpers import standard_root, tables_measured, wait_for

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]
SNAP_DIR = Path("/tmp/minigpt-tui-snapshots")  # a fixed folder: the titles show the absolute root


@pytest.fixture
def snap_compare(snap_compare):
    """The plugin's snap_compare, with every table measured and painted before the picture
    (after `run_before`, before any `press`)."""
    def compare(app, *, run_before=None, **kw):
        async def before(pilot):
            if run_before is not None:
                await run_before(pilot)
            await tables_measured(pilot)

        return snap_compare(app, run_before=before, **kw)

    return compare


@pytest.fixture
def root(monkeypatch):
    """The session root at one fixed absolute path, so the absolute root the titles show (and
    the export dialog's target) is the same in every run; a lock keeps two runs apart."""
    import fcntl
    import shutil

    SNAP_DIR.mkdir(exist_ok=True)
    with open(SNAP_DIR.parent / "minigpt-tui-snapshots.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        work = SNAP_DIR / "w"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        monkeypatch.chdir(work)
        yield Path("sessions")
        monkeypatch.undo()
        shutil.rmtree(work, ignore_errors=True)


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


# ---- the workbench (issue 16): every error at once, monitor truths, alerts, the system pane ----
@pytest.mark.parametrize("size", SIZES)
def test_new_run_three_invalid_fields(snap_compare, root, make_app, size):
    from textual.widgets import Input

    async def run_before(pilot):
        await _home(pilot)
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, NewRunScreen))
        form = pilot.app.screen
        form.query_one("#f-cal-tokens", Input).value = "lots"
        form.query_one("#f-ratio", Input).value = "1.5"
        form.query_one("#f-steps", Input).value = "-3"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: len(form.errors()) == 3)

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_monitor_after_a_resume(snap_compare, root, make_app, size):
    """Stopped at step 26 of 40, resumed, two new steps: 28/40 in the table and the plot; a
    live runner (the lock is held) shows its CPU and RSS in the system pane."""
    from tui_helpers import make_session, resumed_events

    root.mkdir(parents=True, exist_ok=True)
    s = make_session(root, "r03", resumed_events(), status="running", stage="finetune",
                     completed=["baseline", "calibrate", "prune"])
    with s.acquire():
        assert snap_compare(make_app(attach="r03"), terminal_size=size, run_before=_monitor)


@pytest.mark.parametrize("size", SIZES)
def test_monitor_after_an_early_stop(snap_compare, root, make_app, size):
    from tui_helpers import early_stop_events, make_session

    root.mkdir(parents=True, exist_ok=True)
    make_session(root, "r03-target", early_stop_events(), status="done")
    assert snap_compare(make_app(attach="r03-target"), terminal_size=size, run_before=_monitor)


@pytest.mark.parametrize("size", SIZES)
def test_alert_run_died(snap_compare, root, make_app, size):
    from minigpt_tui.messages import RunEnded

    standard_root(root)

    async def run_before(pilot):
        await _home(pilot)
        pilot.app.post_message(RunEnded("opt-licenses-mask", "disconnected",
                                        "runner died (SIGKILL) during finetune at step 12"))
        pilot.app.post_message(RunEnded("smollm2-licenses-eps", "done", "done"))
        await wait_for(pilot, lambda: len(pilot.app.alerts) == 2)

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


# ---- compare's overlaid curves, the export dialog ----------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_compare_two_overlaid_runs(snap_compare, root, make_app, size):
    """Two runs' loss and held-out ppl on shared axes, each its own colour and glyph, the base
    model's ppl pinned."""
    sessions = standard_root(root)

    async def run_before(pilot):
        await _home(pilot)
        pilot.app.open_compare([sessions["done"].path, sessions["ratio"].path])
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, CompareScreen) and pilot.app.screen.loaded)
        await pilot.press("2")

    assert snap_compare(make_app(), terminal_size=size, run_before=run_before)


def _export_session(root):
    import tiny
    from engine.models.export import save_model
    from tui_helpers import finished_events, make_session

    root.mkdir(parents=True, exist_ok=True)
    s = make_session(root, "tiny-llama", finished_events(), status="done")
    save_model(tiny.model("llama"), tiny.tokenizer(), s.model_dir)
    return s


def test_export_dialog(snap_compare, root, make_app):
    _export_session(root)

    async def run_before(pilot):
        from minigpt_tui.screens.export import ExportScreen

        await _home(pilot)
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, ExportScreen))

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=run_before)


@pytest.mark.process
def test_export_dialog_finished(snap_compare, root, make_app):
    """After a real f16 export (minigpt export in a child): the path and the size."""
    _export_session(root)

    async def run_before(pilot):
        from minigpt_tui.screens.export import ExportScreen

        await _home(pilot)
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, ExportScreen))
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: pilot.app.screen.result is not None, timeout=240)
        assert pilot.app.screen.result.error is None, pilot.app.screen.result.error
        pilot.app.clear_notifications()  # the toast would cover the dialog's own lines

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=run_before)
