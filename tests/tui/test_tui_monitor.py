"""Run monitor: follows events.jsonl live (lines appended while the app is open), replays a
finished run, reports stopped/disconnected runners, and coalesces bursts of progress."""

from __future__ import annotations

import json
import time

from textual.widgets import DataTable, Log

from minigpt_tui.runview import RunView
from minigpt_tui.screens.monitor import MonitorScreen
from minigpt_tui.widgets import TextPlot
from tui_helpers import (NOW, T0, finished_events, head_events, make_session, screen_text, tail_events,
                         wait_for, write_events)


def _cells(table: DataTable, key: str) -> list[str]:
    return [str(c) for c in table.get_row(key)]


async def _monitor(pilot) -> MonitorScreen:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, MonitorScreen))
    screen = pilot.app.screen
    await wait_for(pilot, lambda: screen.settled)
    return screen


async def test_live_session_updates_as_lines_are_appended(root, make_app, runner):
    s = make_session(root, "live-run", head_events(), status="running", stage="calibrate",
                     completed=["baseline"], updated=NOW)
    app = make_app(attach="live-run")
    with s.acquire():  # this test process plays the runner
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await _monitor(pilot)
            assert screen.status == "running"
            tl = screen.query_one("#timeline", DataTable)
            assert _cells(tl, "baseline")[1] == "done"
            cal = _cells(tl, "calibrate")
            assert cal[1] == "running" and cal[2].endswith(" 50%") and cal[3] == "32.8K/65.5K tok"
            assert cal[5] == "eta 8s"
            assert screen.query_one("#layer-table", DataTable).row_count == 0
            assert _cells(screen.query_one("#metric-table", DataTable), "ppl")[:2] == ["ppl", "12.40"]
            assert "GPU 0 mem 10.0/80.0 GB █░░░░░░░░░ · peak 9.0 GB · util 87%" in screen_text(app)

            # the runner writes the rest of the run, in two bursts, while we watch
            tail = tail_events()
            cut = next(i for i, e in enumerate(tail) if e["type"] == "stage_start" and e["stage"] == "finetune")
            write_events(s.events_path, tail[:cut])
            await wait_for(pilot, lambda: screen.query_one("#layer-table", DataTable).row_count == 6)
            assert _cells(tl, "prune")[1] == "done"
            layer3 = _cells(screen.query_one("#layer-table", DataTable), "layer-3-model.layers.3.mlp")
            assert layer3[:5] == ["3", "model.layers.3.mlp", "1536→768", "2.7M→1.3M", " 50.0%"]
            assert "134.5M → 129.5M params, 3.7% removed" in str(screen.query_one("#layer-totals").content)

            write_events(s.events_path, tail[cut:-1])  # everything but run_end
            await wait_for(pilot, lambda: screen.view.n_events == len(head_events()) + len(tail) - 1
                           and screen.settled)
            metrics = screen.query_one("#metric-table", DataTable)
            assert _cells(metrics, "ppl") == ["ppl", "12.40", "16.90", "+36.3%", "13.77", "+11.0%"]
            assert _cells(metrics, "mcq_acc") == ["mcq_acc", "62.0%", "55.0%", "-7.0 pp", "60.0%", "-2.0 pp"]
            loss = screen.query_one("#loss-plot", TextPlot)
            assert len(loss.values) == 40 and loss.caption.startswith("loss 0.946")
            assert [p for _, p in screen.view.eval_ppl] == [16.9, 16.1, 15.3, 14.5, 13.7]
            assert _cells(tl, "finetune")[3] == "40/40 steps"
            log_lines = screen.query_one("#log-view", Log).lines
            assert "01:14 info  checkpoint at step 40" in log_lines
            assert "GPU 0 mem 22.0/80.0 GB" in screen_text(app) and "util 93%" in screen_text(app)

    # the runner goes away without a run_end: state still says running → disconnected
    async with make_app(attach="live-run").run_test(size=(120, 40)) as pilot:
        screen = await _monitor(pilot)
        assert screen.status == "disconnected"
        # the monitor, the first reader to find it so, appends the death record and shows it
        await wait_for(pilot, lambda: "runner died during calibrate" in screen_text(pilot.app))
        assert [e["type"] for e in s.events()].count("runner_died") == 1
        await pilot.press("r")
        assert runner.launched == [s.path]  # resume = launch again


async def test_finished_run_replays_from_the_log(root, make_app):
    make_session(root, "done-run", finished_events(), status="done", updated=NOW - 60)
    app = make_app(attach="done-run")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _monitor(pilot)
        assert screen.status == "done"
        tl = screen.query_one("#timeline", DataTable)
        assert [_cells(tl, st)[1] for st in ("baseline", "calibrate", "prune", "finetune", "evaluate")] == ["done"] * 5
        assert _cells(tl, "calibrate")[5] == "27s"
        text = screen_text(app)
        assert "DONE" in text and "ppl: base 12.40 → pruned 16.90 (+36.3%) → finetuned 13.77 (+11.0%)" in text
        assert not screen.query_one("#banner").display
        await pilot.press("2")
        assert "model.layers.5.mlp" in screen_text(app)
        await pilot.press("3")
        assert "Δ finetuned" in screen_text(app)
        await pilot.press("4")
        assert "runner exited: done" in screen_text(app)


async def test_gpu_line_follows_the_gpu_events_and_a_cpu_run_has_none(root, make_app):
    """`gpu` events come from CUDA runs only: one line per rank, utilisation only where measured;
    a run without any shows no GPU line at all (not a 'no samples' that never changes)."""
    cpu = [e for e in finished_events() if e["type"] != "gpu"]
    make_session(root, "cpu-run", cpu, status="done", updated=NOW - 60)
    gpu = [{"t": T0 + 7, "type": "gpu", "device": r, "rank": r, "mem_used_mb": 2048.0 * (r + 1),
            "mem_peak_mb": 1024.0, "mem_total_mb": 81920.0, "util_pct": None} for r in (1, 0)]
    make_session(root, "two-ranks", head_events() + gpu, status="stopped", stage="calibrate", completed=["baseline"])
    async with make_app(attach="cpu-run").run_test(size=(120, 40)) as pilot:
        screen = await _monitor(pilot)
        assert not screen.query_one("#gpu").display and "GPU" not in screen_text(pilot.app)
    async with make_app(attach="two-ranks").run_test(size=(120, 40)) as pilot:
        screen = await _monitor(pilot)
        lines = str(screen.query_one("#gpu").content).splitlines()
        assert screen.query_one("#gpu").display
        assert lines == ["GPU 0 (rank 0) mem 2.0/80.0 GB ░░░░░░░░░░ · peak 1.0 GB",
                         "GPU 1 (rank 1) mem 4.0/80.0 GB ░░░░░░░░░░ · peak 1.0 GB"]  # no util: no nvidia-ml-py


async def test_stopped_and_failed_runs_say_so(root, make_app, runner):
    ev = head_events() + [{"t": T0 + 20, "type": "run_end", "status": "stopped"}]
    make_session(root, "stopped-run", ev, status="stopped", stage="calibrate", completed=["baseline"])
    ev2 = head_events() + [{"t": T0 + 20, "type": "error", "stage": "calibrate",
                            "message": "CUDA out of memory — lower calibrate.batch_size"},
                           {"t": T0 + 20.1, "type": "run_end", "status": "failed"}]
    make_session(root, "failed-run", ev2, status="failed", stage="calibrate", completed=["baseline"],
                 error="CUDA out of memory — lower calibrate.batch_size")
    async with make_app(attach="stopped-run").run_test(size=(120, 40)) as pilot:
        screen = await _monitor(pilot)
        assert screen.status == "stopped"
        assert _cells(screen.query_one("#timeline", DataTable), "calibrate")[1] == "stopped"
        assert "stopped — r resumes" in screen_text(pilot.app)
        await pilot.press("s")  # not running: stop does nothing
        assert runner.stopped == []
    async with make_app(attach="failed-run").run_test(size=(120, 40)) as pilot:
        screen = await _monitor(pilot)
        assert _cells(screen.query_one("#timeline", DataTable), "calibrate")[1] == "failed"
        assert "failed: CUDA out of memory — lower calibrate.batch_size" in screen_text(pilot.app)


async def test_stop_from_the_monitor_calls_request_stop(root, make_app, runner):
    s = make_session(root, "live", head_events(), status="running", stage="calibrate", completed=["baseline"])
    with s.acquire():
        async with make_app(attach="live").run_test(size=(80, 24)) as pilot:
            await _monitor(pilot)
            await pilot.press("r")
            assert runner.launched == []  # already running
            await pilot.press("s")
            assert runner.stopped == [s.path]


async def test_bursts_are_coalesced_into_few_redraws(root, make_app):
    """2000 progress events arriving at once, and 30 small writes in quick succession, cost
    a handful of redraws (≤ 10/s), not one per event."""
    s = make_session(root, "burst", head_events(), status="running", stage="calibrate", completed=["baseline"])
    with s.acquire():
        async with make_app(attach="burst").run_test(size=(80, 24)) as pilot:
            screen = await _monitor(pilot)
            start, before = time.monotonic(), screen.render_count
            burst = [{"t": T0 + 20 + i / 1000, "type": "progress", "stage": "calibrate", "done": 32768 + i * 16,
                      "total": 65536, "unit": "tokens", "rate": 5000.0, "eta_s": 1.0} for i in range(2000)]
            write_events(s.events_path, burst)
            await wait_for(pilot, lambda: screen.view.n_events == len(head_events()) + 2000 and screen.settled)
            renders, elapsed = screen.render_count - before, time.monotonic() - start
            assert renders <= elapsed * 10 + 2 and renders < 20, (renders, elapsed)
            assert screen.view.stages["calibrate"].done == 32768 + 1999 * 16
            start, before = time.monotonic(), screen.render_count
            for i in range(30):
                write_events(s.events_path, [dict(burst[-1], done=65000 + i)])
                await pilot.pause(0.02)
            await wait_for(pilot, lambda: screen.view.stages["calibrate"].done == 65029 and screen.settled)
            renders, elapsed = screen.render_count - before, time.monotonic() - start
            assert renders <= elapsed * 10 + 2, (renders, elapsed)


async def test_torn_last_line_waits_for_its_newline(root, make_app):
    s = make_session(root, "torn", head_events(), status="running", stage="calibrate", completed=["baseline"])
    with s.acquire():
        async with make_app(attach="torn").run_test(size=(80, 24)) as pilot:
            screen = await _monitor(pilot)
            n = screen.view.n_events
            line = json.dumps({"t": T0 + 30, "type": "log", "level": "warn", "message": "half a line"})
            with open(s.events_path, "a") as f:
                f.write(line[:20])
            await pilot.pause(0.2)
            assert screen.view.n_events == n
            with open(s.events_path, "a") as f:
                f.write(line[20:] + "\n")
            await wait_for(pilot, lambda: screen.view.n_events == n + 1 and screen.settled)
            assert screen.query_one("#log-view", Log).lines[-1].endswith("warn  half a line")


async def test_replaying_a_long_finished_log_is_fast(root, make_app):
    """A finished run with 20k optimiser steps opens in about a second (bounds are loose for
    loaded CI machines; redrawing per event would take minutes)."""
    ev = finished_events(steps=20000)
    make_session(root, "long", ev, status="done")
    t = time.perf_counter()
    view = RunView()
    view.apply(ev)
    fold = time.perf_counter() - t
    assert fold < 2.0 and len(view.losses) == 20000
    start = time.perf_counter()
    async with make_app(attach="long").run_test(size=(120, 40)) as pilot:
        screen = await _monitor(pilot)
        opened = time.perf_counter() - start
        assert screen.view.n_events == len(ev)
        assert screen.query_one("#loss-plot", TextPlot).caption.startswith("loss ")
    assert opened < 6.0, f"replay took {opened:.2f}s"  # one redraw, not 20k (which takes minutes)


async def test_unknown_and_malformed_events_do_not_break_the_view(root, make_app):
    ev = head_events() + [{"t": T0 + 20, "type": "from_the_future", "x": 1},
                          {"t": T0 + 21, "type": "progress", "stage": "calibrate", "done": "oops"},
                          {"t": T0 + 22, "type": "layer_report", "mode": "mask", "rows": [], "totals": {}}]
    make_session(root, "odd", ev, status="stopped", stage="calibrate", completed=["baseline"], check=False,
                 results={})
    with open(root / "odd" / "events.jsonl", "a") as f:
        f.write("not json at all\n")
    async with make_app(attach="odd").run_test(size=(80, 24)) as pilot:
        screen = await _monitor(pilot)
        assert screen.status == "stopped"
        assert any("unreadable progress event" in line.message for line in screen.view.logs)


async def test_attach_to_a_missing_session_stays_home_with_an_error(root, make_app):
    app = make_app(attach="nope")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        assert not isinstance(app.screen, MonitorScreen)
        assert any("no session nope" in str(n.message) for n in app._notifications)


# ---- the monitor's truths: step counts from the run record, still state, empty plots, system pane ----
from tui_helpers import early_stop_events, make_session, resumed_events  # noqa: E402


def test_step_counts_after_a_resume_come_from_the_checkpoint():
    from minigpt_tui.runview import RunView

    v = RunView()
    v.apply(resumed_events(new_steps=0))
    ft = v.stages["finetune"]
    assert (ft.status, ft.done, ft.total) == ("running", 26, 40)  # not 0/40 until the first new step
    v.apply(resumed_events()[len(resumed_events(new_steps=0)):])
    assert (ft.done, ft.total) == (28, 40) and v.loss_steps[-3:] == [26, 27, 28]


def test_an_early_stop_reads_steps_done_not_the_limit():
    from minigpt_tui.runview import RunView

    v = RunView()
    v.apply(early_stop_events())
    ft = v.stages["finetune"]
    assert (ft.status, ft.done, ft.total, ft.note) == ("done", 10, 40, "target")
    assert v.end_status == "done"


async def test_monitor_shows_resumed_and_early_stopped_steps_and_why_plots_are_empty(root, make_app):
    root.mkdir(parents=True, exist_ok=True)
    make_session(root, "early", early_stop_events(), status="done")
    noft = [e for e in finished_events() if e["type"] not in ("train", "eval", "checkpoint")
            and e.get("stage") != "finetune"]
    noft.insert(next(i for i, e in enumerate(noft) if e["type"] == "stage_start" and e["stage"] == "evaluate"),
                {"t": T0 + 40, "type": "stage_skip", "stage": "finetune", "reason": "finetune.enabled = false"})
    make_session(root, "noft", noft, status="done")
    app = make_app(attach="early")
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.settled)
        text = screen_text(app)
        assert "10/40 steps (target)" in text and "step 10/40" in text
        assert "CPU 87%/2 cores · runner not running · session 2.6 GB · free 41.2 GB" in text
        app.pop_screen()
        from engine.run.session import open_session

        app.open_monitor(open_session("noft", root))
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.settled)
        assert screen_text(app).count("fine-tuning is off in this run") == 2


async def test_nan_loss_and_a_rising_held_out_ppl_alert_while_watching(root, make_app):
    root.mkdir(parents=True, exist_ok=True)
    s = make_session(root, "live", head_events() + tail_events()[:30], status="running", stage="finetune")
    with s.acquire():  # a live runner holds the lock
        app = make_app(attach="live")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.settled)
            assert app.alerts == []  # replaying what was there alerts nothing
            t = T0 + 200
            live = [{"t": t + i, "type": "eval", "step": 30 + i, "ppl": 20.0 + i, "target_ppl": None} for i in range(4)]
            live.append({"t": t + 5, "type": "train", "step": 35, "total_steps": 40, "loss": float("nan"), "lr": 5e-5,
                         "grad_norm": 1.0, "tokens_per_s": 8000.0, "eta_s": 5.0, "epoch": 0.2})
            write_events(s.events_path, live, check=False)
            await wait_for(pilot, lambda: len(app.alerts) == 2)
            titles = [a[0] for a in app.alerts]
            assert sorted(titles) == ["live: held-out ppl rising", "live: loss is nan"], app.alerts
