"""MinigptApp: the Textual workbench over engine sessions.

Importing this module must stay cheap and must not import torch or transformers (a test
checks it in a fresh interpreter): the app only reads session folders and launches the
runner through the torch-free `engine.run.launch`, in `launcher.EngineLauncher`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.worker import get_current_worker

from engine.run import record
from engine.run import session as session_mod
from engine.errors import MinigptError

from . import settings
from .commands import MinigptCommands
from .launcher import EngineLauncher, Launcher
from .messages import Alert, RunEnded
from .screens.sessions import SessionsScreen
from .themes import DEFAULT_THEME, load_themes

# The other screens are imported when first opened: the home screen paints sooner.


class MinigptApp(App):
    """Sessions → new run / monitor / compare. Arguments exist so tests can pin the clock,
    speed up polling and replace the runner boundary."""

    TITLE = "minigpt"
    CSS_PATH = str(Path(__file__).with_name("app.tcss"))  # absolute: subclasses elsewhere still find it
    COMMANDS = App.COMMANDS | {MinigptCommands}
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("f1,question_mark", "help", "Help", id="app.help"),
        Binding("ctrl+t", "cycle_theme", "Theme", id="app.theme"),
        Binding("q", "quit", "Quit", id="app.quit"),
    ]

    def __init__(
        self,
        root: Path | None = None,
        attach: str | None = None,
        *,
        launcher: Launcher | None = None,
        clock: Callable[[], float] = time.time,
        poll_interval: float = 0.5,
        refresh_interval: float = 2.0,
        themes_dir: Path | None = None,
        theme: str | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings.load()
        if root is None and not os.environ.get("MINIGPT_SESSIONS") and self.settings.get("root"):
            root = Path(self.settings["root"])  # the last root this app was opened on
        self.root = Path(root or session_mod.default_root())
        self.alerts: list[tuple[str, str, str]] = []  # (title, message, severity), newest last: tests read it
        self.watch_interval = max(poll_interval, 0.5)
        self.attach = attach
        self.launcher: Launcher = launcher or EngineLauncher()
        self.clock = clock
        self.poll_interval = poll_interval
        self.refresh_interval = refresh_interval
        themes, self.theme_errors = load_themes(themes_dir)
        self.theme_names: list[str] = []
        for t in themes:
            self.register_theme(t)
            self.theme_names.append(t.name)
        wanted = theme or os.environ.get("MINIGPT_THEME") or self.settings.get("theme") or DEFAULT_THEME
        if wanted in self.available_themes:
            self.theme = wanted
        elif wanted != DEFAULT_THEME:
            self.theme_errors.append(f"theme {wanted!r} not found; themes: {', '.join(self.theme_names)}")

    def get_default_screen(self) -> SessionsScreen:
        # The home screen is the default screen (not pushed on top of a blank one): one
        # screen-stack change less at startup, and escape can never pop past it.
        return SessionsScreen()

    def on_mount(self) -> None:
        keymap, errors = parse_keymap(os.environ.get("MINIGPT_KEYMAP", ""))
        if keymap:
            self.set_keymap(keymap)
        self.theme_errors.extend(errors)
        for err in self.theme_errors:
            self.notify(err, severity="warning", timeout=6)
        problem = settings.save(root=str(self.root.resolve()))
        if problem:
            self.notify(problem, severity="warning", timeout=6)
        self._watch_runs(self.root, self.watch_interval)
        # a theme picked with ctrl+t or the palette is remembered for the next start
        self.theme_changed_signal.subscribe(self, lambda t: settings.save(theme=t.name))
        if self.attach:
            try:
                self.open_monitor(session_mod.open_session(self.attach, self.root))
            except MinigptError as e:
                self.notify(e.line(), severity="error", timeout=8)

    # ---- navigation (screens call these) ----------------------------------------------
    def open_monitor(self, session: session_mod.Session) -> None:
        from .screens.monitor import MonitorScreen

        self.push_screen(MonitorScreen(session))

    def open_new_run(self) -> None:
        from .screens.new_run import NewRunScreen

        self.push_screen(NewRunScreen())

    def open_export(self, session: session_mod.Session) -> None:
        """The GGUF export dialog, on a session whose run is over and whose model is saved."""
        st = session.status()
        if st in record.LIVE_STATUSES:
            self.notify(f"{session.id} is {st}; export it once it has finished", severity="warning")
            return
        if not (session.model_dir / "config.json").is_file():
            self.notify(f"{session.id} has no model yet (no {session.model_dir.name}/): run it through the prune "
                        "stage first", severity="warning")
            return
        from .screens.export import ExportScreen

        self.push_screen(ExportScreen(session))

    def open_compare(self, paths: Iterable[Path]) -> None:
        from .screens.compare import CompareScreen

        self.push_screen(CompareScreen(list(paths)))

    # ---- the runner boundary -------------------------------------------------------------
    def launch_session(self, session: session_mod.Session) -> bool:
        """Start (or resume) a session's runner as a detached process; report, never raise."""
        try:
            pid = self.launcher.launch(session.path)
        except MinigptError as e:
            self.notify(e.line(), severity="error", timeout=8)
            return False
        except Exception as e:  # a bug in the runner must not take the UI down
            self.notify(f"launch failed: {type(e).__name__}: {e}", severity="error", timeout=8)
            return False
        self.notify(f"Launched {session.id} (pid {pid})")
        return True

    def stop_session(self, session: session_mod.Session) -> bool:
        try:
            self.launcher.stop(session.path)
        except MinigptError as e:
            self.notify(e.line(), severity="error", timeout=8)
            return False
        except Exception as e:
            self.notify(f"stop failed: {type(e).__name__}: {e}", severity="error", timeout=8)
            return False
        self.notify(f"Asked {session.id} to stop")
        return True

    # ---- run-end alerts and reaping (a thread worker reads; handlers notify) ----------------
    @work(thread=True, exclusive=True, group="run-watch", exit_on_error=False)
    def _watch_runs(self, root: Path, interval: float) -> None:
        """Every `interval` s: reap ended children, then read each session's status; one that
        was live (starting/running) and is not any more posts `RunEnded`. A runner found dead
        gets its death record (engine.run.death) first, and the alert says how it died."""
        from engine.run import death

        worker = get_current_worker()
        seen: dict[str, str] = {}
        while not worker.is_cancelled:
            reap = getattr(self.launcher, "reap", None)
            if reap is not None:
                try:
                    reap()
                except Exception:  # a broken launcher must not stop the alerts
                    pass
            for s in session_mod.list_sessions(root):
                try:
                    st = s.status()
                    state = s.state() if st not in record.LIVE_STATUSES else {}
                except (MinigptError, OSError):
                    continue
                before = seen.get(s.id)
                seen[s.id] = st
                if before in record.LIVE_STATUSES and st not in record.LIVE_STATUSES:
                    message = st
                    if st == record.DISCONNECTED:
                        died = death.record_death(s)
                        message = died["message"] if died else "its runner died without ending the run"
                    elif st == "failed":
                        message = f"failed: {state.get('error') or 'see the log'}"
                    self.post_message(RunEnded(s.id, st, message))
            if worker.cancelled_event.wait(interval):
                break

    def on_run_ended(self, msg: RunEnded) -> None:
        severity = {"done": "information", "stopped": "warning"}.get(msg.status, "error")
        text = msg.message if msg.message != msg.status else {"done": "finished", "stopped": "stopped"}.get(
            msg.status, msg.status)
        self.alert(f"{msg.session_id}: run {msg.status}", text, severity)

    def on_alert(self, msg: Alert) -> None:
        self.alert(msg.title, msg.message, msg.severity)

    def alert(self, title: str, message: str, severity: str = "information") -> None:
        """A Textual notification, the terminal bell, and a desktop notification (OSC 9 and
        OSC 777, which most terminals and SSH sessions pass on; tmux with allow-passthrough)."""
        self.alerts.append((title, message, severity))
        self.notify(message, title=title, severity=severity, timeout=10)  # type: ignore[arg-type]
        self.bell()
        clean = lambda t: "".join(c for c in t if c.isprintable() and c not in ";\x1b\x07")[:200]  # noqa: E731
        if not self.is_headless and self._driver is not None:
            self._driver.write(f"\x1b]9;{clean(title)}: {clean(message)}\x07"
                               f"\x1b]777;notify;{clean(title)};{clean(message)}\x07")

    # ---- screenshots -----------------------------------------------------------------------
    def screenshot_dir(self) -> Path:
        """`$MINIGPT_SCREENSHOTS`, the remembered folder, the monitored session's folder, else
        `<root>/screenshots`; created if missing (Textual's default, ~/Downloads, may not exist)."""
        chosen = os.environ.get("MINIGPT_SCREENSHOTS") or self.settings.get("screenshots")
        session = getattr(self.screen, "session", None)
        folder = (Path(chosen) if chosen else
                  Path(session.path) / "screenshots" if session is not None else self.root / "screenshots")
        folder.mkdir(parents=True, exist_ok=True)
        return folder.resolve()

    def deliver_screenshot(self, filename: str | None = None, path: str | None = None,
                           time_format: str | None = None) -> str | None:
        try:
            folder = Path(path) if path else self.screenshot_dir()
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.notify(f"cannot create the screenshot folder: {e.strerror or e}", title="Screenshot",
                        severity="error")
            return None
        return super().deliver_screenshot(filename, str(folder), time_format)

    # ---- app-wide actions ----------------------------------------------------------------
    def help_bindings(self) -> list[tuple[str, str, str, str]]:
        """Bindings active on the current screen and focused widget, for the help screen."""
        from textual.screen import Screen

        out = []
        for key, active in self.screen.active_bindings.items():
            b = active.binding
            if not b.description:
                continue
            # minigpt's own (with ids) first: screen, then app; then Textual's and the widget's
            rank = (0 if b.id else 3) + (0 if isinstance(active.node, Screen) else (1 if active.node is self else 2))
            out.append((rank, self.get_key_display(b), b.description, b.id or "", type(active.node).__name__))
        out.sort(key=lambda r: r[0])
        return [r[1:] for r in out]

    def action_help(self) -> None:
        from .screens.modals import HelpScreen

        if isinstance(self.screen, HelpScreen):
            return
        screen = self.screen
        title = type(screen).__name__.removesuffix("Screen")
        self.push_screen(HelpScreen(title, getattr(screen, "HELP", ""), self.help_bindings()))

    def action_cycle_theme(self) -> None:
        names = self.theme_names or [self.theme]
        i = names.index(self.theme) if self.theme in names else -1
        self.theme = names[(i + 1) % len(names)]
        self.notify(f"Theme: {self.theme}", timeout=2)


def parse_keymap(spec: str) -> tuple[dict[str, str], list[str]]:
    """`MINIGPT_KEYMAP="sessions.new=a;app.quit=ctrl+q"` → {binding id: keys}, problems."""
    keymap, errors = {}, []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        bid, sep, keys = item.partition("=")
        if not sep or not bid.strip() or not keys.strip():
            errors.append(f"MINIGPT_KEYMAP entry {item!r} is not id=keys (e.g. sessions.new=a)")
            continue
        keymap[bid.strip()] = keys.strip()
    return keymap, errors


def run_app(root: Path | None = None, attach: str | None = None) -> None:
    """Entry point for `minigpt` (no args) and `minigpt attach SESSION`."""
    MinigptApp(root=root, attach=attach).run()
