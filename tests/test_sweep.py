"""`minigpt sweep` on a tiny model: shared calibration, the table files, the CLI."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

import tiny
from engine.prune import calibrate
from engine import config
from engine.prune import sensitivity
from engine.run import sweep
from engine.errors import MinigptError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    model = tiny.save("llama", tmp / "llama")
    for name, text in (("a", tiny.TEXT), ("b", tiny.TEXT[::-1])):
        docs = tmp / f"{name}.jsonl"
        docs.write_text("\n".join(json.dumps({"text": text[i * 60:(i + 1) * 60 + 300]}) for i in range(16)))
    cfg_text = (f'[model]\nsource = "{model}"\n[data]\nsource = "{tmp / "a.jsonl"}"\n'
                f'[calibrate]\nblock_size = 32\nmax_tokens = 256\nbatch_size = 2\n'
                f'[prune]\nround_to = 8\nsensitivity_tokens = 64\n'
                f'[evaluate]\nblock_size = 32\nmax_tokens = 256\n')
    (tmp / "c.toml").write_text(cfg_text)
    return tmp


def test_sweep_shares_calibration_and_sensitivity_and_writes_the_table(setup, monkeypatch):
    calls = {"calibrate": 0, "measure": 0}
    real_cal, real_measure = calibrate.calibrate, sensitivity.measure

    def counting_cal(*a, **k):
        calls["calibrate"] += 1
        return real_cal(*a, **k)

    def counting_measure(*a, **k):
        calls["measure"] += 1
        return real_measure(*a, **k)

    monkeypatch.setattr(calibrate, "calibrate", counting_cal)
    monkeypatch.setattr(sensitivity, "measure", counting_measure)
    cfg = config.load(setup / "c.toml")
    b = str(setup / "b.jsonl")
    grid = sweep.Grid(criteria=["wanda"], allocations=["per_layer", "sensitivity"],
                      compensations=["lstsq"], ratios=[0.25, 0.5],
                      calibrate_on=[cfg.data.source, b], evaluate_on=[cfg.data.source, b])
    events = []
    rows = sweep.run(cfg, grid, setup / "out", progress=events.append, log=lambda m: None,
                     stats_dir=setup / "stats")
    assert len(rows) == 2 * 2 * 2
    assert calls["calibrate"] == 2  # one per calibration corpus
    assert calls["measure"] == 2  # per corpus × criterion × compensation, shared across ratios
    with open(setup / "out" / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for r in table:
        assert int(r["params"]) > 0 and float(r[f"ppl[{b}]"]) > 1
        assert float(r["min_width"]) % 8 == 0
        want = 25 if r["ratio"] == "0.25" else 50
        assert abs(float(r["removed_pct"]) - want) <= 100 * 8 / 64  # rounding to 8 of 64
    md = (setup / "out" / "sweep.md").read_text()
    assert md.count("\n| ") == len(rows) + 1 and "MCQ accuracy: not measured" in md
    assert events[-1] == {"kind": "cell", "index": len(rows), "total": len(rows), "cell": "done"}
    # a later sweep pointed at the same statistics folder reuses them
    again = sweep.run(cfg, sweep.Grid(criteria=["obs"], compensations=["lstsq"], ratios=[0.25]), setup / "out2",
                      log=lambda m: None, stats_dir=setup / "stats")
    assert calls["calibrate"] == 2 and len(again) == 1


def _cli(monkeypatch, *args):
    from minigpt_tui import cli

    monkeypatch.setattr(sys, "argv", ["minigpt", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code


def test_bad_grids_are_one_line_errors(setup, monkeypatch, capsys):
    with pytest.raises(MinigptError, match="criteria"):
        sweep.Grid(criteria=["best"]).check()
    with pytest.raises(MinigptError, match="ratios"):
        sweep.Grid(ratios=[1.5]).check()
    assert _cli(monkeypatch, "sweep", str(setup / "c.toml"), "--compensations", "exact") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep compensations: 'exact'") and len(err.strip().splitlines()) == 1
    (setup / "a-file").write_text("x")
    assert _cli(monkeypatch, "sweep", str(setup / "c.toml"), "--stats", str(setup / "a-file")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep --stats") and "is a file" in err and len(err.strip().splitlines()) == 1


def test_cli_sweep_writes_csv_and_markdown(setup, monkeypatch):
    out = setup / "cli"
    code = _cli(monkeypatch, "sweep", str(setup / "c.toml"), "--criteria", "fluctuation", "--compensations", "bias",
                "--ratios", "0.5", "--sequential", "true", "--out", str(out),
                "--set", "evaluate.mcq_generate=2", "--set", "evaluate.mcq_choices=2")
    assert code in (0, None)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 1 and rows[0]["sequential"] == "True" and rows[0]["compensation"] == "bias"
    assert 0.0 <= float(rows[0][f"mcq_acc[{setup / 'a.jsonl'}]"]) <= 1.0
