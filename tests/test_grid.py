"""Grids: the spec, a resumable tiny run with shared calibration, the table and load_grid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from engine.run import grid
from engine.run import gridrun
from engine.run import pipeline
from engine import presets
from engine.errors import MinigptError
from engine.errors import MinigptError

ROOT = Path(__file__).resolve().parent.parent


def test_paper_grid_spec_cells_and_calibration_groups():
    spec = grid.spec_from_dict({"models": ["phi-1.5"], "domains": ["skyrim", "builtin:licenses"],
                                "thresholds": "paper"}, folder=Path("/tmp/unused"), name="p")
    assert len(spec.cells) == 2 * 18 * 2
    assert len({c.key for c in spec.cells}) == len(spec.cells) == len({c.digest for c in spec.cells})
    assert len({c.group for c in spec.cells}) == 2  # one calibration per model × domain
    c = spec.cells[0]
    assert (c.cfg.model.source, c.cfg.prune.mode, c.cfg.prune.rule) == ("microsoft/phi-1_5", "mask", "threshold")
    assert c.cfg.evaluate.mcq_files == [presets.mcq("skyrim").url]
    lic = [x for x in spec.cells if x.domain == "licenses"]  # a source that is a preset's is labelled by it
    assert lic and lic[0].cfg.data.source == "builtin:licenses"
    assert {(x.linear, x.activation, x.embedding) for x in spec.cells} == \
        {(t["linear"], t["activation"], t["embedding"]) for t in presets.paper_thresholds()}
    # a table of lists is their product; a config override reaches every cell
    s2 = grid.spec_from_dict({"thresholds": {"activation": [0.1, 0.2]}, "methods": ["structural"]},
                             overrides=["evaluate.max_tokens=999"], folder=Path("/tmp/unused"))
    assert [(x.linear, x.activation) for x in s2.cells] == [(-1.0, 0.1), (-1.0, 0.2)]
    assert all(x.cfg.evaluate.max_tokens == 999 for x in s2.cells)
    for bad, msg in (({"method": ["mask"]}, "unknown grid key method"), ({"methods": ["zero"]}, "grid method 'zero'"),
                     ({"thresholds": [{"lin": 1}]}, "unknown threshold key lin"),
                     ({"domains": ["nope-preset"], "run": {"data": {"split": 3}}}, "wrong type")):
        with pytest.raises(MinigptError, match=msg):
            grid.spec_from_dict(bad, folder=Path("/tmp/unused"))


def _tiny_grid(tmp_path: Path) -> tuple[grid.GridSpec, dict]:
    model = tiny.save("llama", tmp_path / "model")
    docs = [{"text": f"Document {i}. " + tiny.TEXT[(i * 37) % 500:(i * 37) % 500 + 300]} for i in range(30)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "q.json").write_text(json.dumps({"context": "Licences:", "questions": {
        "Permission is hereby granted, free of": {"choices": ["charge", "a horse", "the moon"], "answer": 0},
        "A function returns a": {"choices": ["value", "licence", "copy"], "answer": 0}}}))
    raw = {"name": "tiny", "models": [str(model)], "domains": [{"name": "toy", "source": str(tmp_path / "corpus.jsonl")}],
           "thresholds": [{"linear": -1, "activation": -1, "embedding": -1},  # prunes nothing
                          {"linear": 0.05, "activation": 0.25, "embedding": -1}],
           "run": {"calibrate": {"block_size": 64, "max_tokens": 512},
                   "evaluate": {"block_size": 64, "max_tokens": 256, "mcq_files": [str(tmp_path / "q.json")]},
                   "finetune": {"enabled": True, "max_steps": 2, "batch_size": 1, "block_size": 32, "eval_every": 0,
                                "checkpoint_every": 0},
                   "prune": {"allow_layer_collapse": True}}}
    return grid.spec_from_dict(raw, folder=tmp_path / "grid"), raw


def _events(s_path: Path, kind: str, stage: str | None = None) -> int:
    n = 0
    for line in (s_path / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        n += e["type"] == kind and (stage is None or e.get("stage") == stage)
    return n


def test_tiny_grid_runs_shares_calibration_resumes_and_tabulates(tmp_path, monkeypatch):
    spec, raw = _tiny_grid(tmp_path)
    # Ctrl-C during the first cell: it checkpoints and stops, and no other cell starts
    real_baseline = pipeline.STAGE_FUNCS["baseline"]

    def interrupted(ctx):
        os.kill(os.getpid(), signal.SIGINT)
        real_baseline(ctx)

    monkeypatch.setitem(pipeline.STAGE_FUNCS, "baseline", interrupted)
    out = gridrun.run_grid(spec, echo=lambda m: None)
    assert out["status"] == "stopped" and out["done"] == 0
    assert [r["status"] for r in grid.load_grid(spec.folder)] == ["stopped", "new", "new", "new"]
    monkeypatch.setitem(pipeline.STAGE_FUNCS, "baseline", real_baseline)
    out = gridrun.run_grid(grid.spec_from_dict(raw, folder=spec.folder), echo=lambda m: None)
    assert out == {"status": "done", "cells": 4, "done": 4, "failed": 0, "folder": str(spec.folder)}
    rows = grid.load_grid(spec.folder)
    assert [(r["method"], r["activation"]) for r in rows] == [("mask", -1.0), ("structural", -1.0),
                                                               ("mask", 0.25), ("structural", 0.25)]
    paths = [Path(r["session_path"]) for r in rows]
    # one calibration pass and one baseline for the whole grid: the other cells' calibrations are
    # hits in the shared calibration cache, their baselines copied from the first cell
    assert sum(_events(p, "stage_end", "baseline") for p in paths) == 1
    assert [r["calibration_cached"] for r in rows] == [False, True, True, True]
    assert sum(_events(p, "stage_end", "calibrate") for p in paths) == 4
    from safetensors.torch import load_file

    stats = [load_file(str(p / "stats" / "calibration.safetensors")) for p in paths]
    assert all(s.keys() == stats[0].keys() and all(torch.equal(s[k], stats[0][k]) for k in s) for s in stats)
    for r in rows:
        assert r["status"] == "done" and r["ppl_base"] == rows[0]["ppl_base"] > 1
        assert r["ppl_finetuned"] is not None and r["ft_steps"] in (0, 1, 2) and r["mcq_metric"] == "mcq_acc_paper"
        assert 0.0 <= r["mcq_before"] <= 1.0 and 0.0 <= r["mcq_after"] <= 1.0
    assert rows[0]["relative_size"] == rows[1]["relative_size"] == 1.0  # nothing pruned: same model
    assert rows[0]["ppl_pruned"] == pytest.approx(rows[0]["ppl_base"], rel=1e-5)
    assert rows[2]["relative_size"] < 1.0 and rows[3]["relative_size"] < 1.0
    assert rows[3]["params_after"] < rows[3]["params_before"]  # structural: really smaller
    md = (spec.folder / "results.md").read_text()
    assert "mask: size" in md and "structural: size" in md and md.count("| toy |") == 2
    csv_head = (spec.folder / "results.csv").read_text().splitlines()[0].split(",")
    assert csv_head[:6] == ["model", "domain", "method", "linear", "activation", "embedding"]
    index = json.loads((spec.folder / "grid.json").read_text())
    assert [c["session"] for c in index["cells"]] == [p.name for p in paths]
    assert index["cells"][2]["results"]["relative_size"] == rows[2]["relative_size"]

    # re-running runs nothing; a stopped cell (and only it) resumes
    calls = []
    real_run = pipeline.run
    monkeypatch.setattr(pipeline, "run", lambda s, **kw: calls.append(s.id) or real_run(s, **kw))
    assert gridrun.run_grid(grid.spec_from_dict(raw, folder=spec.folder), echo=lambda m: None)["status"] == "done"
    assert calls == []
    from engine.run.session import Session

    s = Session(paths[2])
    s.update_state(status="stopped", completed_stages=["baseline", "calibrate", "prune"], model_is="pruned")
    assert grid.load_grid(spec.folder)[2]["status"] == "stopped"
    assert gridrun.run_grid(grid.spec_from_dict(raw, folder=spec.folder), echo=lambda m: None)["status"] == "done"
    assert calls == [paths[2].name] and _events(paths[2], "run_start") == 2
    assert _events(paths[0], "run_start") == 2 and _events(paths[0], "stage_end", "baseline") == 1
    assert _events(paths[2], "stage_end", "prune") == 1  # resumed after prune, not redone


def test_one_runner_per_grid_folder(tmp_path):
    spec, _ = _tiny_grid(tmp_path)
    from engine.run.session import RunnerLock

    with RunnerLock(spec.folder / gridrun.LOCK_FILE, "held", "by this test"):
        with pytest.raises(MinigptError, match=f"grid {spec.folder} is already being run"):
            gridrun.run_grid(spec, echo=lambda m: None)
    assert not (spec.folder / "grid.json").exists()  # nothing ran


def _span(s_path: Path) -> tuple[float, float]:
    ts = [json.loads(line)["t"] for line in (s_path / "events.jsonl").read_text().splitlines()]
    return min(ts), max(ts)


@pytest.mark.process
@pytest.mark.parametrize("limit", [1, 2])
def test_max_parallel_runs_cells_in_runner_processes_at_most_n_at_once(tmp_path, monkeypatch, limit):
    """`--max-parallel N`: each cell in its own runner process, never more than N at once (from the
    sessions' event timestamps), all finish, and the group's baseline and calibration are still
    computed once (a cell waits for its group's calibration, then hits the cache)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec, raw = _tiny_grid(tmp_path)
    raw["run"]["finetune"]["enabled"] = False
    if limit == 2:
        raw["domains"].append({"name": "toy2", "source": str(tmp_path / "corpus.jsonl"),
                               "max_documents": 20})  # a second group, free to run beside the first
        raw["methods"] = ["structural"]
    spec = grid.spec_from_dict(raw, folder=spec.folder)
    lines: list[str] = []
    out = gridrun.run_grid(spec, echo=lines.append, max_parallel=limit, poll=0.1)
    assert out["status"] == "done" and out["done"] == out["cells"] == 4, lines
    rows = grid.load_grid(spec.folder)
    paths = [Path(r["session_path"]) for r in rows]
    pids = [json.loads((p / "state.json").read_text())["pid"] for p in paths]
    assert len(set(pids)) == 4 and os.getpid() not in pids  # one runner process per cell
    assert all(f"in runner {pid}" in "\n".join(lines) for pid in pids)
    spans = sorted(_span(p) for p in paths)
    for t, _ in spans:  # how many cells were running at each cell's start
        assert sum(a <= t <= b for a, b in spans) <= limit
    groups = {c.group for c in spec.cells}
    assert sum(_events(p, "stage_end", "baseline") for p in paths) == len(groups)  # one baseline per group
    assert sorted(r["calibration_cached"] for r in rows) == [False] * len(groups) + [True] * (4 - len(groups))


@pytest.mark.process
def test_a_stop_reaches_the_running_cells_of_a_parallel_grid_and_starts_no_other(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) while the first runner is starting: its stop request is honoured at its
    first safe point, no other cell starts, and the grid reports "stopped"."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec, raw = _tiny_grid(tmp_path)
    raw["run"]["finetune"]["enabled"] = False
    raw["domains"].append({"name": "toy2", "source": str(tmp_path / "corpus.jsonl"), "max_documents": 20})
    raw["methods"] = ["structural"]  # two groups: without the stop, a cell of the second would start at once
    spec = grid.spec_from_dict(raw, folder=spec.folder)
    assert len({c.group for c in spec.cells}) == 2
    lines: list[str] = []

    def echo(m: str) -> None:
        lines.append(m)
        if " in runner " in m and len([x for x in lines if " in runner " in x]) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    out = gridrun.run_grid(spec, echo=echo, max_parallel=2, poll=0.1)
    assert out["status"] == "stopped", lines
    assert sorted(r["status"] for r in grid.load_grid(spec.folder)) == ["new", "new", "new", "stopped"], lines
    assert len([x for x in lines if " in runner " in x]) == 1


@pytest.mark.process
def test_changed_config_makes_new_cells_and_load_grid_is_torch_free(tmp_path):
    spec = grid.spec_from_dict({"thresholds": [{"activation": 0.1}], "methods": ["mask"]}, folder=tmp_path / "g")
    rows = grid.refresh(spec)  # writes grid.json with no session yet
    assert rows[0]["status"] == "missing"
    s = grid._cell_session(spec, spec.cells[0], {})
    grid.write_outputs(spec, {spec.cells[0].key: s})
    code = ("import sys, engine.run.grid as g; rows = g.load_grid(sys.argv[1]); "
            "assert 'torch' not in sys.modules; print(rows[0]['status'], rows[0]['session'])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g" / "grid.json")], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["new", s.id]
    assert grid.session_paths(tmp_path / "g") == [s.path]
    known = {c["key"]: c for c in json.loads((tmp_path / "g" / "grid.json").read_text())["cells"]}
    same = grid._cell_session(spec, spec.cells[0], known)
    assert same.path == s.path
    changed = grid.spec_from_dict({"thresholds": [{"activation": 0.1}], "methods": ["mask"]},
                                  overrides=["evaluate.max_tokens=512"], folder=tmp_path / "g")
    assert changed.cells[0].key == spec.cells[0].key and changed.cells[0].digest != spec.cells[0].digest
    assert grid._cell_session(changed, changed.cells[0], known).path != s.path
    with pytest.raises(MinigptError, match="no grid in"):
        grid.load_grid(tmp_path)


def test_markdown_table_puts_methods_side_by_side():
    base = {"model": "m", "domain": "d", "linear": 1e-3, "activation": 0.1, "embedding": -1.0, "status": "done",
            "ppl_base": 10.0, "mcq_before": 0.5}
    rows = [{**base, "method": "mask", "relative_size": 0.9, "ppl_pruned": 30.0, "ppl_finetuned": 12.0,
             "ft_steps": 40, "ft_epochs": 0.5, "recovered": False, "mcq_after": 0.25},
            {**base, "method": "structural", "relative_size": 0.8, "vocab_pruned": True, "ppl_pruned": 20.0,
             "ppl_finetuned": 9.5, "ft_steps": 7, "ft_epochs": 0.1, "recovered": True, "mcq_after": 0.75}]
    line = grid.to_markdown(rows).splitlines()[2]
    assert line == ("| m | d | 0.001 | 0.1 | off | 10.00 | 90.00% | 30.00 | 12.00 | 40 (0.5 ep) ✗ | 50% → 25% "
                    "| 80.00% † | 20.00 | 9.50 | 7 (0.1 ep) | 50% → 75% |")


@pytest.mark.process
def test_gpu_grid_benchmark_smoke_path_on_cpu(tmp_path):
    """benchmarks/gpu_grid.sh --tiny: the GPU script's every phase runs (on CPU) and reports."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_grid.sh"), "--tiny", "--calib-blocks", "2",
                           "--eval-blocks", "2", "--ft-steps", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    phases = res["phases"]
    assert set(phases) == {"forward (no hooks)", "calibrate (paper hooks)", "prune structural", "prune mask",
                           "evaluate dense", "evaluate structural", "fine-tune mask", "fine-tune structural"}
    assert not any("error" in p for p in phases.values())
    assert phases["prune structural"]["params_after"] < res["params"]
    assert phases["prune mask"]["nonzero_after"] < res["params"]
    assert phases["fine-tune structural"]["finite"] and phases["fine-tune mask"]["finite"]
    assert res["config"]["hidden_act"] == "gelu_new" and res["peak_tflops"] is None  # no MFU on CPU
    assert set(res["speedup_structural"]) == {"evaluate", "fine-tune"}
    assert "tokens/s" not in proc.stderr and "tok/s" in proc.stdout


def test_grid_and_presets_import_graphs_never_reach_torch():
    """The app may import engine.run.grid / engine.presets: not even a function-level import may lead to torch."""
    grimp = pytest.importorskip("grimp")
    g = grimp.build_graph("engine", include_external_packages=True)
    for mod in ("engine.run.grid", "engine.presets"):
        for ext in ("torch", "transformers", "datasets"):
            assert g.find_shortest_chain(importer=mod, imported=ext) is None, (mod, ext)
    assert g.find_shortest_chain(importer="engine.run.gridrun", imported="torch")  # the check can fail
