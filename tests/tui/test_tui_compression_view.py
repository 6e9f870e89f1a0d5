"""The monitor and compare read the compression and distillation record (engine/run/record.py):
the teacher/control stages where a run plans them, the KL and CE parts of a distillation loss,
and layer reports that carry heads, KV groups, hidden width and dropped blocks. Old sessions
(none of these) read as before. The events are built through `record.event()` (write_events
checks every one) where the producers do not write them yet: the layer report's extra row keys."""

from __future__ import annotations

import pytest
from textual.widgets import DataTable

from engine.run import record
from minigpt_tui.runview import RunView
from minigpt_tui.screens.monitor import MonitorScreen, layer_pairs
from minigpt_tui.widgets import OverlayPlot, TextPlot
from tui_helpers import T0, finished_events, layer_report_event, make_session, screen_text, wait_for


# the record's distillation fields and optional stages (engine/run/record.py: kl, ce and stage on train
# events; teacher and control stages)
needs_kd_record = pytest.mark.skipif(
    "teacher" not in record.STAGES or "kl" not in {f.name for f in record.KINDS["train"].fields},
    reason="engine/run/record.py has no teacher stage or kl field yet")


def kd_events(steps: int = 12) -> list[dict]:
    """A finished run recovered by distillation: every train event carries kl and ce; a teacher
    correction trained 4 steps first (its own stage, its own train events)."""
    ev = []
    for e in finished_events(steps=steps):
        if e["type"] == "run_start":
            e = dict(e, stages=list(record.STAGES))
        if e["type"] == "train":
            kl = round(2.0 * 0.9 ** e["step"], 4)
            ce = round(3.0 * 0.95 ** e["step"], 4)
            e = dict(e, loss=round(kl + 0.5 * ce, 4), kl=kl, ce=ce)
        ev.append(e)
        if e["type"] == "stage_end" and e["stage"] == "baseline":
            t = e["t"]
            ev.append({"t": t + 0.01, "type": "stage_start", "stage": "teacher"})
            ev += [{"t": t + 0.02 + i / 100, "type": "train", "step": i, "total_steps": 4, "loss": 2.5 - i / 10,
                    "lr": 5e-5, "grad_norm": 1.0, "tokens_per_s": 900.0, "eta_s": 4.0 - i, "epoch": 0.1,
                    "stage": "teacher"} for i in range(1, 5)]
            ev.append({"t": t + 0.1, "type": "stage_end", "stage": "teacher", "seconds": 4.0})
        if e["type"] == "stage_end" and e["stage"] == "evaluate":
            ev.append({"t": e["t"] + 0.01, "type": "stage_skip", "stage": "control", "reason": "off (finetune.control)"})
    return ev


@needs_kd_record
def test_the_loss_parts_stay_aligned_and_other_stages_keep_their_own_steps():
    v = RunView()
    v.apply(kd_events())
    assert len(v.losses) == len(v.kls) == len(v.ces) == 12 and v.has_loss_parts()
    assert v.kls[0] == 1.8 and v.ces[0] == 2.85
    teacher = v.stages["teacher"]
    assert (teacher.status, teacher.done, teacher.total) == ("done", 4, 4)
    names = [s.name for s in v.ordered_stages()]
    assert names == ["baseline", "teacher", "calibrate", "prune", "finetune", "evaluate"]  # the control is off
    old = RunView()
    old.apply(finished_events())  # an old session: no kl/ce, five stages planned
    assert not old.has_loss_parts() and [s.name for s in old.ordered_stages()] == [
        "baseline", "calibrate", "prune", "finetune", "evaluate"]


@needs_kd_record
async def test_monitor_plots_kl_and_ce_and_lists_the_teacher(root, make_app):
    make_session(root, "kd-run", kd_events(), status="done")
    app = make_app(attach="kd-run")
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.settled)
        screen = app.screen
        parts = screen.query_one("#loss-parts", OverlayPlot)
        assert parts.display and not screen.query_one("#loss-plot", TextPlot).display
        assert [name for name, _, _ in parts.series] == ["loss", "KL", "CE"]
        assert all(len(ser) == 12 for _, _, ser in parts.series)
        text = screen_text(app)
        assert "● loss" in text and "▲ KL" in text and "■ CE" in text
        tl = screen.query_one("#timeline", DataTable)
        assert [str(c) for c in tl.get_row("teacher")][1:4:2] == ["done", "4/4 steps"]
        assert "control" not in [k.value for k in tl.rows]


async def test_old_sessions_keep_the_single_loss_plot(root, make_app):
    make_session(root, "ce-run", finished_events(), status="done")
    app = make_app(attach="ce-run")
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.settled)
        screen = app.screen
        assert screen.query_one("#loss-plot", TextPlot).display and not screen.query_one("#loss-parts").display
        assert [k.value for k in screen.query_one("#timeline", DataTable).rows] == [
            "baseline", "calibrate", "prune", "finetune", "evaluate"]


def compressed_report() -> dict:
    rep = layer_report_event(T0 + 33, [30.0] * 6)
    for r in rep["rows"]:  # the keys engine.prune.mlp.layer_report writes
        r.update(heads_before=9, heads_after=6, kv_before=3, kv_after=2 if r["layer"] % 2 else 3, dropped=False)
    rep["rows"][4].update(dropped=True, neurons_after=0, params_after=0, heads_after=0, kv_after=0, pct_removed=100.0)
    rep["totals"].update(heads_before=54, heads_after=30, hidden_before=576, hidden_after=512, dropped_blocks=[4])
    return rep


def test_layer_pairs_order():
    rows = compressed_report()["rows"]
    assert layer_pairs(rows) == ["neurons", "heads", "kv", "params"]
    unchanged = [dict(r, heads_after=r["heads_before"]) for r in rows[:4]]
    assert layer_pairs(unchanged, changed_only=True) == ["neurons", "kv", "params"]  # no head was cut
    assert layer_pairs(layer_report_event(T0, [10.0])["rows"]) == ["neurons", "params"]


async def test_layer_table_shows_heads_kv_groups_hidden_and_dropped_blocks(root, make_app):
    ev = [e if e["type"] != "layer_report" else compressed_report() for e in finished_events()]
    make_session(root, "heads-run", ev, status="done")
    app = make_app(attach="heads-run")
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.settled)
        await pilot.press("2")
        await pilot.pause()
        lt = app.screen.query_one("#layer-table", DataTable)
        assert [c.label.plain for c in lt.columns.values()][:6] == [
            "layer", "module", "neurons", "heads", "kv groups", "params"]
        row = [str(c) for c in lt.get_row("layer-1-model.layers.1.mlp")]
        assert row[2:5] == ["1536→1075", "9→6", "3→2"]
        dropped = [str(c) for c in lt.get_row("layer-4-model.layers.4.mlp")]
        assert dropped[2:5] == ["1536→dropped", "9→dropped", "3→dropped"]
        totals = str(app.screen.query_one("#layer-totals").content)
        assert "heads 54→30" in totals and "hidden 576→512" in totals and "blocks dropped: 4" in totals

    # a plain MLP run's report carries the same keys, unchanged: no head or kv column, no extra totals
    ev = [e if e["type"] != "layer_report" else plain_report() for e in finished_events()]
    make_session(root, "plain-run", ev, status="done")
    app = make_app(attach="plain-run")
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.settled)
        lt = app.screen.query_one("#layer-table", DataTable)
        assert [c.label.plain for c in lt.columns.values()] == ["layer", "module", "neurons", "params", "removed", ""]
        totals = str(app.screen.query_one("#layer-totals").content)
        assert "heads" not in totals and "hidden" not in totals and "dropped" not in totals


def plain_report() -> dict:
    rep = layer_report_event(T0 + 33, [30.0] * 6)
    for r in rep["rows"]:
        r.update(heads_before=9, heads_after=9, kv_before=3, kv_after=3, dropped=False)
    rep["totals"].update(heads_before=54, heads_after=54, hidden_before=576, hidden_after=576, dropped_blocks=[])
    return rep


@needs_kd_record
async def test_a_new_run_does_not_list_the_stages_its_config_leaves_off(root, make_app):
    """The runner plans every record stage and skips teacher/control as off later: until then the
    monitor reads the config (teacher_steps = 0, control = false) and does not list them."""
    ev = [{"t": T0, "type": "run_start", "pid": 4242, "resumed": False, "stages": list(record.STAGES)},
          {"t": T0 + 0.1, "type": "stage_start", "stage": "baseline"}]
    make_session(root, "fresh", ev, status="done", completed=[])
    make_session(root, "with-teacher", ev, status="done", completed=[],
                 overrides={"finetune": {"enabled": True, "teacher_steps": 5}})
    for name, expected in (("fresh", []), ("with-teacher", ["teacher"])):
        app = make_app(attach=name)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.settled)
            rows = [k.value for k in app.screen.query_one("#timeline", DataTable).rows]
            assert [r for r in rows if r in record.STAGES and r in ("teacher", "control")] == expected, rows
