"""New run: a form that builds a `RunConfig`, creates the session and launches it detached.

Validation is the engine's own (`engine.config.from_dict`, what `minigpt run` uses), so the
form can never accept a config the runner would reject. Every problem is shown at once:
the engine stops at its first error, so the form names that field, puts the field back to a
known-good value and asks again, until the config passes (`collect_errors`). The form
starts from sizes that finish on a CPU box (`CPU_DEFAULTS`), or from a config file or one of
`configs/*.toml`; keys the form has no field for are kept from what it started from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, Select, Static

from engine import config as config_mod
from engine.run import session as session_mod
from engine.errors import MinigptError

from ..widgets import Tick, TitleBar

if TYPE_CHECKING:
    from ..app import MinigptApp

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODEL_PRESETS = [
    ("embedded:smollm2 (tiny, offline)", "embedded:smollm2"),
    ("embedded:gemma3-270m (offline, setup.sh --gemma)", "embedded:gemma3-270m"),
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
# What a run from the form does unless told otherwise: the measured best cheap setting
# (README: wanda + lstsq keeps quality at 30%), recovery on, sizes that end in minutes on 2
# CPU cores with SmolLM2-135M (a forward pass runs at ~430 tokens/s there).
CPU_DEFAULTS: dict = {
    "calibrate": {"max_tokens": 4096, "block_size": 512, "batch_size": 2},
    "prune": {"rule": "ratio", "ratio": 0.3, "criterion": "wanda", "compensation": "lstsq"},
    "finetune": {"enabled": True, "max_steps": 20, "batch_size": 2, "block_size": 256, "eval_every": 10,
                 "checkpoint_every": 10, "keep_checkpoints": 1, "lr": 5e-5},
    "evaluate": {"max_tokens": 4096, "block_size": 512, "batch_size": 4, "mcq_generate": 0},
}
CPU_TOKENS_PER_S = 430.0  # SmolLM2-135M forward on this project's 2-core box (README); backward ≈ 2 forwards

_CHOICE = lambda values: [(v, v) for v in values]  # noqa: E731
# (config key, label, kind, widget id, placeholder or options); kinds: text int float select bool
# list (comma-separated words)
SECTIONS: list[tuple[str, list[tuple[str, str, str, str, Any]]]] = [
    ("Model", [
        ("model.source", "model", "text", "f-model", "e.g. microsoft/phi-1_5, ./model or x.gguf"),
        ("name", "name", "text", "f-name", "optional — default: date-model-domain"),
        ("model.device", "device", "select", "f-device", [("auto (cuda if present)", "auto"), ("cpu", "cpu"),
                                                          ("cuda", "cuda")]),
    ]),
    ("Domain corpus", [
        ("data.source", "source", "text", "f-domain", "builtin:NAME, a hub id or a path"),
        ("data.column", "column", "text", "f-column", "e.g. text (hub/JSONL column)"),
        ("data.template", "template", "text", "f-template", 'e.g. {question}\\n{answer} (overrides column)'),
    ]),
    ("Calibrate", [
        ("calibrate.max_tokens", "tokens", "int", "f-cal-tokens", "e.g. 4096"),
        ("calibrate.block_size", "block size", "int", "f-cal-block", "e.g. 512"),
        ("calibrate.batch_size", "batch size", "int", "f-cal-batch", "e.g. 2"),
    ]),
    ("Pruning", [
        ("prune.mode", "mode", "select", "f-mode", [("structural (weights removed)", "structural"),
                                                    ("mask (zeroed, shapes kept)", "mask")]),
        ("prune.rule", "rule", "select", "f-rule", [("ratio of MLP neurons", "ratio"),
                                                    ("threshold ε on the score (paper)", "threshold")]),
        ("prune.ratio", "ratio", "float", "f-ratio", "e.g. 0.3 (fraction removed)"),
        ("prune.activation_threshold", "threshold ε", "float", "f-threshold", "e.g. 0.001"),
        ("prune.criterion", "criterion", "select", "f-criterion", _CHOICE(config_mod.CRITERIA)),
        ("prune.allocation", "allocation", "select", "f-allocation", _CHOICE(config_mod.ALLOCATIONS)),
        ("prune.compensation", "compensation", "select", "f-compensation", _CHOICE(config_mod.COMPENSATIONS)),
        ("prune.sequential", "", "bool", "f-sequential", "sequential: refit layer by layer (best, slower)"),
        ("prune.round_to", "round widths to", "int", "f-round-to", "e.g. 1, 8 or 64"),
    ]),
    ("Compression: heads, width, depth, a budget", [
        ("prune.head_ratio", "head ratio", "float", "f-head-ratio", "e.g. 0.25 of query heads; 0 = off"),
        ("prune.head_mode", "head mode", "select", "f-head-mode",
         [("uniform (one count per layer: loads stock)", "uniform"), ("per_layer (counts per layer)", "per_layer")]),
        ("prune.head_criterion", "head criterion", "select", "f-head-criterion", _CHOICE(config_mod.HEAD_CRITERIA)),
        ("prune.hidden_ratio", "hidden ratio", "float", "f-hidden-ratio", "e.g. 0.1 of residual channels; 0 = off"),
        ("prune.depth", "blocks dropped", "int", "f-depth", "e.g. 2 whole blocks; 0 = off"),
        ("prune.depth_criterion", "depth criterion", "select", "f-depth-criterion", _CHOICE(config_mod.DEPTH_CRITERIA)),
        ("prune.target_params", "param budget", "float", "f-target-params",
         "e.g. 0.5 (share kept) or 6e7 (a count); 0 = off"),
        ("prune.search_axes", "search axes", "list", "f-search-axes", "e.g. " + ", ".join(config_mod.SEARCH_AXES)),
        ("prune.search_candidates", "candidates", "int", "f-search-candidates", "e.g. 6 mixes within the budget"),
        ("prune.search_steps", "steps each", "int", "f-search-steps", "e.g. 8 distillation steps per candidate"),
        ("prune.search_tolerance", "tolerance", "float", "f-search-tolerance", "e.g. 0.05 of the budget"),
        ("prune.search_speedup", "speed floor", "float", "f-search-speedup",
         "e.g. 2.0x fewer MACs per token; 0 = off"),
    ]),
    ("Fine-tune (recovery)", [
        ("finetune.enabled", "", "bool", "f-finetune", "fine-tune after pruning"),
        ("finetune.max_steps", "max steps", "int", "f-steps", "e.g. 20"),
        ("finetune.lr", "learning rate", "float", "f-lr", "e.g. 5e-5"),
        ("finetune.batch_size", "batch size", "int", "f-ft-batch", "e.g. 2"),
        ("finetune.block_size", "block size", "int", "f-ft-block", "e.g. 256"),
        ("finetune.eval_every", "eval every", "int", "f-eval-every", "steps; 0 = never"),
        ("finetune.checkpoint_every", "ckpt every", "int", "f-ckpt-every", "steps; 0 = at the end"),
        ("finetune.keep_checkpoints", "keep ckpts", "int", "f-keep-ckpt", "e.g. 1"),
        ("finetune.loss", "recovery loss", "select", "f-loss",
         [("ce (cross-entropy on the corpus)", "ce"), ("kd (distil from the unpruned model)", "kd")]),
        ("finetune.kd_temperature", "KD temperature", "float", "f-kd-temperature", "e.g. 1 (Minitron's best)"),
        ("finetune.kd_ce_weight", "KD + CE weight", "float", "f-kd-ce-weight", "e.g. 0 (pure KL) or 0.5"),
        ("finetune.teacher_steps", "teacher steps", "int", "f-teacher-steps", "e.g. 0 (off); fine-tune the teacher first"),
        ("finetune.control", "", "bool", "f-control", "control: also recover the unpruned model, same budget"),
    ]),
    ("Evaluate", [
        ("evaluate.max_tokens", "max tokens", "int", "f-eval-tokens", "e.g. 4096"),
        ("evaluate.block_size", "block size", "int", "f-eval-block", "e.g. 512"),
        ("evaluate.mcq_generate", "MCQ questions", "int", "f-mcq", "e.g. 0 (none) or 100"),
        ("evaluate.evaluate_base", "", "bool", "f-eval-base", "also evaluate the unpruned base model"),
    ]),
]
FIELDS = {key: (label, kind, fid, extra) for _, rows in SECTIONS for key, label, kind, fid, extra in rows}
# config key → form field id, so an engine error lands under the right field
FIELD_FOR_KEY = {key: spec[2] for key, spec in FIELDS.items()}
FINETUNE_FIELDS = [FIELDS[k][2] for k in FIELDS if k.startswith("finetune.") and k != "finetune.enabled"]
KD_FIELDS = ("f-kd-temperature", "f-kd-ce-weight")  # only read when the recovery loss is kd


def form_defaults() -> dict:
    """The config the form starts from: the engine's defaults under CPU_DEFAULTS."""
    data = config_mod.RunConfig().to_dict()
    for section, values in CPU_DEFAULTS.items():
        data[section].update(values)
    return config_mod.from_dict(data).to_dict()


def _get(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _named_keys(problem: str) -> list[str]:
    """Every form key a problem names: in full (`finetune.kd_temperature = …`), or bare after a
    key of the same section (`…, kd_ce_weight = -1, teacher_steps = 0 are invalid`)."""
    import re

    full = [k for k in FIELD_FOR_KEY if "." in k and k in problem]
    sections = {k.split(".")[0] for k in full}
    bare = [k for k in FIELD_FOR_KEY if "." in k and k not in full and k.split(".")[0] in sections
            and re.search(rf"(?<![\w.]){re.escape(k.split('.', 1)[1])}\b", problem)]
    return full + bare


def collect_errors(data: dict, fallback: dict, max_rounds: int = 40) -> tuple[dict[str, str], str | None]:
    """Every problem the engine's validator finds, by config key, plus one it cannot pin on a
    field. Of the fields a problem names, the culprits are those whose reset to `fallback`'s value
    alone makes that problem go away (all it names if none does): each gets the problem, is
    reset, and the config is checked again."""
    data = copy.deepcopy(data)
    found: dict[str, str] = {}

    def clears(key: str, err: MinigptError) -> bool:
        trial = copy.deepcopy(data)
        _set(trial, key, _get(fallback, key))
        try:
            config_mod.from_dict(trial)
            return True
        except MinigptError as e:  # the same check fails again: same fix, same keys (values may differ)
            return (e.fix, _named_keys(e.problem)) != (err.fix, _named_keys(err.problem))

    for _ in range(max_rounds):
        try:
            config_mod.from_dict(data)
            return found, None
        except MinigptError as e:
            named = [k for k in _named_keys(e.problem) if k not in found]
            culprits = [k for k in named if clears(k, e)] or named
            if not culprits:
                return found, e.line()
            for key in culprits:
                found[key] = e.line()
                _set(data, key, _get(fallback, key))
    return found, None


def estimate(data: dict) -> str:
    """Projected tokens per stage and a rough time on a 2-core CPU box (SmolLM2-135M rates)."""
    cal = int(_get(data, "calibrate.max_tokens") or 0)
    ev = int(_get(data, "evaluate.max_tokens") or 0) * (2 if _get(data, "evaluate.evaluate_base") else 1)
    ft = teacher = 0
    per_step = 3  # forward + backward (≈ 2 forwards)
    if _get(data, "finetune.enabled"):
        step_tokens = (int(_get(data, "finetune.batch_size") or 0) * int(_get(data, "finetune.block_size") or 0)
                       * int(_get(data, "finetune.grad_accum") or 1))
        ft = int(_get(data, "finetune.max_steps") or 0) * step_tokens
        teacher = int(_get(data, "finetune.teacher_steps") or 0) * step_tokens
        if _get(data, "finetune.loss") == "kd":
            per_step = 4  # plus the teacher's forward on every batch
        if _get(data, "finetune.control"):
            ft *= 2  # the unpruned control gets the same budget, and one more evaluation
            ev += int(_get(data, "evaluate.max_tokens") or 0)
    if min(cal, ev, ft, teacher) < 0:
        raise ValueError("negative budget")
    seconds = (cal + ev + per_step * ft + 3 * teacher) / CPU_TOKENS_PER_S
    from ..data import fmt_count, fmt_duration

    extra = f" · teacher {fmt_count(teacher)} tok" if teacher else ""
    return (f"projected: calibrate {fmt_count(cal)} tok{extra} · fine-tune {fmt_count(ft)} tok · evaluate "
            f"{fmt_count(ev)} tok · ≈{fmt_duration(seconds)} on 2 CPU cores for SmolLM2-135M "
            "(plus model load; larger models scale with their size)")


class NewRunScreen(Screen):
    """The new-run form. ctrl+s validates, creates the session folder and launches it."""

    HELP = ("Every field is a run-config key; keys without a field keep the value of the config the "
            "form started from (the CPU defaults, a file loaded with ctrl+o, or a configs/ preset). "
            "ctrl+s checks everything with the engine's validator, shows every problem under its "
            "field, then creates the session and starts it in the background. ctrl+w saves the form "
            "as a config file to the path in 'config file'. Compression sets the other axes (attention "
            "heads, hidden width, whole blocks) and a parameter budget searched over the chosen axes; "
            "the recovery loss is cross-entropy or distillation (kd) from the unpruned model.")
    BINDINGS = [
        Binding("ctrl+s", "submit", "Create & launch", id="new.submit", priority=True),
        Binding("ctrl+o", "load", "Load config", id="new.load", priority=True),
        Binding("ctrl+w", "save", "Save config", id="new.save", priority=True),
        Binding("escape", "cancel", "Cancel", id="new.cancel"),
    ]

    app: "MinigptApp"

    def __init__(self) -> None:
        super().__init__()
        self.created: session_mod.Session | None = None
        self.base: dict = form_defaults()

    def compose(self) -> ComposeResult:
        presets = [("CPU defaults (ratio 0.3, wanda + lstsq, recovery)", "")] + [
            (p.name, str(p)) for p in sorted(CONFIGS.glob("*.toml")) if not p.name.startswith(("grid", "sweep"))]
        yield TitleBar("minigpt · new run", id="title")
        yield Static("", id="form-summary", markup=False)  # stays in view while the form scrolls
        with VerticalScroll(id="form"):
            yield Label("Start from", classes="form-section first")
            yield from _row("preset", Select(presets, value="", allow_blank=False, id="f-start", compact=True))
            yield from _row("config file", Input("", placeholder="path/to/run.toml — ctrl+o loads, ctrl+w saves",
                                                 id="f-config-path", compact=True))
            for title, rows in SECTIONS:
                yield from _section(title)
                for key, label, kind, fid, extra in rows:
                    if key == "model.source":
                        yield from _row("preset", Select(MODEL_PRESETS, value="embedded:smollm2", allow_blank=False,
                                                         id="f-model-preset", compact=True))
                    if key == "data.source":
                        yield from _row("corpus", Select(DOMAIN_PRESETS, value="builtin:licenses",
                                                         allow_blank=False, id="f-domain-preset", compact=True))
                    yield from _row(label, _widget(kind, fid, extra))
            yield Static("", id="estimate", markup=False)
            yield Static("", id="form-error", markup=False)
            with Horizontal(id="form-buttons"):
                yield Button("Create & launch (ctrl+s)", variant="primary", id="submit", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)
        yield Footer()

    AUTO_FOCUS = "#f-model"

    def on_mount(self) -> None:
        self.fill(self.base)

    # ---- filling from a config ------------------------------------------------------
    def fill(self, data: dict) -> None:
        """Show `data` (a config dict) in the fields; it becomes the base for keys without one."""
        self.base = copy.deepcopy(data)
        for key, (_label, kind, fid, extra) in FIELDS.items():
            value = _get(data, key)
            w = self.query_one(f"#{fid}")
            if kind == "bool":
                w.value = bool(value)  # type: ignore[attr-defined]
            elif kind == "select":
                options = [v for _, v in extra]
                if value in options:
                    w.value = value  # type: ignore[attr-defined]
            elif kind == "list":
                w.value = ", ".join(str(v) for v in (value or []))  # type: ignore[attr-defined]
            else:
                w.value = "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))  # type: ignore[attr-defined]
        source = str(_get(data, "model.source") or "")
        models = [v for _, v in MODEL_PRESETS]
        self.query_one("#f-model-preset", Select).value = source if source in models else "custom"
        self.query_one("#f-model", Input).value = source
        domain = str(_get(data, "data.source") or "")
        kind = domain if domain in ("builtin:licenses", "builtin:stdlib-docs") else (
            "local" if Path(domain).expanduser().exists() else "hub")
        self.query_one("#f-domain-preset", Select).value = kind
        self.query_one("#f-domain", Input).value = domain
        self._sync_enabled()

    def _sync_enabled(self) -> None:
        rule = self.query_one("#f-rule", Select).value
        self.query_one("#f-threshold", Input).disabled = rule != "threshold"
        self.query_one("#f-ratio", Input).disabled = rule != "ratio"
        self.query_one("#f-allocation", Select).disabled = rule != "ratio"
        self.query_one("#f-sequential", Tick).disabled = rule != "ratio"
        on_ = bool(self.query_one("#f-finetune", Tick).value)
        kd = self.query_one("#f-loss", Select).value == "kd"
        for fid in FINETUNE_FIELDS:
            self.query_one(f"#{fid}").disabled = not on_ or (fid in KD_FIELDS and not kd)
        self._update_estimate()

    def _update_estimate(self) -> None:
        data, _errors = self.form_data()
        try:
            text = estimate(data)
        except (TypeError, ValueError):
            text = "projected: fix the numbers above to see the token counts"
        self.query_one("#estimate", Static).update(text)

    # ---- reacting to choices ------------------------------------------------------
    @on(Select.Changed, "#f-start")
    def _start_preset(self, event: Select.Changed) -> None:
        if not isinstance(event.value, str):
            return
        if event.value == "":
            self.fill(form_defaults())
            return
        self.query_one("#f-config-path", Input).value = event.value
        self.action_load()

    @on(Select.Changed, "#f-model-preset")
    def _model_preset(self, event: Select.Changed) -> None:
        box = self.query_one("#f-model", Input)
        if event.value == "custom":
            if box.value in [v for _, v in MODEL_PRESETS]:
                box.value = ""
                box.focus()
        elif isinstance(event.value, str):
            box.value = event.value

    @on(Select.Changed, "#f-domain-preset")
    def _domain_preset(self, event: Select.Changed) -> None:
        box = self.query_one("#f-domain", Input)
        if event.value in ("hub", "local"):
            if box.value.startswith("builtin:"):
                box.value = ""
            box.placeholder = ("hub dataset id, e.g. user/name" if event.value == "hub"
                               else "path to a .txt / .jsonl file or a folder")
        elif isinstance(event.value, str):
            box.value = event.value

    @on(Select.Changed, "#f-rule")
    @on(Select.Changed, "#f-loss")
    @on(Tick.Changed, "#f-finetune")
    def _toggles(self) -> None:
        self._sync_enabled()

    @on(Input.Changed)
    @on(Tick.Changed)
    @on(Select.Changed)
    def _changed(self) -> None:
        self._update_estimate()

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
        """The form as a config dict (over the base it started from), plus per-field problems
        the engine cannot see (numbers that do not parse, a local path that does not exist);
        such a field keeps the base's value in the dict."""
        errors: dict[str, str] = {}
        data = copy.deepcopy(self.base)
        for key, (label, kind, fid, _extra) in FIELDS.items():
            w = self.query_one(f"#{fid}")
            if getattr(w, "disabled", False) and kind != "bool":
                continue  # an option that is off (the other rule, fine-tuning disabled) keeps its value
            raw = w.value  # type: ignore[attr-defined]
            if kind in ("int", "float"):
                text = str(raw).strip()
                try:
                    value: Any = int(text) if kind == "int" else float(text)
                except ValueError:
                    what = label or key
                    errors[fid] = f"{what} must be {'a whole number' if kind == 'int' else 'a number'}, got {text!r}"
                    continue
            elif kind == "bool":
                value = bool(raw)
            elif kind == "list":
                value = [w for w in str(raw).replace(",", " ").split() if w]
            elif kind == "select":
                if not isinstance(raw, str):
                    continue
                value = raw
            else:
                value = str(raw).strip()
                if key == "data.template":
                    value = str(raw).replace("\\n", "\n")
                if key == "data.column":
                    value = value or "text"
            _set(data, key, value)
        domain = str(self._val("f-domain")).strip()
        if not domain:
            errors["f-domain"] = "the domain corpus is empty — pick a built-in or type a hub id or path"
        elif self._val("f-domain-preset") == "local":
            if not Path(domain).expanduser().exists():
                errors["f-domain"] = f"local path {domain} does not exist — check the path"
            _set(data, "data.source", str(Path(domain).expanduser()))
        if not str(self._val("f-model")).strip():
            errors["f-model"] = "the model is empty — pick a preset or type a hub id / folder"
        if not data.get("name"):
            data.pop("name", None)
        return data, errors

    def validate(self) -> tuple[config_mod.RunConfig | None, dict[str, str]]:
        """(config, {}) when every field passes; else (None, {field id or "form": problem})."""
        data, errors = self.form_data()
        fallback = form_defaults()
        found, general = collect_errors(data, fallback)
        for key, line in found.items():
            errors.setdefault(FIELD_FOR_KEY[key], line)
        if general:
            errors["form"] = general
        if errors:
            return None, errors
        return config_mod.from_dict(data), {}

    def build_config(self) -> config_mod.RunConfig | None:
        self._clear_errors()
        cfg, errors = self.validate()
        for fid, text in errors.items():
            self._show_error(None if fid == "form" else fid, text)
        if errors:
            labels = {spec[2]: (spec[0] or key.split(".")[-1]) for key, spec in FIELDS.items()}
            labels.update({"f-config-path": "config file", "form": "the config"})
            names = [labels.get(fid, fid) for fid in self._field_order() + ["form"] if fid in errors]
            summary = self.query_one("#form-summary", Static)
            summary.update(f"{len(errors)} problem{'s' if len(errors) > 1 else ''}: {', '.join(names)} "
                           "— each is shown under its field")
            summary.display = True
        first = next((fid for fid in self._field_order() if fid in errors), None)
        if first:
            self.query_one(f"#{first}").focus()
        return cfg

    def _field_order(self) -> list[str]:
        return [w.id for w in self.query(".field-row > *") if w.id]

    def _clear_errors(self) -> None:
        for err in self.query(".field-error"):
            err.display = False
        for w in self.query(".-invalid"):
            w.remove_class("-invalid")
        self.query_one("#form-error").display = False
        self.query_one("#form-summary").display = False

    def _show_error(self, fid: str | None, text: str) -> None:
        target = self.query(f"#err-{fid}") if fid else None
        if target:
            err = target.first(Static)
            self.query_one(f"#{fid}").add_class("-invalid")
        else:
            err = self.query_one("#form-error", Static)
        err.update(text)
        err.display = True

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
    def action_load(self) -> None:
        path = str(self._val("f-config-path")).strip()
        self._clear_errors()
        if not path:
            self._show_error("f-config-path", "type the path of a config .toml to load")
            return
        try:
            cfg = config_mod.load(Path(path).expanduser())
        except MinigptError as e:
            self._show_error("f-config-path", e.line())
            return
        self.fill(cfg.to_dict())
        self.notify(f"Loaded {path}", timeout=3)

    def action_save(self) -> None:
        path = str(self._val("f-config-path")).strip()
        cfg = self.build_config()
        if cfg is None:
            return
        if not path:
            self._show_error("f-config-path", "type a path to save the config to (e.g. my-run.toml)")
            return
        from engine import atomic

        try:
            target = Path(path).expanduser()
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(target, cfg.to_toml())
        except OSError as e:
            self._show_error("f-config-path", f"cannot write {path}: {e.strerror or e}")
            return
        self.notify(f"Saved {target}", timeout=3)

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
                ("config: load", "Load the config file named in 'config file'", self.action_load),
                ("config: save", "Save the form as a config file", self.action_save),
                ("run: cancel", "Leave the form", self.action_cancel)]


def _widget(kind: str, fid: str, extra: Any):
    if kind == "bool":
        return Tick(str(extra), False, id=fid, compact=True)
    if kind == "select":
        return Select(extra, value=extra[0][1], allow_blank=False, id=fid, compact=True)
    return Input("", placeholder=str(extra), id=fid, compact=True)


def _section(title: str) -> ComposeResult:
    yield Label(title, classes="form-section")


def _row(label: str, widget) -> ComposeResult:
    yield Horizontal(Label(label, classes="field-label"), widget, classes="field-row")
    yield Static("", id=f"err-{widget.id}", classes="field-error", markup=False)
