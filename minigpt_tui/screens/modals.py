"""Modal dialogs: a yes/no confirmation and the key help (F1 / ?)."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label, Static


class ConfirmModal(ModalScreen[bool]):
    """Ask before anything destructive; returns True only on an explicit yes."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, title: str, body: str, yes_label: str = "Delete") -> None:
        super().__init__()
        self._dialog_title = title
        self._body_text = body
        self._yes_label = yes_label

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._dialog_title, id="dialog-title")
            yield Static(self._body_text, id="dialog-body", markup=False)
            with Horizontal(id="dialog-buttons"):
                yield Button(f"{self._yes_label} (y)", variant="error", id="yes")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class HelpScreen(ModalScreen[None]):
    """Lists the bindings active where help was asked for (focused widget, screen, app),
    with their ids so users can remap them, plus that screen's own help text."""

    BINDINGS = [Binding("escape,q,f1,question_mark", "close", "Close", id="help.close")]

    def __init__(self, title: str, help_text: str, bindings: list[tuple[str, str, str, str]]) -> None:
        super().__init__()
        self._dialog_title = title
        self._help_text = help_text
        self._key_rows = bindings

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog"):
            yield Label(f"Help — {self._dialog_title}", id="help-title")
            if self._help_text:
                yield Static(escape(self._help_text), id="help-text")
            table: DataTable = DataTable(id="help-keys", cursor_type="row", zebra_stripes=True)
            table.add_columns("key", "action", "id", "from")
            for key, desc, bid, where in self._key_rows:
                table.add_row(escape(key), escape(desc), escape(bid), escape(where))
            yield table
            yield Static("esc closes · ctrl+p opens the command palette", id="help-foot")

    def action_close(self) -> None:
        self.dismiss(None)
