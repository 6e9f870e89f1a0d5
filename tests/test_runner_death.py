"""The death record: a runner killed with kill -9 leaves a `runner_died` event, written by the
first reader that finds the session disconnected, and `minigpt run`'s follower prints it and
exits non-zero. Real processes (marker `process`): the CLI launches a tiny fine-tuning run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import ft_case
from ft_case import one_thread, reaper  # noqa: F401  (fixtures)
from engine.run import death, record
from engine.run import session as session_mod
from minigpt_tui import display, runview

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.process]

LONG = {"finetune": {"max_steps": 400, "eval_every": 0, "checkpoint_every": 0}}


def _died(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "runner_died"]


def test_kill_9_during_finetune_is_recorded_and_the_follower_exits_non_zero(tmp_path, reaper):
    cfg = ft_case.config(tmp_path, **LONG)
    (tmp_path / "run.toml").write_text(cfg.to_toml())
    root = tmp_path / "sessions"
    cli = subprocess.Popen([sys.executable, "-m", "minigpt_tui.cli", "run", str(tmp_path / "run.toml"),
                            "--root", str(root), "--name", "killed"], cwd=ft_case.ROOT, env=ft_case.env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    s = session_mod.Session(root / "killed")
    ft_case.wait_for(lambda: s.events_path.exists(), cli, what="the session's event log")
    tail = ft_case.Tail(s)
    ft_case.wait_for(lambda: any(e["type"] == "train" and e["step"] >= 2 for e in tail()), cli,
                     what="two fine-tuning steps")
    pid = int(s.state()["pid"])
    reaper.append(pid)
    os.kill(pid, signal.SIGKILL)
    out, _ = cli.communicate(timeout=120)
    assert cli.returncode == 1, out
    died = _died(ft_case.events(s))
    assert len(died) == 1, out
    d = died[0]
    record.event("runner_died", {k: v for k, v in d.items() if k not in ("t", "type")})
    # the follower launched the runner: it saw the exit status, so the record names the signal
    assert d["signal"] == "SIGKILL" and d["stage"] == "finetune" and d["pid"] == pid
    assert isinstance(d["step"], int) and d["step"] >= 2
    assert d["message"] == f"runner died (SIGKILL) during finetune at step {d['step']}"
    assert d["message"] in out and "minigpt resume killed" in out
    assert s.status() == record.DISCONNECTED
    # a second reader finds the record there and adds none
    assert death.record_death(session_mod.Session(s.path)) == d
    assert len(_died(ft_case.events(s))) == 1


def test_a_reader_that_did_not_launch_the_runner_records_its_death_once(tmp_path, reaper):
    s = ft_case.session(tmp_path, "orphan", ft_case.config(tmp_path, **LONG))
    proc = ft_case.start_runner(s, reaper)
    tail = ft_case.Tail(s)
    ft_case.wait_for(lambda: any(e["type"] == "train" for e in tail()), proc, what="a fine-tuning step")
    assert death.record_death(s) is None  # alive: nothing to record
    ft_case.freeze_and_kill(proc, lambda: s.runner_alive())
    first = death.record_death(s)
    assert first is not None and first["signal"] is None and first["stage"] == "finetune"
    assert first["message"].startswith(f"runner died during finetune at step {first['step']} (no exit status")
    assert death.record_death(s) == first and len(_died(ft_case.events(s))) == 1
    # the readers: the monitor's reducer and the CLI display
    view = runview.RunView()
    view.apply(ft_case.events(s))
    assert view.end_status == record.DISCONNECTED and view.error == first["message"]
    assert view.stages["finetune"].status == "died"
    assert "runner_died" in runview.HANDLED and "runner_died" in display.HANDLED
    # `minigpt logs` prints it, `minigpt status --json` carries it
    logs = subprocess.run([sys.executable, "-m", "minigpt_tui.cli", "logs", str(s.path)], cwd=ft_case.ROOT,
                          env=ft_case.env(), capture_output=True, text=True, timeout=120)
    assert first["message"] in logs.stdout
    st = subprocess.run([sys.executable, "-m", "minigpt_tui.cli", "status", str(s.path), "--json"], cwd=ft_case.ROOT,
                        env=ft_case.env(), capture_output=True, text=True, timeout=120)
    snap = json.loads(st.stdout)
    assert st.returncode == 0 and snap["status"] == record.DISCONNECTED and snap["runner_died"] == first
    assert snap["path"] == str(s.path.resolve()) and snap["disk_bytes"]["total"] > 0
