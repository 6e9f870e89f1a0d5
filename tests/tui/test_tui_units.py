"""Pure helpers behind the screens: the event reducer, text plots, formatting, exports.
Fast, no app needed; these pin the numbers the screens show."""

from __future__ import annotations

from minigpt_tui.data import bar, fmt_ago, fmt_count, fmt_duration, fmt_metric, fmt_rate, progress_text, to_markdown
from engine.run import record
from minigpt_tui.runview import METRIC_ORDER, RunView, delta
from minigpt_tui.widgets import plot_lines, resample
from tui_helpers import T0, finished_events, head_events


def test_reducer_folds_a_whole_run():
    v = RunView()
    assert v.apply(finished_events()) == len(finished_events())
    assert [s.status for s in v.ordered_stages()] == ["done"] * 5
    assert v.metric("base", "ppl") == 12.4031 and v.metric("finetuned", "mcq_acc") == 0.6
    assert len(v.losses) == 40 and v.loss_steps[-1] == 40
    assert v.layer_report["totals"]["pct_removed"] == 3.7
    assert v.end_status == "done" and v.error is None and v.runs == 1
    assert v.rel_time(T0 + 75) == "01:15" and v.rel_time(T0 + 3723) == "1:02:03"


def test_resume_after_a_stop_reopens_the_stopped_stage():
    v = RunView()
    v.apply(head_events() + [{"t": T0 + 20, "type": "run_end", "status": "stopped"}])
    assert v.stages["calibrate"].status == "stopped"
    v.apply([{"t": T0 + 100, "type": "run_start", "pid": 1, "resumed": True,
              "stages": ["baseline", "calibrate", "prune", "finetune", "evaluate"]},
             {"t": T0 + 100.1, "type": "stage_skip", "stage": "baseline", "reason": "completed"},
             {"t": T0 + 100.2, "type": "stage_start", "stage": "calibrate"}])
    assert v.runs == 2 and v.end_status is None
    assert v.stages["baseline"].status == "done" and v.stages["calibrate"].status == "running"


def test_disabled_stages_show_as_off():
    v = RunView()
    v.apply([{"t": T0, "type": "run_start", "pid": 1, "resumed": False, "stages": ["calibrate", "prune"]}])
    assert [v.stages[n].status for n in ("baseline", "calibrate", "finetune")] == ["off", "pending", "off"]


def test_deltas_know_which_direction_is_better():
    assert delta("ppl", 10.0, 12.0) == ("+20.0%", -1)
    assert delta("ppl", 10.0, 9.0) == ("-10.0%", 1)
    assert delta("mcq_acc", 0.62, 0.55) == ("-7.0 pp", -1)
    assert delta("params", 100.0, 75.0) == ("-25.0%", 1)
    assert delta("ppl", None, 3.0) == ("", 0)
    # the direction is the record's: sizes and counts are neutral, fractions move in points
    assert delta("vocab_size", 320.0, 300.0) == ("-6.2%", 0)
    assert delta("vocab_coverage", 1.0, 0.9) == ("-10.0 pp", -1)
    assert delta("tokens_per_s", 100.0, 150.0) == ("+50.0%", 1)


def test_the_metrics_tab_lists_every_metric_of_the_record_once():
    assert sorted(METRIC_ORDER) == sorted(record.METRICS) and METRIC_ORDER[0] == "ppl"


def test_formatting():
    assert fmt_ago(T0 - 5, T0) == "5s ago" and fmt_ago(T0 - 7200, T0) == "2h ago" and fmt_ago(None, T0) == "—"
    assert fmt_duration(3725) == "1h02m" and fmt_duration(65) == "1m05s" and fmt_duration(None) == "—"
    assert fmt_count(1_711_000_000) == "1.71B" and fmt_count(134_515_008) == "134.5M" and fmt_count(950) == "950"
    assert fmt_metric("mcq_acc", 0.625) == "62.5%" and fmt_metric("calibration_seconds", 65) == "1m05s"
    assert fmt_metric("calibration_tokens", 2048) == "2.0K"
    assert bar(0.5, 10) == "█████░░░░░" and bar(None, 4) == "····"
    # one formatter for the monitor (compact) and the CLI: slow units as seconds each in both
    assert fmt_rate(1234, "tokens") == "1.2K tok/s" and fmt_rate(1234, "tokens", compact=False) == "1,234 tokens/s"
    assert fmt_rate(1 / 50, "items") == fmt_rate(1 / 50, "items", compact=False) == "50 s per item"
    assert fmt_rate(None, "tokens") == fmt_rate(0, "tokens") == ""
    row = {"status": "running", "completed": ["baseline"]}
    assert progress_text(row, {"type": "train", "step": 30, "total_steps": 120}) == "1/5 25%"
    assert progress_text({"status": "done", "completed": []}, None) == "100%"


def test_plot_is_zero_based_when_asked_and_resamples_long_series():
    lines = plot_lines([12.5, 50.0], 18, 4, label_width=5, zero_based=True)
    assert lines[0].startswith("50.00│") and lines[-1].startswith("    0│")
    assert lines[-1][6:] == "█" * 6 + "█" * 6  # both bars reach the bottom row
    assert lines[0][6:] == " " * 6 + "█" * 6  # only 50 reaches the top
    assert resample(list(range(100)), 4) == [12.0, 37.0, 62.0, 87.0]
    assert resample([1.0, 2.0], 4) == [1.0, 1.0, 2.0, 2.0]


def test_markdown_export_escapes_pipes():
    md = to_markdown([{"id": "a|b", "model": "m", "domain": "d", "method": "x", "status": "done"}])
    assert "| a\\|b | m | d | x | — | done |" in md


def test_mcq_accuracy_carries_its_standard_error_and_n():
    from minigpt_tui.data import mcq_with_error

    res = {"models": {"finetuned": {"mcq": {"gen": {"acc": 0.75, "n": 16}}}}}
    assert mcq_with_error(res, "finetuned") == "75.0% ± 10.8 (n=16)"  # +6 points on 16 items is noise
    assert mcq_with_error(res, "base") is None
