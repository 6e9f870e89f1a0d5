"""Producer → consumer: the real pipeline on a tiny model writes events.jsonl and results.json,
and the readers are fed exactly those files: the TUI reducer (`RunView`), the compare rows,
the grid table and the CLI display.

Three sessions, run in this process (no subprocess): structural pruning with vocabulary
pruning (embedding_threshold = 0) and sensitivity allocation, then resumed once it is done
(every stage skipped); mask mode; and a run that fails in its baseline (an impossible MCQ
setting). Each fine-tunes a few steps with held-out evaluations and checkpoints and scores
a few generated MCQs. Together they emit every kind of the run record except the CUDA-only
`gpu`, which is checked on an event built from the record's own field list.
"""

from __future__ import annotations

import io
import json
import random

import pytest
from rich.console import Console

import ft_case
from engine.errors import MinigptError
from engine.run import grid, pipeline, record
from engine.run import session as session_mod
from minigpt_tui import data, display, runview

CUDA_ONLY = {k for k, spec in record.KINDS.items() if spec.only_on == "cuda"}
# appended by a reader that finds the runner dead (kill -9): produced by a real SIGKILL in
# tests/test_runner_death.py, which feeds it to the same reducer and display
READER_WRITTEN = {k for k, spec in record.KINDS.items() if spec.writer == "reader"}


def _corpus(path) -> None:
    """Prose-like documents: sentences of 9-14 words, so MCQ questions can be generated."""
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(40):
            text = " ".join(" ".join(rng.choice(ft_case.WORDS) for _ in range(rng.randint(9, 14))).capitalize() + "."
                            for _ in range(6))
            f.write(json.dumps({"text": text}) + "\n")


def _sections(mode: str, **evaluate) -> dict:
    prune = {"mode": mode, "rule": "ratio", "ratio": 0.3, "min_keep": 4}
    if mode == "structural":  # vocabulary pruning, and a prune stage whose progress has phases
        prune.update(embedding_threshold=0.0, allocation="sensitivity", sensitivity_tokens=256)
    return dict(prune=prune,
                calibrate={"block_size": 32, "max_tokens": 1024, "batch_size": 2},
                finetune={"max_steps": 4, "eval_every": 2, "checkpoint_every": 2, "target_ppl_ratio": 0.0},
                evaluate={"block_size": 32, "max_tokens": 512, "batch_size": 4, "mcq_generate": 4, **evaluate})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, session_mod.Session]:
    tmp = tmp_path_factory.mktemp("producer")
    _corpus(tmp / "data" / "corpus.jsonl")
    out = {}
    with pytest.MonkeyPatch.context() as mp, ft_case.single_thread():
        mp.setenv("MINIGPT_CALIBRATION_CACHE", str(tmp / "calibration-cache"))
        for mode in ("structural", "mask"):
            s = ft_case.session(tmp, mode, ft_case.config(tmp, "gpt2", **_sections(mode)))
            pipeline.run(s)
            assert s.status() == "done", s.state()
            out[mode] = s
        pipeline.run(out["structural"])  # resumed when done: run_start(resumed), five stage_skip, run_end
        bad = ft_case.session(tmp, "failing", ft_case.config(tmp, "gpt2", **_sections("mask", mcq_choices=500)))
        with pytest.raises(MinigptError, match="too few for 500-choice questions"):
            pipeline.run(bad)
        assert bad.status() == "failed"
        out["failed"] = bad
    return out


def _events(s: session_mod.Session) -> list[dict]:
    return session_mod.Session(s.path).events()  # as any reader sees them: parsed from events.jsonl


def _results(s: session_mod.Session) -> dict:
    path = s.path / session_mod.RESULTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _emitted(runs) -> set[str]:
    return {e["type"] for s in runs.values() for e in _events(s)}


def _fields(e: dict) -> dict:
    return {k: v for k, v in e.items() if k not in ("t", "type")}


def _state(view: runview.RunView) -> str:
    """Everything the monitor draws from, without the clock and the event counter."""
    return repr({k: v for k, v in vars(view).items() if k not in ("t0", "last_t", "n_events")})


def _recording_display() -> tuple[display.Display, io.StringIO]:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, no_color=True, width=160, soft_wrap=True)
    return display.Display(console=console, plain=True), buf


def test_the_cli_display_shows_a_slow_rate_as_seconds_each():
    """A search at one candidate a minute read "0 items/s"; tokens/s stay whole numbers."""
    disp, buf = _recording_display()
    disp({"type": "progress", "stage": "prune", "phase": "search", "done": 4, "total": 4, "unit": "items",
          "rate": 0.02})
    disp({"type": "progress", "stage": "baseline", "done": 8192, "total": 8192, "unit": "tokens", "rate": 401.3})
    disp({"type": "progress", "stage": "finetune", "done": 32, "total": 32, "unit": "steps", "rate": 2.5})
    text = buf.getvalue()
    assert "4/4 items  50 s per item" in text and "8,192/8,192 tokens  401 tokens/s" in text
    assert "32/32 steps  2.5 steps/s" in text


# ---- (a) every kind the engine emits is the record's and is rendered ---------------------------------
def test_every_emitted_event_passes_the_record_as_read_back(runs):
    for s in runs.values():
        for e in _events(s):
            assert e["type"] in record.KINDS
            record.event(e["type"], _fields(e))  # after the JSON round trip too


def test_the_reducer_handles_every_emitted_kind_and_each_changes_the_view(runs):
    assert _emitted(runs) <= runview.HANDLED
    changed: dict[str, bool] = {}
    for s in runs.values():
        view = runview.RunView()
        for e in _events(s):
            before = _state(view)
            assert view.apply([e]) == 1
            changed[e["type"]] = changed.get(e["type"], False) or _state(view) != before
        assert not [line.message for line in view.logs if line.message.startswith("unreadable")]
        if s.status() == "done":
            # teacher correction and the control are off here: left out of the view
            assert [st.status for st in view.ordered_stages()] == ["done"] * (len(record.STAGES)
                                                                              - len(record.OPTIONAL_STAGES))
            assert view.end_status == "done" and view.error is None
            # the monitor (events) and the tables (results.json) read one value per metric
            assert view.metrics == data.results_metrics(_results(s))
            assert view.layer_report["totals"] == {k: v for k, v in _results(s)["prune"].items()
                                                   if k not in ("mode", "widths")}
            assert [st for st, _ in view.eval_ppl] == [0, 2, 4] and len(view.losses) == 4
            assert view.last_checkpoint == 4 and view.metric_names()[0] == "ppl"
        else:
            assert view.end_status == "failed" and view.stages["baseline"].status == "failed"
            assert "too few for 500-choice questions" in view.error
    assert [k for k, c in changed.items() if not c] == []


def test_the_cli_display_renders_every_emitted_kind(runs):
    assert _emitted(runs) <= display.HANDLED
    printed: dict[str, bool] = {}
    for s in runs.values():
        disp, buf = _recording_display()
        for e in _events(s):
            before = len(buf.getvalue())
            disp(e)
            printed[e["type"]] = printed.get(e["type"], False) or len(buf.getvalue()) > before
        disp.close()
        text = buf.getvalue()
        for e in _events(s):
            if e["type"] == "metric":
                assert f"  {e['model']} {e['name']} = " in text
            elif e["type"] in ("stage_start", "stage_end", "stage_skip"):
                assert e["stage"] in text
        assert f"run {s.status()}" in text
    assert [k for k, p in printed.items() if not p] == []


def test_the_cli_display_on_a_terminal_follows_runs_one_after_another(runs):
    """Live bars on a terminal (`minigpt run`, `logs -f`): a resumed session's second run, and
    the next session's, start bars of their own after the first run_end stopped them."""
    buf = io.StringIO()
    disp = display.Display(console=Console(file=buf, force_terminal=True, width=120))
    for s in runs.values():
        for e in _events(s):
            disp(e)
    disp.close()
    assert buf.getvalue().count("run done") == 3 and "run failed" in buf.getvalue()


# ---- (b) every kind the UI handles is emitted (CUDA-only ones: a sample from the record) --------------
def test_every_kind_the_ui_handles_is_emitted_by_the_engine(runs):
    emitted = _emitted(runs)
    assert CUDA_ONLY == {"gpu"} and READER_WRITTEN == {"runner_died"}
    assert runview.HANDLED - emitted == CUDA_ONLY | READER_WRITTEN
    assert display.HANDLED - emitted == CUDA_ONLY | READER_WRITTEN
    # and the engine emits every other kind of the record
    assert set(record.KINDS) - emitted == CUDA_ONLY | READER_WRITTEN


def _sample(kind: str, **values) -> dict:
    by_type = {"int": 0, "number": 40960.0, "number|null": None}
    fields = {f.name: values.get(f.name, by_type[f.type]) for f in record.KINDS[kind].fields}
    record.event(kind, fields)
    return {"t": 1.0, "type": kind, **fields}


@pytest.mark.parametrize("util", [None, 87.0])
def test_the_gpu_panel_renders_a_sample_built_from_the_record(util):
    ev = _sample("gpu", mem_used_mb=20480.0, mem_peak_mb=10240.0, util_pct=util)
    view = runview.RunView()
    before = _state(view)
    view.apply([ev])
    assert _state(view) != before and view.gpu_samples() == [ev]
    line = data.fmt_gpu(view.gpu_samples()[0])  # the monitor's line
    assert line.startswith("GPU 0 mem 20.0/40.0 GB █████░░░░░ · peak 10.0 GB")
    assert ("util" in line) == (util is not None) and (util is None or line.endswith("util 87%"))
    ranks = [_sample("gpu", device=r, rank=r) for r in (1, 0)]
    view.apply(ranks)
    assert [g["rank"] for g in view.gpu_samples()] == [0, 1]
    disp, buf = _recording_display()
    disp(ev)
    assert "GPU 0 (rank 0) mem 20.0/40.0 GB" in buf.getvalue()


def test_a_cuda_run_emits_gpu_events_that_the_readers_render(tmp_path, monkeypatch):
    """Where there is a GPU: the real `gpu` events of a run, not a built sample."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: gpu events are CUDA-only (checked above on a sample)")
    _corpus(tmp_path / "data" / "corpus.jsonl")
    monkeypatch.setenv("MINIGPT_CALIBRATION_CACHE", str(tmp_path / "calibration-cache"))
    cfg = ft_case.config(tmp_path, "gpt2", model={"device": "cuda"}, **_sections("mask"))
    s = ft_case.session(tmp_path, "cuda", cfg)
    pipeline.run(s)
    gpus = [e for e in _events(s) if e["type"] == "gpu"]
    assert gpus and all(e["mem_total_mb"] > 0 and e["mem_peak_mb"] > 0 for e in gpus)
    view = runview.RunView()
    view.apply(_events(s))
    assert view.gpu_samples() and data.fmt_gpu(view.gpu_samples()[0]).startswith(f"GPU {gpus[-1]['device']} mem ")


# ---- (c) the compare row and the grid row show results.json's numbers --------------------------------
@pytest.mark.parametrize("mode", ["structural", "mask"])
def test_compare_and_grid_rows_show_what_results_json_holds(runs, mode):
    s = session_mod.Session(runs[mode].path)
    res = _results(s)
    models = res["models"]
    assert set(models) == set(record.MODELS) - {"teacher", "control"}  # their stages are off here
    row = data.compare_row(s)
    meta = {"key": mode, "model": "tiny-gpt2", "domain": "corpus", "method": mode, "linear": -1.0,
            "activation": -1.0, "embedding": 0.0 if mode == "structural" else -1.0, "session": s.id}
    cell = grid.cell_row(meta, s)
    for model, prefix in (("base", "before"), ("pruned", "after"), ("finetuned", "finetuned")):
        m = models[model]
        assert row[f"ppl_{model}"] == cell[f"ppl_{model}"] == m["ppl"]
        assert row[f"params_{model}"] == cell[f"params_{prefix}"] == m["params"]
        assert row[f"mcq_{model}"] == m.get("mcq_acc")  # none for the pruned model when fine-tuning follows
    assert models["pruned"]["params"] < models["base"]["params"]
    assert row["pct_removed"] == res["prune"]["pct_removed"]
    assert cell["relative_size"] == models["pruned"]["params"] / models["base"]["params"]
    assert cell["mcq_before"] == models["base"]["mcq_acc_paper"] and cell["mcq_after"] == models["finetuned"]["mcq_acc_paper"]
    assert cell["ft_steps"] == res["finetune"]["steps"] == 4 and cell["vocab_pruned"] == (mode == "structural")
    # and the tables written from the rows carry the same numbers
    for writer in (data.to_csv([row]), grid.to_csv([cell])):
        assert all(str(models[m]["ppl"]) in writer for m in models)
    md = grid.to_markdown([cell])
    assert all(f"{models[m]['ppl']:.2f}" in md for m in models)


@pytest.mark.parametrize("mode", ["structural", "mask"])
def test_results_json_has_the_record_layout(runs, mode):
    """Sections and keys are the record's (RESULTS); models hold metrics, their protocols and the
    MCQ tables; each metric event's (last) value is the one in results.json."""
    res = _results(runs[mode])
    for name, section in res.items():
        assert name in record.RESULTS
        if record.RESULTS[name].keys:
            assert set(section) <= set(record.RESULTS[name].keys), (name, set(section) - set(record.RESULTS[name].keys))
    for model, entry in res["models"].items():
        for key in entry:
            assert key in record.METRICS or key in ("mcq", "mcq_protocol") or (
                key.endswith("_protocol") and key[:-len("_protocol")] in record.METRICS), (model, key)
    last = {(e["model"], e["name"]): e["value"] for e in _events(runs[mode]) if e["type"] == "metric"}
    assert last == data.results_metrics(res)
