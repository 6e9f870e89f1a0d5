"""Run-end alerts and reaped children: a real detached runner launched from the app (the
engine's launcher, not the fake) on a tiny model ends; the app notifies (Textual toast,
bell, OSC 9/777) and leaves no `<defunct>` child. Also: remembered theme and root,
screenshots into a created folder, the alert for a death record."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil
import pytest

from minigpt_tui import settings
from minigpt_tui.app import MinigptApp
from minigpt_tui.messages import RunEnded
from minigpt_tui.screens.sessions import SessionsScreen
from tui_helpers import standard_root, wait_for

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def _zombies(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children() if c.status() == psutil.STATUS_ZOMBIE]


@pytest.mark.process
async def test_a_detached_run_launched_from_the_app_ends_with_a_notification_and_no_zombie(tmp_path, monkeypatch):
    import ft_case

    from engine.run import session as session_mod

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runner inherits it (2 spinning threads crawl under load)
    monkeypatch.setenv("MINIGPT_CALIBRATION_CACHE", str(tmp_path / "cache"))
    cfg = ft_case.config(tmp_path, finetune={"enabled": False}, evaluate={"max_tokens": 256})
    s = session_mod.create(cfg, tmp_path / "sessions", name="tiny")
    app = MinigptApp(root=tmp_path / "sessions", poll_interval=0.1, refresh_interval=60.0)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
        assert app.launch_session(s)
        pid = s.state()["pid"]
        await wait_for(pilot, lambda: any(t.startswith("tiny: run ") for t, _, _ in app.alerts), timeout=240)
        assert app.alerts[-1][:2] == ("tiny: run done", "finished"), app.alerts
        assert any(n.title == "tiny: run done" for n in app._notifications)  # the toast
        # reaped: the runner is gone, not <defunct> under the app's process
        await wait_for(pilot, lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() != "zombie",
                       timeout=10)
        assert pid not in _zombies(os.getpid())
    assert s.status() == "done"


async def test_a_death_record_and_a_failure_alert(root, make_app):
    standard_root(root)
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
        app.post_message(RunEnded("r03", "disconnected", "runner died (SIGKILL) during finetune at step 12"))
        app.post_message(RunEnded("r05", "failed", "failed: out of memory — lower the batch size"))
        await wait_for(pilot, lambda: len(app.alerts) == 2)
        assert app.alerts == [("r03: run disconnected", "runner died (SIGKILL) during finetune at step 12", "error"),
                              ("r05: run failed", "failed: out of memory — lower the batch size", "error")]


async def test_theme_and_root_are_remembered(root, make_app, monkeypatch):
    standard_root(root)
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
        await pilot.press("ctrl+t")
        await pilot.pause()
    saved = settings.load()
    assert saved["theme"] == "minigpt-light" and saved["root"] == str(root.resolve())
    again = MinigptApp(root=None)  # `minigpt` with no --root and no $MINIGPT_SESSIONS
    assert again.root == root.resolve() and again.theme == "minigpt-light"


async def test_screenshots_go_to_a_folder_that_is_created(root, make_app, tmp_path, monkeypatch):
    standard_root(root)
    monkeypatch.setenv("MINIGPT_SCREENSHOTS", str(tmp_path / "shots" / "new"))
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
        app.deliver_screenshot("home.svg")
        await wait_for(pilot, lambda: (tmp_path / "shots" / "new" / "home.svg").exists(), timeout=10)
