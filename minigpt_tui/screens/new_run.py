"""New run: a form that builds a `RunConfig`, creates the session and launches it detached.

Validation is the engine's own (`engine.config.from_dict`), so the form can never accept a
config the runner would reject; its `MinigptError.line()` is shown under the field it names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Input, Label, Select, Static

from engine import config as config_mod
from engine.run import session as session_mod
from engine.errors import MinigptError

from ..widgets import TitleBar

if TYPE_CHECKING:
    from ..app import MinigptApp

MODEL_PRESETS = [
    ("embedded:smollm2 (tiny, offline)", "embedded:smollm2"),
    ("microsoft/phi-1_5", "microsoft/phi-1_5"),
    ("facebook/opt-1.3b", "facebook/opt-1.3b"),
    ("princeton-nlp/Sheared-LLaMA-1.3B", "princeton-nlp/Sheared-LLaMA-1.3B"),
    ("other (type below)", "custom"),
]
DOMAIN_PRESETS = [
    ("builtin:licenses", "builtin:licenses"),
    ("builtin:stdlib-docs", "builtin:stdlib-docs"),
    ("hub dataset id", "hub"),
    ("local file or folder", "local"),
]
# config key → form field id, so an engine error lands under the right field
FIELD_FOR_KEY = {
    "name": "f-name",
    "model.source": "f-model",
    "data.source": "f-domain",
    "data.column": "f-column",
    "data.template": "f-template",
    "prune.mode": "f-mode",
    "prune.rule": "f-rule",
    "prune.activation_threshold": "f-threshold",
    "prune.ratio": "f-ratio",
    "finetune.max_steps": "f-steps",
    "finetune.lr": "f-lr",
    "evaluate.max_tokens": "f-eval-tokens",
    "evaluate.mcq_generate": "f-mcq",
}


class NewRunScreen(Screen):
    """The new-run form. ctrl+s validates, creates the session folder and launches it."""

    HELP = ("Fill in the model, the domain corpus and the pruning rule. ctrl+s creates the "
            "session (config.toml) and starts it in the background; errors show under the field.")
    BINDINGS = [
        Binding("ctrl+s", "submit", "Create & launch", id="new.submit", priority=True),
        Binding("escape", "cancel", "Cancel", id="new.cancel"),
    ]

    app: "MinigptApp"

    def __init__(self) -> None:
        super().__init__()
        self.created: session_mod.Session | None = None

    def compose(self) -> ComposeResult:
        d = config_mod.RunConfig()
        yield TitleBar("minigpt · new run", id="title")
        with VerticalScroll(id="form"):
            yield Label("Model", classes="form-section first")
            yield from _row("preset", Select(MODEL_PRESETS, value="embedded:smollm2", allow_blank=False,
                                             id="f-model-preset", compact=True))
            yield from _row("model", Input(d.model.source, placeholder="hub id, local folder or .gguf",
                                           id="f-model", compact=True))
            yield from _row("name", Input("", placeholder="optional; default: date-model-domain", id="f-name", compact=True))
            yield from _section("Domain corpus")
            yield from _row("corpus", Select(DOMAIN_PRESETS, value="builtin:licenses", allow_blank=False,
                                             id="f-domain-preset", compact=True))
            yield from _row("source", Input(d.data.source, id="f-domain", compact=True))
            yield from _row("column", Input(d.data.column, placeholder="text column of a hub/JSONL dataset",
                                            id="f-column", compact=True))
            yield from _row("template", Input("", placeholder='e.g. "{question}\\n{answer}" (overrides column)',
                                              id="f-template", compact=True))
            yield from _section("Pruning")
            yield from _row("mode", Select([("structural (weights removed)", "structural"),
                                            ("mask (zeroed, shapes kept)", "mask")],
                                           value=d.prune.mode, allow_blank=False, id="f-mode", compact=True))
            yield from _row("rule", Select([("threshold ε on mean |activation|", "threshold"),
                                            ("ratio of MLP neurons", "ratio")],
                                           value=d.prune.rule, allow_blank=False, id="f-rule", compact=True))
            yield from _row("threshold ε", Input(f"{d.prune.activation_threshold:g}", id="f-threshold", compact=True))
            yield from _row("ratio", Input(f"{d.prune.ratio:g}", id="f-ratio", compact=True, disabled=True))
            yield from _section("Fine-tune")
            yield from _row("", Checkbox("fine-tune after pruning", d.finetune.enabled, id="f-finetune",
                                         compact=True))
            yield from _row("max steps", Input(str(d.finetune.max_steps), id="f-steps", compact=True,
                                               disabled=not d.finetune.enabled))
            yield from _row("learning rate", Input(f"{d.finetune.lr:g}", id="f-lr", compact=True,
                                                   disabled=not d.finetune.enabled))
            yield from _section("Evaluate")
            yield from _row("max tokens", Input(str(d.evaluate.max_tokens), id="f-eval-tokens", compact=True))
            yield from _row("MCQ questions", Input(str(d.evaluate.mcq_generate), id="f-mcq", compact=True))
            yield from _row("", Checkbox("also evaluate the unpruned base model", d.evaluate.evaluate_base,
                                         id="f-eval-base", compact=True))
            yield Static("", id="form-error", markup=False)
            with Horizontal(id="form-buttons"):
                yield Button("Create & launch (ctrl+s)", variant="primary", id="submit", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)
        yield Footer()

    AUTO_FOCUS = "#f-model"

    # ---- reacting to choices ------------------------------------------------------
    @on(Select.Changed, "#f-model-preset")
    def _model_preset(self, event: Select.Changed) -> None:
        box = self.query_one("#f-model", Input)
        if event.value == "custom":
            box.value = ""
            box.focus()
        elif isinstance(event.value, str):
            box.value = event.value

    @on(Select.Changed, "#f-domain-preset")
    def _domain_preset(self, event: Select.Changed) -> None:
        box = self.query_one("#f-domain", Input)
        if event.value in ("hub", "local"):
            box.value = ""
            box.placeholder = ("hub dataset id, e.g. user/name" if event.value == "hub"
                               else "path to a .txt / .jsonl file or a folder")
        elif isinstance(event.value, str):
            box.value = event.value

    @on(Select.Changed, "#f-rule")
    def _rule(self, event: Select.Changed) -> None:
        self.query_one("#f-threshold", Input).disabled = event.value != "threshold"
        self.query_one("#f-ratio", Input).disabled = event.value != "ratio"

    @on(Checkbox.Changed, "#f-finetune")
    def _finetune(self, event: Checkbox.Changed) -> None:
        self.query_one("#f-steps", Input).disabled = not event.value
        self.query_one("#f-lr", Input).disabled = not event.value

    @on(Input.Submitted)
    def _next_field(self) -> None:
        self.focus_next()  # enter walks the form; ctrl+s submits it

    @on(Button.Pressed, "#submit")
    def _submit_pressed(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    # ---- validation ---------------------------------------------------------------
    def _val(self, fid: str) -> Any:
        return self.query_one(f"#{fid}").value  # type: ignore[attr-defined]

    def form_data(self) -> tuple[dict, dict[str, str]]:
        """The form as a config dict, plus per-field problems the engine cannot see
        (numbers that do not parse, a local path that does not exist)."""
        errors: dict[str, str] = {}

        def num(fid: str, kind: Callable[[str], Any], what: str) -> Any:
            raw = str(self._val(fid)).strip()
            try:
                return kind(raw)
            except ValueError:
                errors[fid] = f"{what} must be {'a whole number' if kind is int else 'a number'}, got {raw!r}"
                return None

        rule = self._val("f-rule")
        prune: dict[str, Any] = {"mode": self._val("f-mode"), "rule": rule}
        if rule == "threshold":
            prune["activation_threshold"] = num("f-threshold", float, "threshold ε")
        else:
            prune["ratio"] = num("f-ratio", float, "ratio")
        finetune: dict[str, Any] = {"enabled": bool(self._val("f-finetune"))}
        if finetune["enabled"]:
            finetune["max_steps"] = num("f-steps", int, "max steps")
            finetune["lr"] = num("f-lr", float, "learning rate")
        domain = str(self._val("f-domain")).strip()
        if not domain:
            errors["f-domain"] = "the domain corpus is empty — pick a built-in or type a hub id or path"
        elif self._val("f-domain-preset") == "local" and not Path(domain).expanduser().exists():
            errors["f-domain"] = f"local path {domain} does not exist — check the path"
        model = str(self._val("f-model")).strip()
        if not model:
            errors["f-model"] = "the model is empty — pick a preset or type a hub id / folder"
        data = {
            "model": {"source": model},
            "data": {"source": str(Path(domain).expanduser()) if self._val("f-domain-preset") == "local" else domain,
                     "column": str(self._val("f-column")).strip() or "text",
                     "template": str(self._val("f-template")).replace("\\n", "\n")},
            "prune": prune,
            "finetune": finetune,
            "evaluate": {"max_tokens": num("f-eval-tokens", int, "max tokens"),
                         "mcq_generate": num("f-mcq", int, "MCQ questions"),
                         "evaluate_base": bool(self._val("f-eval-base"))},
        }
        name = str(self._val("f-name")).strip()
        if name:
            data["name"] = name
        return data, errors

    def build_config(self) -> config_mod.RunConfig | None:
        self._clear_errors()
        data, errors = self.form_data()
        if errors:
            for fid, text in errors.items():
                self._show_error(fid, text)
            return None
        try:
            return config_mod.from_dict(data)
        except MinigptError as e:
            keys = [k for k in FIELD_FOR_KEY if k in e.problem]
            fid = FIELD_FOR_KEY[max(keys, key=len)] if keys else None
            self._show_error(fid, e.line())
            return None

    def _clear_errors(self) -> None:
        for err in self.query(".field-error"):
            err.display = False
        for w in self.query(".-invalid"):
            w.remove_class("-invalid")
        self.query_one("#form-error").display = False

    def _show_error(self, fid: str | None, text: str) -> None:
        target = self.query(f"#err-{fid}") if fid else None
        if target:
            err = target.first(Static)
            self.query_one(f"#{fid}").add_class("-invalid")
        else:
            err = self.query_one("#form-error", Static)
        err.update(text)
        err.display = True
        if fid:
            self.query_one(f"#{fid}").focus()

    def errors(self) -> dict[str, str]:
        """Visible error texts by field id ("form" for the general line); used by tests."""
        out = {}
        for err in self.query(".field-error"):
            if err.display:
                out[str(err.id).removeprefix("err-")] = str(err.content)
        general = self.query_one("#form-error", Static)
        if general.display:
            out["form"] = str(general.content)
        return out

    # ---- actions ----------------------------------------------------------------
    def action_submit(self) -> None:
        cfg = self.build_config()
        if cfg is None:
            return
        try:
            s = session_mod.create(cfg, self.app.root)
        except (OSError, MinigptError) as e:
            self._show_error(None, e.line() if isinstance(e, MinigptError) else f"cannot create the session: {e}")
            return
        self.created = s
        self.app.launch_session(s)
        self.app.pop_screen()
        self.app.open_monitor(s)

    def action_cancel(self) -> None:
        self.app.pop_screen()

    def palette_commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        return [("run: create & launch", "Validate the form, create the session and launch it", self.action_submit),
                ("run: cancel", "Leave the form", self.action_cancel)]


def _section(title: str) -> ComposeResult:
    yield Label(title, classes="form-section")


def _row(label: str, widget) -> ComposeResult:
    yield Horizontal(Label(label, classes="field-label"), widget, classes="field-row")
    yield Static("", id=f"err-{widget.id}", classes="field-error", markup=False)
