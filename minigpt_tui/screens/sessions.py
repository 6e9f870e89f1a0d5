"""Sessions (home): every run under the root, with open / resume / stop / delete / compare."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static
from textual.widgets.data_table import CellDoesNotExist, ColumnDoesNotExist, RowDoesNotExist

from engine.run import session as session_mod
from engine.errors import MinigptError

from ..data import drop_checkpoints, fmt_ago, fmt_bytes, session_rows, short_method, short_source
from ..messages import CheckpointsDropped, SessionDeleted, SessionsLoaded
from ..styles import status_text
from ..widgets import TitleBar
from .modals import ConfirmModal

if TYPE_CHECKING:
    from ..app import MinigptApp

WIDE = 110  # below this many columns, model/domain/stage move to the detail line
FILTER_KEYS = ("id", "model", "domain", "method", "mode", "status", "stage")


class SessionTable(DataTable):
    """The sessions list: Home and End go to the first and last run. DataTable's own Home/End
    scroll sideways, so in tmux `Home Space Down Space` marked and unmarked the same row."""

    BINDINGS = [Binding("home", "scroll_top", "First", show=False, id="sessions.first"),
                Binding("end", "scroll_bottom", "Last", show=False, id="sessions.last")]


class SessionsScreen(Screen):
    """Home screen: a live table of sessions. The listing is read in a thread worker and
    posted as `SessionsLoaded`; only `on_sessions_loaded` touches the table."""

    HELP = ("Every session under the root. Enter opens the monitor, n starts a new run, "
            "space marks sessions for compare (c), / filters. y copies the session's path to the "
            "terminal clipboard (OSC 52, works over SSH); x drops a finished run's checkpoints, keeping "
            "its final model; e exports a finished run's model as GGUF (llama.cpp), quantised if you like.")
    BINDINGS = [
        Binding("enter", "open", "Open", id="sessions.open"),
        Binding("n", "new_run", "New", id="sessions.new"),
        Binding("r", "resume", "Resume", id="sessions.resume"),
        Binding("s", "stop", "Stop", id="sessions.stop"),
        Binding("d,delete", "delete", "Delete", id="sessions.delete"),
        Binding("space", "mark", "Mark", id="sessions.mark"),
        Binding("c", "compare", "Compare", id="sessions.compare"),
        Binding("y", "copy_path", "Copy path", id="sessions.copy_path"),
        Binding("x", "cleanup", "Clean up", id="sessions.cleanup"),
        Binding("e", "export", "Export", id="sessions.export"),
        Binding("slash", "filter", "Filter", id="sessions.filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False, id="sessions.clear_filter"),
        Binding("f5", "reload", "Refresh", show=False, id="sessions.refresh"),
    ]

    AUTO_FOCUS = "#sessions"

    app: "MinigptApp"

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.marked: set[str] = set()
        self.filter_text = ""
        self.loaded = False
        self._wide: bool | None = None
        self._asked = 0  # listings asked for, and the newest one shown
        self._shown = 0

    # ---- layout ----------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield TitleBar(f"minigpt · sessions in {Path(self.app.root).resolve()}", id="title")
        yield Input(placeholder="filter: model, domain, method, state…", id="filter")
        yield SessionTable(id="sessions", cursor_type="row", zebra_stripes=True)
        yield Static("", id="empty")
        yield Static("", id="detail", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self._setup_columns()
        self.action_reload()
        self.set_interval(self.app.refresh_interval, self._periodic)
        self.app.theme_changed_signal.subscribe(self, lambda _t: self._render_table())

    def on_screen_resume(self) -> None:
        self.action_reload()

    def on_resize(self) -> None:
        if self._setup_columns():
            self._render_table()

    def _setup_columns(self) -> bool:
        wide = self.size.width >= WIDE if self.size.width else self.app.size.width >= WIDE
        if wide == self._wide:
            return False
        self._wide = wide
        table = self.query_one(DataTable)
        table.clear(columns=True)
        table.add_column(" ", key="mark", width=1)
        table.add_column("session", key="id")
        if wide:
            table.add_column("model", key="model")
            table.add_column("domain", key="domain")
        table.add_column("method", key="method")
        if wide:
            table.add_column("stage", key="stage")
        table.add_column("state", key="status")
        table.add_column("progress", key="progress")
        if wide:
            table.add_column("disk", key="disk")
        table.add_column("updated", key="updated")
        return True

    # ---- data ------------------------------------------------------------------
    def _periodic(self) -> None:
        if self.is_current:
            self.action_reload()

    def action_reload(self) -> None:
        self._asked += 1
        self._load(self.app.root, self._asked)

    @work(thread=True, exclusive=True, group="sessions-list", exit_on_error=False)
    def _load(self, root: Path, generation: int = 0) -> None:
        try:
            rows, err = session_rows(root), None
        except (OSError, MinigptError) as e:
            rows, err = [], str(e)
        self.post_message(SessionsLoaded(rows, err, generation))

    def on_sessions_loaded(self, msg: SessionsLoaded) -> None:
        if msg.generation < self._shown:  # read before a newer listing that is already shown
            return
        self._shown = msg.generation
        changed = msg.rows != self.rows or not self.loaded
        self.rows = msg.rows
        self.loaded = True
        ids = {r["id"] for r in self.rows}
        self.marked &= ids
        if msg.error:
            self.notify(msg.error, severity="error", timeout=4)
        if changed:
            self._render_table()
        else:
            self._refresh_ages()

    def _refresh_ages(self) -> None:
        """'updated 3m ago' keeps counting while nothing else changes (it read '1s ago' for good)."""
        table = self.query_one(DataTable)
        now = self.app.clock()
        for r in self.visible_rows():
            try:
                table.update_cell(r["id"], "updated", fmt_ago(r.get("updated"), now))
            except (CellDoesNotExist, RowDoesNotExist, ColumnDoesNotExist):  # the next full render adds it
                pass

    def visible_rows(self) -> list[dict]:
        needle = self.filter_text.lower().strip()
        if not needle:
            return self.rows
        return [r for r in self.rows
                if any(needle in str(r.get(k) or "").lower() for k in FILTER_KEYS)]

    def _render_table(self) -> None:
        table = self.query_one(DataTable)
        current = self.current_row()
        keep = current["id"] if current else None
        table.clear()
        now = self.app.clock()
        wide = bool(self._wide)
        rows = self.visible_rows()
        for r in rows:
            cells: list = ["●" if r["id"] in self.marked else " ", escape(_trunc(r["id"], 40 if wide else 24))]
            if wide:
                cells += [escape(_trunc(short_source(r.get("model", "?")), 18)),
                          escape(_trunc(short_source(r.get("domain", "?")), 16))]
            cells.append(escape(_trunc(short_method(r), 20 if wide else 17)))
            if wide:
                cells.append(escape(str(r.get("stage") or "—")))
            cells += [status_text(self.app, str(r.get("status", "?"))), r.get("progress_text", "")]
            if wide:
                cells.append(fmt_bytes((r.get("disk") or {}).get("total")))
            cells.append(fmt_ago(r.get("updated"), now))
            table.add_row(*cells, key=r["id"])
        empty = self.query_one("#empty", Static)
        if not self.rows:
            empty.update(f"No sessions under {self.app.root.resolve()} yet. Press n to start a run.")
        elif not rows:
            empty.update(f"No session matches {self.filter_text!r}. Press escape to clear the filter.")
        empty.display = not rows
        if keep is not None:
            for i, r in enumerate(rows):
                if r["id"] == keep:
                    table.move_cursor(row=i, animate=False)
                    break
        self._update_detail()

    def current_row(self) -> dict | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # cursor outside the (just cleared) table
            return None
        return next((r for r in self.rows if r["id"] == key), None)

    def _update_detail(self) -> None:
        r = self.current_row()
        detail = self.query_one("#detail", Static)
        if r is None:
            detail.update(f"{len(self.rows)} sessions")
            return
        marks = f" · {len(self.marked)} marked" if self.marked else ""
        err = f" · {r['error']}" if r.get("error") else ""
        disk = r.get("disk") or {}
        model = (f"model {r['model_dir']} ({fmt_bytes(disk.get('model'))})" if r.get("model_dir")
                 else "no model saved yet")
        ckpt = f" · checkpoints {fmt_bytes(disk['checkpoints'])}" if disk.get("checkpoints") else ""
        detail.update(f"{r['id']}: {r.get('model')} on {r.get('domain')} · {r.get('mode')} "
                      f"{r.get('method')} · stage {r.get('stage') or '—'}{marks}{err}\n"
                      f"{model} · disk {fmt_bytes(disk.get('total'))}{ckpt}")

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._update_detail()

    @on(DataTable.RowSelected)
    def _selected(self) -> None:
        self.action_open()

    # ---- filter ----------------------------------------------------------------
    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self._render_table()

    @on(Input.Submitted, "#filter")
    def _filter_done(self) -> None:
        self.query_one(DataTable).focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        if box.display or self.filter_text:
            box.value = ""
            box.display = False
            self.filter_text = ""
            self._render_table()
            self.query_one(DataTable).focus()

    # ---- actions ---------------------------------------------------------------
    def _session(self) -> session_mod.Session | None:
        r = self.current_row()
        if r is None:
            self.notify("No session selected", severity="warning")
            return None
        return session_mod.Session(Path(r["path"]))

    def action_open(self) -> None:
        s = self._session()
        if s is not None:
            self.app.open_monitor(s)

    def action_new_run(self) -> None:
        self.app.open_new_run()

    def action_resume(self) -> None:
        r, s = self.current_row(), self._session()
        if r is None or s is None:
            return
        if r.get("status") in ("running", "starting", "stopping", "done"):
            self.notify(f"{r['id']} is {r.get('status')}; nothing to resume", severity="warning")
            return
        if self.app.launch_session(s):
            self.action_reload()

    def action_stop(self) -> None:
        r, s = self.current_row(), self._session()
        if r is None or s is None:
            return
        if r.get("status") not in ("running", "starting", "stopping"):
            self.notify(f"{r['id']} is not running ({r.get('status')})", severity="warning")
            return
        self.app.stop_session(s)
        self.action_reload()

    def action_export(self) -> None:
        s = self._session()
        if s is not None:
            self.app.open_export(s)

    def action_mark(self) -> None:
        r = self.current_row()
        if r is None:
            return
        self.marked ^= {r["id"]}
        self.query_one(DataTable).update_cell(r["id"], "mark", "●" if r["id"] in self.marked else " ")
        self._update_detail()

    def action_compare(self) -> None:
        ids = [r["id"] for r in self.rows if r["id"] in self.marked]
        if len(ids) < 2:
            self.notify("Mark two or more sessions with space, then press c", severity="warning")
            return
        self.app.open_compare([Path(r["path"]) for r in self.rows if r["id"] in self.marked])

    def action_delete(self) -> None:
        r = self.current_row()
        if r is None:
            return
        if r.get("status") in ("running", "starting", "stopping"):
            self.notify(f"{r['id']} is running; stop it first (s)", severity="warning")
            return
        path = Path(r["path"])

        def answer(yes: bool | None) -> None:
            if yes:
                self._delete(path)

        self.app.push_screen(ConfirmModal(
            f"Delete session {r['id']}?",
            f"This removes the folder {path} with its config, events, statistics, model "
            "and checkpoints. It cannot be undone."), answer)

    @work(thread=True, group="sessions-delete", exit_on_error=False)
    def _delete(self, path: Path) -> None:
        try:
            session_mod.delete(session_mod.Session(path))
            err = None
        except (OSError, MinigptError) as e:
            err = e.line() if isinstance(e, MinigptError) else str(e)
        self.post_message(SessionDeleted(path.name, err))

    def on_session_deleted(self, msg: SessionDeleted) -> None:
        if msg.error:
            self.notify(msg.error, severity="error")
        else:
            self.marked.discard(msg.session_id)
            self.notify(f"Deleted {msg.session_id}")
        self.action_reload()

    def action_copy_path(self) -> None:
        r = self.current_row()
        if r is None:
            return
        path = str(Path(r["path"]).resolve())
        self.app.copy_to_clipboard(path)  # OSC 52: the terminal's clipboard, over SSH too
        self.notify(f"Copied {path}", timeout=3)

    def action_cleanup(self) -> None:
        r = self.current_row()
        if r is None:
            return
        disk = r.get("disk") or {}
        if r.get("status") != "done" or not r.get("model_dir"):
            self.notify(f"{r['id']} is {r.get('status')}: a resume needs its checkpoints; clean up when it is done",
                        severity="warning")
            return
        if not disk.get("checkpoints"):
            self.notify(f"{r['id']} has no checkpoints to drop", severity="warning")
            return
        path = Path(r["path"])

        def answer(yes: bool | None) -> None:
            if yes:
                self._drop(path)

        self.app.push_screen(ConfirmModal(
            f"Drop the checkpoints of {r['id']}?",
            f"Removes {path / 'checkpoints'} and frees {fmt_bytes(disk['checkpoints'])}. The final model "
            f"({r['model_dir']}, {fmt_bytes(disk.get('model'))}) and the results stay.", yes_label="Drop"), answer)

    @work(thread=True, group="sessions-cleanup", exit_on_error=False)
    def _drop(self, path: Path) -> None:
        try:
            freed, err = drop_checkpoints(session_mod.Session(path)), None
        except (OSError, MinigptError) as e:
            freed, err = 0, (e.line() if isinstance(e, MinigptError) else str(e))
        self.post_message(CheckpointsDropped(path.name, freed, err))

    def on_checkpoints_dropped(self, msg: CheckpointsDropped) -> None:
        if msg.error:
            self.notify(msg.error, severity="error")
        else:
            self.notify(f"Dropped the checkpoints of {msg.session_id}: {fmt_bytes(msg.freed)} freed")
        self.action_reload()

    # ---- palette ----------------------------------------------------------------
    def palette_commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        cmds: list[tuple[str, str, Callable[[], object]]] = [
            ("session: new run", "Open the new-run form", self.action_new_run),
            ("session: compare marked", "Compare the marked sessions side by side", self.action_compare),
            ("session: filter", "Filter the table", self.action_filter),
            ("session: refresh", "Re-read the session folder", self.action_reload),
            ("session: copy path", "Copy the highlighted session's folder (OSC 52)", self.action_copy_path),
            ("session: clean up", "Drop a finished run's checkpoints, keeping its model", self.action_cleanup),
            ("session: export GGUF", "Export the highlighted run's model for llama.cpp", self.action_export),
        ]
        for r in self.rows:
            path = Path(r["path"])
            cmds.append((f"open: {r['id']}", f"{r.get('model')} · {r.get('status')}",
                         lambda p=path: self.app.open_monitor(session_mod.Session(p))))
        return cmds


def _trunc(s: str, n: int) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"

