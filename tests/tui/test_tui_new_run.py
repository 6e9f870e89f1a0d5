"""New-run form: a valid form writes config.toml through engine.run.session.create and launches
it detached (mocked only at engine.run.launch); invalid input is shown inline and launches nothing."""

from __future__ import annotations

from textual.widgets import Checkbox, Input, Select

from minigpt_tui.screens.new_run import collect_errors, form_defaults

from engine import config as config_mod
from engine.run import session as session_mod
from minigpt_tui.screens.monitor import MonitorScreen
from minigpt_tui.screens.new_run import NewRunScreen
from minigpt_tui.screens.sessions import SessionsScreen
from tui_helpers import screen_text, wait_for


async def _open_form(pilot) -> NewRunScreen:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, SessionsScreen) and pilot.app.screen.loaded)
    await pilot.press("n")
    assert isinstance(pilot.app.screen, NewRunScreen)
    return pilot.app.screen


async def _type_into(pilot, form: NewRunScreen, fid: str, text: str) -> None:
    box = form.query_one(f"#{fid}", Input)
    box.focus()
    await pilot.pause()
    box.value = ""
    await pilot.press(*text)


async def test_submit_creates_the_session_and_launches_it(root, make_app, runner):
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        form = await _open_form(pilot)
        form.query_one("#f-model-preset", Select).value = "microsoft/phi-1_5"
        await pilot.pause()
        assert form.query_one("#f-model", Input).value == "microsoft/phi-1_5"  # preset fills the field
        form.query_one("#f-domain-preset", Select).value = "builtin:stdlib-docs"
        form.query_one("#f-rule", Select).value = "ratio"
        await pilot.pause()
        assert form.query_one("#f-threshold", Input).disabled and not form.query_one("#f-ratio", Input).disabled
        await _type_into(pilot, form, "f-ratio", "0.25")
        await _type_into(pilot, form, "f-name", "phi docs")
        form.query_one("#f-finetune", Checkbox).value = True
        await pilot.pause()
        await _type_into(pilot, form, "f-steps", "120")
        await _type_into(pilot, form, "f-mcq", "50")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen))

        created = session_mod.list_sessions(root)
        assert [s.id for s in created] == ["phi-docs"]
        cfg = config_mod.load(created[0].path / "config.toml")
        assert cfg.model.source == "microsoft/phi-1_5"
        assert cfg.data.source == "builtin:stdlib-docs"
        assert (cfg.prune.rule, cfg.prune.ratio) == ("ratio", 0.25)
        assert (cfg.finetune.enabled, cfg.finetune.max_steps) == (True, 120)
        assert cfg.evaluate.mcq_generate == 50
        assert runner.launched == [created[0].path]
        assert app.screen.session.id == "phi-docs"
        await pilot.press("escape")  # back home, the new session is listed
        home = app.screen
        assert isinstance(home, SessionsScreen)
        await wait_for(pilot, lambda: [r["id"] for r in home.rows] == ["phi-docs"])


async def test_engine_validation_error_is_shown_under_its_field(root, make_app, runner):
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        form = await _open_form(pilot)
        form.query_one("#f-rule", Select).value = "ratio"
        await pilot.pause()
        await _type_into(pilot, form, "f-ratio", "1.5")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, NewRunScreen)
        errors = form.errors()
        # the engine's own MinigptError.line(), placed under the ratio field
        assert errors == {"f-ratio": "prune.ratio = 1.5 is outside [0, 1) — use a fraction such as 0.3"}
        assert form.query_one("#f-ratio", Input).has_class("-invalid")
        assert "prune.ratio = 1.5 is outside [0, 1)" in screen_text(app)
        assert session_mod.list_sessions(root) == [] and runner.launched == []
        # fixing it clears the error and goes through
        await _type_into(pilot, form, "f-ratio", "0.5")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen))
        assert len(runner.launched) == 1


async def test_bad_numbers_and_missing_local_path_are_caught_before_the_engine_and_escape_cancels(root, make_app, runner):
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        form = await _open_form(pilot)
        form.query_one("#f-rule", Select).value = "threshold"
        await pilot.pause()
        await _type_into(pilot, form, "f-threshold", "abc")
        form.query_one("#f-domain-preset", Select).value = "local"
        await pilot.pause()
        assert form.query_one("#f-domain", Input).value == ""
        await _type_into(pilot, form, "f-domain", "no/such/corpus.txt")
        await pilot.press("ctrl+s")
        await pilot.pause()
        errors = form.errors()
        assert errors["f-threshold"] == "threshold ε must be a number, got 'abc'"
        assert errors["f-domain"] == "local path no/such/corpus.txt does not exist — check the path"
        assert runner.launched == [] and session_mod.list_sessions(root) == []
        await pilot.press("escape")  # cancel leaves nothing behind
        assert isinstance(app.screen, SessionsScreen)
        assert session_mod.list_sessions(root) == [] and runner.launched == []


async def test_launch_failure_keeps_the_session_and_says_why(root, make_app, monkeypatch):
    import engine.run.launch as launch_mod
    from engine.errors import MinigptError

    def broken(path, stages=None):
        raise MinigptError("session x is already running", "follow it with: minigpt logs x -f")

    monkeypatch.setattr(launch_mod, "launch_detached", broken)
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        await _open_form(pilot)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen))
        assert len(session_mod.list_sessions(root)) == 1
        assert any("already running" in str(n.message) for n in app._notifications)


async def test_every_error_at_once_negative_numbers_refused_and_defaults_that_prune(root, make_app, runner):
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        form = await _open_form(pilot)
        # the defaults do something on SmolLM2: 30% by wanda + lstsq, recovery on, CPU-sized
        cfg, errors = form.validate()
        assert errors == {} and cfg is not None
        assert (cfg.prune.rule, cfg.prune.ratio, cfg.prune.criterion, cfg.prune.compensation) == \
            ("ratio", 0.3, "wanda", "lstsq")
        assert cfg.finetune.enabled and cfg.calibrate.max_tokens <= 8192 and cfg.finetune.keep_checkpoints == 1
        await _type_into(pilot, form, "f-steps", "-3")
        await _type_into(pilot, form, "f-ratio", "1.5")
        await _type_into(pilot, form, "f-cal-tokens", "abc")
        await pilot.press("ctrl+s")
        await pilot.pause()
        errors = form.errors()
        assert set(errors) == {"f-steps", "f-ratio", "f-cal-tokens"}, errors  # one ctrl+s, three errors
        assert errors["f-steps"].startswith("finetune.max_steps = -3 is negative")
        assert runner.launched == [] and session_mod.list_sessions(root) == []
        assert app.focused is form.query_one("#f-cal-tokens")  # the first invalid field, in form order
        form.query_one("#f-finetune").scroll_visible(animate=False)
        await pilot.pause()
        text = screen_text(app)
        assert "[x] fine-tune after pruning" in text and "[ ] sequential" in text  # glyphs differ


def test_collect_errors_uses_the_engine_validator_for_every_field():
    data = form_defaults()
    data["calibrate"]["batch_size"] = 0
    data["prune"]["criterion"] = "nope"
    data["finetune"]["keep_checkpoints"] = 0
    found, general = collect_errors(data, form_defaults())
    assert general is None and set(found) == {"calibrate.batch_size", "prune.criterion", "finetune.keep_checkpoints"}
    assert found["prune.criterion"].startswith("prune.criterion = 'nope' is not valid")


async def test_load_a_config_file_edit_and_save_it(root, make_app, runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative paths: every key typed re-validates the form
    src = tmp_path / "in.toml"
    cfg = config_mod.from_dict({"model": {"source": "microsoft/phi-1_5"}, "calibrate": {"max_tokens": 1024,
                                "block_size": 256}, "prune": {"rule": "ratio", "ratio": 0.5, "sequential": True},
                                "finetune": {"enabled": True, "warmup_steps": 7}})
    src.write_text(cfg.to_toml())
    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        form = await _open_form(pilot)
        await _type_into(pilot, form, "f-config-path", "in.toml")
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert form.query_one("#f-model", Input).value == "microsoft/phi-1_5"
        assert form.query_one("#f-cal-tokens", Input).value == "1024"
        assert form.query_one("#f-sequential", Checkbox).value is True
        await _type_into(pilot, form, "f-ratio", "0.4")
        await _type_into(pilot, form, "f-config-path", "out.toml")
        await pilot.press("ctrl+w")
        await pilot.pause()
        saved = config_mod.load(tmp_path / "out.toml")
        assert saved.prune.ratio == 0.4 and saved.prune.sequential and saved.calibrate.max_tokens == 1024
        assert saved.finetune.warmup_steps == 7  # a key without a field is kept from the loaded file


async def test_compression_and_distillation_keys_reach_the_config(root, make_app, runner):
    """#16 item 1: the prune budget and axes and the recovery loss are in the form, with selects
    for their choices; what the form builds is what engine.config reads."""
    from engine import config as config_mod
    from minigpt_tui.widgets import Tick

    app = make_app()
    async with app.run_test(size=(100, 40)) as pilot:
        form = await _open_form(pilot)
        assert form.query_one("#f-kd-temperature", Input).disabled  # read only with the kd loss
        for fid, choices in (("f-head-mode", config_mod.HEAD_MODES), ("f-head-criterion", config_mod.HEAD_CRITERIA),
                             ("f-depth-criterion", config_mod.DEPTH_CRITERIA), ("f-loss", config_mod.LOSSES)):
            assert tuple(v for _, v in form.query_one(f"#{fid}", Select)._options if v is not Select.BLANK) == choices
        form.query_one("#f-loss", Select).value = "kd"
        form.query_one("#f-head-mode", Select).value = "per_layer"
        form.query_one("#f-depth-criterion", Select).value = "loss"
        await pilot.pause()
        assert not form.query_one("#f-kd-temperature", Input).disabled
        for fid, text in (("f-head-ratio", "0.25"), ("f-hidden-ratio", "0.1"), ("f-depth", "2"),
                          ("f-target-params", "0.5"), ("f-search-axes", "mlp, heads depth"),
                          ("f-search-candidates", "4"), ("f-search-steps", "3"), ("f-search-tolerance", "0.1"),
                          ("f-search-speedup", "1.5"), ("f-kd-temperature", "2"), ("f-kd-ce-weight", "0.5"), ("f-teacher-steps", "5")):
            form.query_one(f"#{fid}", Input).value = text
        form.query_one("#f-control", Tick).value = True
        await pilot.pause()
        cfg, errors = form.validate()
        assert errors == {}, errors
        p, ft = cfg.prune, cfg.finetune
        assert (p.head_ratio, p.head_mode, p.head_criterion, p.hidden_ratio, p.depth, p.depth_criterion) == \
            (0.25, "per_layer", "norm", 0.1, 2, "loss")
        assert (p.target_params, p.search_axes, p.search_candidates, p.search_steps, p.search_tolerance,
                p.search_speedup) == (0.5, ["mlp", "heads", "depth"], 4, 3, 0.1, 1.5)
        assert (ft.loss, ft.kd_temperature, ft.kd_ce_weight, ft.teacher_steps, ft.control) == ("kd", 2.0, 0.5, 5, True)
        assert "teacher 2.6K tok" in str(form.query_one("#estimate").content)  # 5 steps x 2 x 256

        # three bad values, one ctrl+s: each problem under its own field (two share one engine message)
        form.query_one("#f-search-axes", Input).value = "mlp, wings"
        form.query_one("#f-search-tolerance", Input).value = "2"
        form.query_one("#f-kd-ce-weight", Input).value = "-1"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
        errors = form.errors()
        assert set(errors) == {"f-search-axes", "f-search-tolerance", "f-kd-ce-weight"}, errors
        assert "prune.search_axes" in errors["f-search-axes"] and "search_tolerance" in errors["f-search-tolerance"]
        assert "kd_ce_weight = -1" in errors["f-kd-ce-weight"]
        assert runner.launched == []


def test_a_config_file_with_the_new_keys_fills_the_form_and_round_trips():
    from engine import config as config_mod
    from minigpt_tui.screens.new_run import FIELDS

    for key in ("prune.head_ratio", "prune.head_mode", "prune.head_criterion", "prune.hidden_ratio", "prune.depth",
                "prune.depth_criterion", "prune.target_params", "prune.search_axes", "prune.search_candidates",
                "prune.search_steps", "prune.search_tolerance", "prune.search_speedup", "finetune.loss", "finetune.kd_temperature",
                "finetune.kd_ce_weight", "finetune.teacher_steps", "finetune.control"):
        assert key in FIELDS, key
        section, name = key.split(".")
        assert hasattr(getattr(config_mod.RunConfig(), section), name), key  # a real config key
