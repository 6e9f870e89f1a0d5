"""Sessions screen: listing, states, filter, marks, resume/stop at the runner boundary,
delete behind a confirmation, periodic refresh."""

from __future__ import annotations

from textual.widgets import DataTable

from minigpt_tui.screens.compare import CompareScreen
from minigpt_tui.screens.modals import ConfirmModal
from minigpt_tui.screens.monitor import MonitorScreen
from minigpt_tui.screens.sessions import SessionsScreen
from tui_helpers import NOW, finished_events, make_session, screen_text, standard_root, wait_for


def _row(table: DataTable, key: str) -> list:
    return [str(c) for c in table.get_row(key)]


async def _home(pilot) -> SessionsScreen:
    screen = pilot.app.screen
    assert isinstance(screen, SessionsScreen)
    await wait_for(pilot, lambda: screen.loaded)
    return screen


async def test_lists_every_session_with_state_progress_and_age(root, make_app):
    standard_root(root)
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _home(pilot)
        table = screen.query_one(DataTable)
        assert table.row_count == 3
        # newest update first
        assert [r["id"] for r in screen.visible_rows()] == ["smollm2-licenses-eps", "phi-stdlib-ratio",
                                                             "opt-licenses-mask"]
        done = _row(table, "smollm2-licenses-eps")
        assert done[2:8] + done[9:] == ["smollm2", "licenses", "struct eps=0.001", "—", "done", "100%", "10m ago"]
        assert done[8].endswith(" KB")  # the session folder's size on disk
        # state.json says running but nobody holds runner.lock → disconnected, progress from the log tail
        lost = _row(table, "opt-licenses-mask")
        assert lost[2:8] + lost[9:] == ["opt-1.3b", "licenses", "mask eps=0.001", "calibrate", "disconnected",
                                        "1/5 50%", "1d ago"]
        assert _row(table, "phi-stdlib-ratio")[4] == "struct 30%"
        assert "disconnected" in screen_text(app)


async def test_narrow_terminal_moves_details_to_the_detail_line(root, make_app):
    standard_root(root)
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _home(pilot)
        table = screen.query_one(DataTable)
        assert [c.label.plain for c in table.columns.values()] == [" ", "session", "method", "state",
                                                                   "progress", "updated"]
        text = screen_text(app)
        assert "embedded:smollm2 on builtin:licenses" in text  # detail line of the highlighted row


async def test_filter_with_slash_and_clear_with_escape(root, make_app):
    standard_root(root)
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _home(pilot)
        table = screen.query_one(DataTable)
        await pilot.press("slash")
        await pilot.press(*"phi")
        assert table.row_count == 1
        assert table.coordinate_to_cell_key((0, 0)).row_key.value == "phi-stdlib-ratio"
        await pilot.press("enter")  # back to the table, filter kept
        assert table.has_focus and table.row_count == 1
        await pilot.press("slash", "backspace", "backspace", "backspace", *"disconn")  # state is filterable too
        assert table.row_count == 1
        await pilot.press("escape")
        assert table.row_count == 3 and screen.filter_text == ""
        await pilot.press("slash", *"nothing-matches")
        assert table.row_count == 0
        assert "No session matches" in screen_text(app)


async def test_delete_asks_first_and_only_yes_deletes(root, make_app):
    sessions = standard_root(root)
    target = sessions["disconnected"].path
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _home(pilot)
        table = screen.query_one(DataTable)
        await pilot.press("down", "down")
        assert screen.current_row()["id"] == "opt-licenses-mask"
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmModal)
        assert "Delete session opt-licenses-mask?" in screen_text(app)
        await pilot.press("n")
        assert isinstance(app.screen, SessionsScreen) and target.exists()
        await pilot.press("d")
        await pilot.press("y")
        await wait_for(pilot, lambda: not target.exists() and table.row_count == 2)
        assert "opt-licenses-mask" not in [r["id"] for r in screen.rows]


async def test_a_listing_read_earlier_never_replaces_a_newer_one(root, make_app):
    """Listing threads can finish out of order (CI: a listing read before a delete landed after it)."""
    from minigpt_tui.messages import SessionsLoaded

    standard_root(root)
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _home(pilot)
        rows = list(screen.rows)
        newest = screen._asked
        screen.post_message(SessionsLoaded(rows[:2], None, newest + 2))  # asked later, arrives first
        screen.post_message(SessionsLoaded(rows, None, newest + 1))  # asked earlier, arrives last
        await wait_for(pilot, lambda: screen._shown == newest + 2)
        await pilot.pause(0.1)
        assert [r["id"] for r in screen.rows] == [r["id"] for r in rows[:2]]
        assert screen.query_one(DataTable).row_count == 2


async def test_cannot_delete_a_running_session(root, make_app):
    s = make_session(root, "live", finished_events()[:10], status="running", stage="calibrate",
                     completed=["baseline"], updated=NOW)
    app = make_app()
    with s.acquire():  # this process plays the runner: it holds runner.lock
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await _home(pilot)
            assert screen.rows[0]["status"] == "running"
            await pilot.press("d")
            assert isinstance(app.screen, SessionsScreen)  # no dialog
            assert s.path.exists()


async def test_resume_and_stop_go_through_the_runner_boundary(root, make_app, runner):
    sessions = standard_root(root)
    live = make_session(root, "zz-live", finished_events()[:10], status="running", stage="calibrate",
                        completed=["baseline"], updated=NOW)
    app = make_app()
    with live.acquire():
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await _home(pilot)
            ids = [r["id"] for r in screen.rows]
            assert ids[0] == "zz-live"
            await pilot.press("r")  # running: nothing to resume
            assert runner.launched == []
            await pilot.press("s")
            assert [p.name for p in runner.stopped] == ["zz-live"]
            await pilot.press("down")  # a done session: stop is refused
            await pilot.press("s")
            assert len(runner.stopped) == 1
            await pilot.press("down", "down")  # the disconnected one resumes
            assert screen.current_row()["id"] == "opt-licenses-mask"
            await pilot.press("r")
            assert runner.launched == [sessions["disconnected"].path]


async def test_mark_two_and_compare(root, make_app):
    standard_root(root)
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _home(pilot)
        await pilot.press("c")  # nothing marked: stays
        assert isinstance(app.screen, SessionsScreen)
        await pilot.press("space", "down", "space")
        assert screen.marked == {"smollm2-licenses-eps", "phi-stdlib-ratio"}
        assert str(screen.query_one(DataTable).get_cell("phi-stdlib-ratio", "mark")) == "●"
        await pilot.press("c")
        assert isinstance(app.screen, CompareScreen)
        await wait_for(pilot, lambda: app.screen.loaded)
        assert [r["id"] for r in app.screen.rows] == ["smollm2-licenses-eps", "phi-stdlib-ratio"]


async def test_home_and_end_go_to_the_first_and_last_session(root, make_app):
    """DataTable's own Home scrolls sideways: in tmux `Home Space Down Space` toggled one row twice."""
    standard_root(root)
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _home(pilot)
        ids = [r["id"] for r in screen.visible_rows()]
        await pilot.press("down", "down", "home")
        assert screen.current_row()["id"] == ids[0]
        await pilot.press("end")
        assert screen.current_row()["id"] == ids[-1]
        await pilot.press("home", "space", "down", "space")
        assert screen.marked == set(ids[:2])


async def test_the_updated_column_keeps_counting(root, make_app):
    standard_root(root)
    now = [NOW]
    app = make_app(clock=lambda: now[0])
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _home(pilot)
        rid = screen.visible_rows()[0]["id"]
        before = str(screen.query_one(DataTable).get_cell(rid, "updated"))
        now[0] += 3 * 3600
        screen.action_reload()
        await wait_for(pilot, lambda: str(screen.query_one(DataTable).get_cell(rid, "updated")) != before)
        from minigpt_tui.data import fmt_ago

        assert str(screen.query_one(DataTable).get_cell(rid, "updated")) == fmt_ago(screen.visible_rows()[0]["updated"],
                                                                                  now[0])


async def test_enter_opens_the_monitor(root, make_app):
    standard_root(root)
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await _home(pilot)
        await pilot.press("down", "enter")
        assert isinstance(app.screen, MonitorScreen)
        assert app.screen.session.id == "phi-stdlib-ratio"
        await pilot.press("escape")
        assert isinstance(app.screen, SessionsScreen)


async def test_periodic_refresh_picks_up_new_sessions(root, make_app):
    standard_root(root)
    app = make_app(refresh_interval=0.1)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _home(pilot)
        assert len(screen.rows) == 3
        make_session(root, "arrived-later", status="new", updated=NOW)
        await wait_for(pilot, lambda: screen.query_one(DataTable).row_count == 4)
        assert screen.rows[0]["id"] == "arrived-later"


async def test_empty_root_says_how_to_start(root, make_app):
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await _home(pilot)
        assert str(app.screen.query_one("#empty").content) == f"No sessions under {root.resolve()} yet. Press n to start a run."


async def test_disk_use_model_path_copy_path_and_checkpoint_cleanup(root, make_app):
    from minigpt_tui.screens.modals import ConfirmModal
    from tui_helpers import finished_events, make_session

    root.mkdir(parents=True, exist_ok=True)
    s = make_session(root, "big", finished_events(), status="done")
    (s.model_dir).mkdir()
    (s.model_dir / "model.safetensors").write_bytes(b"m" * 400_000)
    (s.checkpoints_dir / "step-40").mkdir(parents=True)
    (s.checkpoints_dir / "step-40" / "state.pt").write_bytes(b"c" * 1_300_000)
    app = make_app()
    copied: list[str] = []
    app.copy_to_clipboard = copied.append
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
        text = screen_text(app)
        assert f"model {s.model_dir.resolve()} (400.0 KB)" in text and "checkpoints 1.3 MB" in text
        await pilot.press("y")
        assert copied == [str(s.path.resolve())]
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmModal))
        assert "frees 1.3 MB" in app.screen._body_text and "The final model" in app.screen._body_text
        await pilot.press("y")
        await wait_for(pilot, lambda: not s.checkpoints_dir.exists())
        assert (s.model_dir / "model.safetensors").exists()
        await wait_for(pilot, lambda: any("1.3 MB freed" in str(n.message) for n in app._notifications))
