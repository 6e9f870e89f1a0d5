"""App-wide behaviour: themes from files, help for the focused screen, the context-aware
command palette, and ids on every binding (so keys can be remapped by id)."""

from __future__ import annotations

from pathlib import Path

from textual.binding import Binding
from textual.widgets import DataTable

from minigpt_tui.app import MinigptApp
from minigpt_tui.commands import MinigptCommands
from minigpt_tui.screens.compare import CompareScreen
from minigpt_tui.screens.modals import ConfirmModal, HelpScreen
from minigpt_tui.screens.monitor import MonitorScreen
from minigpt_tui.screens.new_run import NewRunScreen
from minigpt_tui.screens.sessions import SessionsScreen
from minigpt_tui.themes import load_theme_file, load_themes
from tui_helpers import screen_text, standard_root, wait_for

THEMES = Path(__file__).resolve().parents[2] / "themes"


def test_theme_files_load_and_include_a_low_colour_theme():
    themes, errors = load_themes(THEMES)
    assert errors == []
    names = {t.name: t for t in themes}
    assert {"minigpt-dark", "minigpt-light", "minigpt-lowcolor"} <= set(names)
    assert names["minigpt-dark"].dark and not names["minigpt-light"].dark
    low = names["minigpt-lowcolor"]
    # 16-colour safe: ANSI colour names only and the terminal's own background
    assert low.ansi and low.background == "ansi_default"
    assert all(str(v).startswith("ansi_") for v in (low.primary, low.accent, low.error, low.success, low.warning))


def test_broken_theme_file_is_reported_not_fatal(tmp_path):
    (tmp_path / "good.toml").write_text('name = "ok"\nprimary = "#112233"\n')
    (tmp_path / "typo.toml").write_text('name = "bad"\nprimary = "#112233"\nprimray = "#000"\n')
    (tmp_path / "colour.toml").write_text('name = "bad2"\nprimary = "not-a-colour"\n')
    themes, errors = load_themes(tmp_path)
    assert [t.name for t in themes] == ["ok"]
    assert len(errors) == 2 and any("unknown key 'primray'" in e for e in errors)
    assert load_theme_file(tmp_path / "good.toml").primary == "#112233"


async def test_switch_themes_with_key_and_palette(root, make_app):
    standard_root(root)
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
        assert app.theme == "minigpt-dark"
        await pilot.press("ctrl+t")
        assert app.theme == "minigpt-light"
        # the palette offers the other themes by name
        await pilot.press("ctrl+p")
        await pilot.press(*"theme: minigpt-low")
        await wait_for(pilot, lambda: "minigpt-lowcolor" in screen_text(app))
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.theme == "minigpt-lowcolor")
        # tables re-render with the new theme's colours (status cell style follows $success)
        cell = app.screen.query_one(DataTable).get_cell("smollm2-licenses-eps", "status")
        assert cell.plain == "done" and cell.style.color.name == "color(10)"  # ansi_bright_green


async def test_theme_from_env_and_unknown_theme_warns(root, monkeypatch, runner):
    monkeypatch.setenv("MINIGPT_THEME", "minigpt-lowcolor")
    assert MinigptApp(root=root).theme == "minigpt-lowcolor"
    app = MinigptApp(root=root, theme="nope")
    assert app.theme != "nope" and any("theme 'nope' not found" in e for e in app.theme_errors)


async def test_help_shows_the_bindings_of_the_current_screen(root, make_app):
    sessions = standard_root(root)
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app)
        assert "Help — Sessions" in text and "sessions.delete" in text and "app.theme" in text
        assert "monitor.stop" not in text
        await pilot.press("escape")
        app.open_monitor(sessions["done"])
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.settled)
        await pilot.press("question_mark")
        text = screen_text(app)
        assert "Help — Monitor" in text and "monitor.stop" in text and "sessions.delete" not in text
        await pilot.press("escape")
        assert isinstance(app.screen, MonitorScreen)


async def test_palette_commands_depend_on_the_screen(root, make_app):
    sessions = standard_root(root)
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
        home = {t for t, _, _ in MinigptCommands(app.screen).commands()}
        assert {"session: new run", "open: phi-stdlib-ratio", "theme: minigpt-light"} <= home
        assert "run: stop" not in home
        app.open_monitor(sessions["disconnected"])
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.settled)
        mon = {t for t, _, _ in MinigptCommands(app.screen).commands()}
        assert {"run: resume", "view: layer sizes"} <= mon and "session: new run" not in mon
        assert "run: stop" not in mon  # disconnected: nothing to stop
        # run one through the real palette UI
        await pilot.press("ctrl+p", *"view: log")
        await wait_for(pilot, lambda: "view: log" in screen_text(app))
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.screen.query_one("#tabs").active == "log")
        app.pop_screen()
        app.open_compare([sessions["done"].path, sessions["ratio"].path])
        await pilot.pause()
        cmp = {t for t, _, _ in MinigptCommands(app.screen).commands()}
        assert {"export: CSV", "export: Markdown", "sort: ppl ft"} <= cmp


def test_every_minigpt_binding_has_an_id():
    """Ids make keys remappable (App.set_keymap) and show up in the help screen."""
    seen = set()
    for cls in (MinigptApp, SessionsScreen, NewRunScreen, MonitorScreen, CompareScreen, ConfirmModal, HelpScreen):
        for b in cls.BINDINGS:
            assert isinstance(b, Binding) and b.id, f"{cls.__name__} binding {b.key} has no id"
            seen.add(b.id)
    assert {"app.help", "sessions.delete", "monitor.stop", "compare.export_csv", "new.submit"} <= seen


async def test_keymap_from_env_remaps_by_id(root, make_app, monkeypatch):
    from minigpt_tui.app import parse_keymap

    assert parse_keymap("sessions.new=a; app.quit=ctrl+q;") == ({"sessions.new": "a", "app.quit": "ctrl+q"}, [])
    assert parse_keymap("oops")[1] == ["MINIGPT_KEYMAP entry 'oops' is not id=keys (e.g. sessions.new=a)"]
    standard_root(root)
    monkeypatch.setenv("MINIGPT_KEYMAP", "sessions.new=a")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
        await pilot.press("a")
        assert isinstance(app.screen, NewRunScreen)
