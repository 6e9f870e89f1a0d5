"""Detached runs: they outlive the launching terminal, stop gracefully, resume, and their
log reads as plain lines when followed through a pipe.

Real processes throughout (marker `process`): the `minigpt` CLI (`python -m minigpt_tui.cli`)
launches the runner (`python -m engine.run.runner`, through `engine.run.launch`) in its own
process session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import ft_case
from ft_case import one_thread, reaper  # noqa: F401  (fixtures)
from engine.errors import MinigptError


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.process]


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minigpt_tui.cli", *args], cwd=ft_case.ROOT, env=ft_case.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_sighup_to_the_launching_terminal_does_not_stop_a_detached_run(tmp_path, reaper):
    cfg = ft_case.config(tmp_path, "llama")
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(cfg.to_toml())
    root = tmp_path / "sessions"
    # the CLI in a process session of its own: its process group plays the terminal's
    # SIGHUP's default action restored: a CI launched under nohup would otherwise pass SIG_IGN down
    cli = _cli("run", str(cfg_path), "--root", str(root), "--name", "hup", start_new_session=True,
               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    first = cli.stdout.readline().decode()
    assert first.startswith("session hup"), first
    launched = cli.stdout.readline().decode()
    assert "running detached (pid" in launched, launched
    runner_pid = int(launched.split("(pid ")[1].split(")")[0])
    reaper.append(runner_pid)
    assert runner_pid != cli.pid and os.getpgid(runner_pid) != os.getpgid(cli.pid)
    # follow it from a pipe (not a TTY) while the terminal goes away
    logs = _cli("logs", "hup", "--root", str(root), "-f")
    os.killpg(cli.pid, signal.SIGHUP)  # what closing the terminal does to its foreground group
    cli.wait(timeout=30)
    assert cli.returncode == -signal.SIGHUP  # the launcher died of it ...
    out, _ = logs.communicate(timeout=600)
    assert logs.returncode == 0
    from engine.run.session import open_session

    s = open_session("hup", root)
    assert s.status() == "done"  # ... the run did not
    text = out.decode()
    assert "\r" not in text and "\x1b" not in text  # no progress-bar redraws or colour codes in a pipe
    lines = text.splitlines()
    assert any(l.startswith("[finetune] step 12/12 loss") for l in lines), text[-2000:]
    assert any("held-out ppl" in l for l in lines) and lines[-1] == "run done"


def test_stop_checkpoints_then_resume_completes(tmp_path, reaper, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runner inherits it; 2 spinning threads crawl on a busy machine
    from engine.run import launch
    from engine.run.session import open_session

    cfg = ft_case.config(tmp_path, "llama", finetune={"max_steps": 60, "eval_every": 30, "checkpoint_every": 30})
    s = ft_case.session(tmp_path, "stopme", cfg)
    pid = launch.launch_detached(s.path)
    reaper.append(pid)
    os.setpriority(os.PRIO_PROCESS, pid, 10)  # so the polling below keeps up on a loaded machine
    ft_case.wait_for(lambda: any(e["type"] == "train" and e["step"] >= 3 for e in ft_case.events(s)),
                     what="fine-tuning step 3")
    assert launch.request_stop(s.path)  # what `minigpt stop` does: stop.request + SIGTERM
    ft_case.wait_for(lambda: not s.runner_alive(), what="the runner to exit")
    ev = ft_case.events(s)
    assert s.status() == "stopped" and ev[-1] == {**ev[-1], "type": "run_end", "status": "stopped"}
    ck = [e for e in ev if e["type"] == "checkpoint"]
    last_step = max(e["step"] for e in ev if e["type"] == "train")
    assert ck and ck[-1]["step"] == last_step < 30  # checkpointed where it stopped, not at a periodic step

    with pytest.raises(MinigptError, match="already being run"):  # one runner per session
        with s.acquire():
            from engine.run import pipeline

            pipeline.run(open_session(s.path))  # a second runner while the lock is held
    reaper.append(launch.launch_detached(s.path))  # `minigpt resume`
    ft_case.wait_for(lambda: s.status() == "done", what="the resumed run to finish")
    ev = ft_case.events(s)
    assert [m["message"] for m in ev if m["type"] == "log" and "resuming fine-tuning" in m.get("message", "")] == \
        [f"resuming fine-tuning from checkpoint at step {last_step} (step-{last_step:08d})"]
    res = json.loads((s.path / "results.json").read_text())
    assert res["finetune"]["steps"] == 60 and res["finetune"]["resumed_from_step"] == last_step


def test_a_launched_runner_counts_as_starting_only_while_alive(tmp_path):
    """`logs -f` and `run` keep waiting through a slow start (torch imports) but not for a corpse."""
    import time

    from engine.run import launch

    s = ft_case.session(tmp_path, "starting", ft_case.config(tmp_path, "llama"))
    s.update_state(status="starting", pid=os.getpid())
    assert launch.starting(s)
    child = subprocess.Popen(["true"])
    time.sleep(0.3)  # exited, not reaped: a zombie still answers kill(pid, 0)
    s.update_state(pid=child.pid)
    assert not launch.starting(s)
    child.wait()
    assert not launch.starting(s)
    s.update_state(status="running", pid=os.getpid())
    assert not launch.starting(s)
