"""Reliability (issue 17): stops are never lost, a read-only root and a full disk are one-line
errors, orphaned temps go on the next open, errors name the real cause, budgets are honest,
and preflight reports a grid's typo in a second.

Tests marked `process` run the `minigpt` CLI or a detached runner as real processes on a
tiny model; the rest run in this process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ft_case
from ft_case import one_thread, reaper  # noqa: F401  (fixtures)
from pids import dead_pid
from engine import atomic
from engine.errors import MinigptError
from engine.run import session as session_mod

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    e = {**ft_case.env(), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "minigpt_tui.cli", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


def one_line(r: subprocess.CompletedProcess, rc: int, *needles: str) -> str:
    """The command failed with `rc` and exactly one error line on stderr, with a fix, no traceback."""
    assert r.returncode == rc, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stdout + r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(err) == 1, r.stderr
    assert " — " in err[0], err[0]
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` read-only: a read-only tmpfs bind as root (root ignores modes), else chmod."""
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
        r2 = r.returncode == 0 and subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)],
                                                   capture_output=True).returncode == 0
        if not r2:
            if r.returncode == 0:
                subprocess.run(["umount", str(folder)])
            pytest.skip("cannot make a read-only mount here (root without mount rights)")
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        yield folder
    finally:
        for p, m in modes.items():
            p.chmod(m)


# ---- 1. stops are never lost ---------------------------------------------------------------------
@pytest.mark.process
def test_a_stop_while_starting_is_honoured_at_the_first_safe_point(tmp_path, reaper, one_thread):
    from engine.run import launch

    s = ft_case.session(tmp_path, "early", ft_case.config(tmp_path, "gpt2"))
    (s.path / session_mod.STOP_FILE).write_text("stop\n")  # left by an earlier run: not for this one
    pid = launch.launch_detached(s.path)
    reaper.append(pid)
    assert not (s.path / session_mod.STOP_FILE).exists()
    assert not s.runner_alive() and launch.starting(s)  # importing torch, no lock yet
    assert launch.request_stop(s.path)  # used to answer "not running (starting)" and be lost
    ok, _ = launch.wait_started(s, pid)
    ft_case.wait_for(lambda: not launch.alive(pid), what="the runner to exit", timeout=120)
    ev = ft_case.events(s)
    assert s.status() == "stopped", (s.state(), ev[-3:])
    assert ev[-1]["type"] == "run_end" and ev[-1]["status"] == "stopped"
    assert not any(e["type"] == "stage_start" for e in ev)  # stopped before any work
    assert s.state()["completed_stages"] == []


@pytest.mark.process
def test_cli_stop_right_after_run_stops_it(tmp_path, one_thread):
    cfg = tmp_path / "run.toml"
    cfg.write_text(ft_case.config(tmp_path, "gpt2").to_toml())
    run = subprocess.Popen([sys.executable, "-m", "minigpt_tui.cli", "run", str(cfg), "--root", "sessions",
                            "--name", "k7", "--no-follow"], cwd=tmp_path, env=ft_case.env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    s_path = tmp_path / "sessions" / "k7"
    ft_case.wait_for(lambda: (s_path / session_mod.STATE_FILE).exists() and
                     session_mod.Session(s_path).state().get("status") == "starting", what="starting", timeout=60)
    r = cli("stop", "k7", "--root", "sessions", cwd=tmp_path)
    run.communicate(timeout=120)
    assert r.returncode == 0 and "stop requested for k7" in r.stdout, (r.stdout, r.stderr)
    assert r.stdout.strip().splitlines()[-1] == "session k7: stopped"
    assert "Traceback" not in r.stderr


@pytest.mark.process
def test_the_second_of_two_concurrent_resumes_prints_the_refusal_and_fails(tmp_path, reaper, one_thread):
    s = ft_case.session(tmp_path, "twice", ft_case.config(tmp_path, "gpt2"))
    procs = [subprocess.Popen([sys.executable, "-m", "minigpt_tui.cli", "resume", "twice", "--root", "sessions",
                               "--no-follow"], cwd=tmp_path, env=ft_case.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    codes = sorted(p.returncode for p in procs)
    for p, (out, err) in zip(procs, outs):
        assert "Traceback" not in out + err
        for line in out.splitlines():
            if "running detached (pid " in line:
                reaper.append(int(line.split("(pid ")[1].split(")")[0]))
    assert codes == [0, 1], outs
    loser = next(o for p, o in zip(procs, outs) if p.returncode == 1)
    assert "running detached" not in loser[0]
    assert [l for l in loser[1].splitlines() if l.startswith("error: ")] == \
        ["error: session twice is already being run by another process — wait for it, or stop it with: "
         "minigpt stop twice"]
    ft_case.wait_for(lambda: s.status() == "done", what="the winner to finish", timeout=180)


# ---- 2. a read-only root -----------------------------------------------------------------------------
def test_a_lock_probe_needs_no_write_access(tmp_path):
    s = ft_case.session(tmp_path, "ro", ft_case.config(tmp_path, "gpt2"))
    (s.path / session_mod.LOCK_FILE).write_text("123")
    with read_only(s.path):
        assert not s.runner_alive()
    with s.acquire():
        with read_only(s.path):
            assert s.runner_alive()


@pytest.mark.process
def test_read_only_root_run_resume_stop_logs_are_one_line(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(ft_case.config(tmp_path, "gpt2").to_toml())
    root = tmp_path / "ro"
    s = session_mod.create(ft_case.config(tmp_path, "gpt2"), root, name="old")
    w = s.writer()
    w.emit("run_start", pid=1, resumed=False, stages=list(session_mod.STAGES))
    w.emit("run_end", status="stopped")
    w.close()
    s.update_state(status="stopped")
    with read_only(root):
        one_line(cli("run", str(cfg), "--root", str(root), cwd=tmp_path), 2, f"sessions root {root} is not writable")
        one_line(cli("resume", "old", "--root", str(root), cwd=tmp_path), 2, "is not writable")
        one_line(cli("eval", "old", "--root", str(root), cwd=tmp_path), 2, "is not writable")
        r = cli("stop", "old", "--root", str(root), cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.strip() == "session old is not running (stopped)", (r.stdout, r.stderr)
        r = cli("logs", "old", "--root", str(root), cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "run stopped" and not r.stderr.strip()
        r = cli("sessions", "--root", str(root), cwd=tmp_path)
        assert r.returncode == 0 and "old" in r.stdout


# ---- 3. a full disk --------------------------------------------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_is_one_line_with_path_sizes_and_fix_and_the_old_copy_stays(tmp_path):
    target = tmp_path / "stats.bin"
    atomic.write_with(target, lambda tmp: tmp.write_bytes(b"old"))

    def half_then_full(tmp: Path):
        tmp.write_bytes(b"x" * 5000)
        _enospc()

    with pytest.raises(atomic.DiskFull) as ei:
        atomic.write_with(target, half_then_full)
    e = ei.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.needed > 5000 and e.free is not None
    line = e.line()
    assert line.startswith(f"disk full writing {target}: it needs at least ") and "free there — free at least" in line
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["stats.bin"]

    folder = tmp_path / "model"
    atomic.write_dir(folder, lambda tmp: (tmp / "w").write_bytes(b"1" * 100))
    with pytest.raises(atomic.DiskFull, match=f"disk full writing {folder}"):
        atomic.write_dir(folder, lambda tmp: ((tmp / "w").write_bytes(b"2" * 10), _enospc()))
    assert (folder / "w").read_bytes() == b"1" * 100 and not list(tmp_path.glob(".model*"))

    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            _enospc()

    import engine.atomic as am

    am.os.fdopen = lambda fd, mode: Full(real(fd, mode))
    try:
        with pytest.raises(atomic.DiskFull, match=r"needs at least 13 B \(13 bytes\)"):
            atomic.write_json(tmp_path / "state.json", {"a": 1})
    finally:
        am.os.fdopen = real
    assert not (tmp_path / "state.json").exists() and not list(tmp_path.glob(".state.json*"))


def test_disk_full_during_the_model_write_fails_the_run_in_one_line_and_keeps_the_stats(tmp_path, monkeypatch,
                                                                                         one_thread):
    from engine.run import pipeline

    cfg = ft_case.config(tmp_path, "gpt2", finetune={"enabled": False})
    s = ft_case.session(tmp_path, "full", cfg)
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def full_save(tensors, path, metadata=None):
        if ".model.tmp" not in str(path):  # the calibration statistics still fit
            return real_save(tensors, path, metadata=metadata)
        Path(path).write_bytes(b"x" * 4096)  # part of the weights, then the disk is full
        _enospc()

    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_save)  # what save_pretrained calls
    with pytest.raises(atomic.DiskFull):
        pipeline.run(s)
    st = s.state()
    assert st["status"] == "failed" and st["error"].startswith(f"disk full writing {s.model_dir}")
    assert "then resume" in st["error"] and "calibrate" in st["completed_stages"]
    assert (s.stats_dir / "calibration.safetensors").exists() and not s.model_dir.exists()
    assert not list(s.path.glob(".model.tmp*"))
    err = [e for e in ft_case.events(s) if e["type"] == "error"]
    assert len(err) == 1 and err[0]["stage"] == "prune" and err[0]["message"] == st["error"]


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A real tmpfs of `size` mounted on `folder` (root in a container may mount one); unmounted after."""
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here ({(r.stderr or r.stdout).strip()[:120]}): run as root "
                    "in a container that allows mount")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def _temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".part"))


def test_a_real_full_tmpfs_is_disk_full_with_the_old_copy_intact(tmp_path):
    """No fake: a 1 MiB tmpfs, a 2 MiB file written by write_with and by write_dir."""
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        target = disk / "stats.bin"
        atomic.write_with(target, lambda tmp: tmp.write_bytes(b"old"))
        with pytest.raises(atomic.DiskFull) as ei:
            atomic.write_with(target, lambda tmp: tmp.write_bytes(os.urandom(2 << 20)))
        e = ei.value
        assert e.errno == errno.ENOSPC and e.free is not None and e.free < (1 << 20)
        line = e.line()
        assert "\n" not in line and line.startswith(f"disk full writing {target}: it needs at least ")
        assert "free there — free at least" in line and "then resume" in line
        assert target.read_bytes() == b"old" and _temps(disk) == []
        folder = disk / "model"
        with pytest.raises(atomic.DiskFull, match=f"disk full writing {folder}"):
            atomic.write_dir(folder, lambda tmp: (tmp / "w.bin").write_bytes(os.urandom(2 << 20)))
        assert not folder.exists() and _temps(disk) == [] and sorted(p.name for p in disk.iterdir()) == ["stats.bin"]


def test_torch_save_onto_a_full_tmpfs_is_disk_full(tmp_path):
    """torch's zip writer reports a short write as "unexpected pos", without the OS message (a
    recovery checkpoint died that way on a full disk): it must still read as DiskFull."""
    import torch

    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        folder = disk / "checkpoint"
        with pytest.raises(atomic.DiskFull, match=f"disk full writing {folder}") as ei:
            atomic.write_dir(folder, lambda tmp: torch.save({"w": torch.randn(1 << 19)}, tmp / "state.pt"))
        assert ei.value.free is not None and ei.value.free < (1 << 20) and "\n" not in ei.value.line()
        assert not folder.exists() and _temps(disk) == []


@pytest.mark.process
def test_a_session_on_a_real_small_tmpfs_fails_in_one_line_and_resumes_elsewhere(tmp_path):
    """A tiny model's session on a 96 KiB tmpfs: the config, state, events and calibration
    statistics fit, the pruned model (135 KB) does not. `minigpt resume` exits 1 with one line
    naming the path, the sizes and the fix; no temp is left; the statistics stay."""
    cfg = ft_case.config(tmp_path, "gpt2", finetune={"enabled": False})
    with small_tmpfs(tmp_path / "disk", "96k") as disk:
        s = session_mod.create(cfg, disk, name="full")
        r = cli("resume", str(s.path), "--foreground", "--no-follow", cwd=tmp_path, timeout=240)
        line = one_line(r, 1, f"disk full writing {s.path}", "it needs at least", "free there", "then resume")
        assert _temps(disk) == [], _temps(disk)
        st = s.state()
        assert st["status"] == "failed" and line == f"error: {st['error']}"
        assert "calibrate" in st["completed_stages"] and (s.stats_dir / "calibration.safetensors").is_file()
        assert not s.model_dir.exists()


# ---- 4. orphaned temps ------------------------------------------------------------------------------
def test_orphans_go_on_the_next_open_but_never_while_a_runner_holds_the_lock(tmp_path):
    s = ft_case.session(tmp_path, "orph", ft_case.config(tmp_path, "gpt2"))
    dead = dead_pid()
    model_tmp = s.path / f".model.tmp{dead}"
    (model_tmp / "x").mkdir(parents=True)
    (model_tmp / "model.safetensors").write_bytes(b"0" * 1000)
    small = s.path / f".state.json.tmp{dead}.abc123"
    small.write_text("{")
    s.stats_dir.mkdir()
    stats_tmp = s.stats_dir / f".partial.pt.tmp{dead}"
    stats_tmp.write_bytes(b"p")
    live = s.path / f".results.json.tmp{os.getppid()}.x"  # a live writer's
    live.write_text("{")
    (s.path / ".model.old").mkdir()  # a swap cut between its renames: the only copy of the model
    (s.path / ".model.old" / "config.json").write_text("{}")
    with s.acquire():
        session_mod.open_session(s.path)
        assert model_tmp.exists() and small.exists() and stats_tmp.exists()  # the runner may be writing them
    session_mod.open_session(s.path)
    assert not model_tmp.exists() and not small.exists() and not stats_tmp.exists()
    assert live.exists()
    assert (s.model_dir / "config.json").exists() and not (s.path / ".model.old").exists()


# ---- 5. errors name the real cause ------------------------------------------------------------------
@pytest.mark.parametrize("name,content,needle", [
    ("garbage.txt", bytes(range(256)) * 8, "is binary, not text (a NUL byte at offset 0)"),
    ("garbage.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(200), "is binary, not text"),
    ("latin.txt", "caf\u00e9 au lait\n".encode("latin-1") * 10, "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "line 2 of"),
    ("wrongcol.jsonl", b'{"body": "a"}\n', "has no column 'text'"),
    ("list.jsonl", b'["a"]\n', "is a JSON list, not an object"),
    ("wrong.csv", b"title,body\nx,y\n", "has no column 'text' in its header row"),
    ("fake.parquet", b"hello", "is not a parquet file"),
])
def test_bad_local_data_files_name_the_cause(tmp_path, name, content, needle):
    from engine.config import DataConfig
    from engine.data import domain

    f = tmp_path / name
    f.write_bytes(content)
    problems = domain.check_files([f], DataConfig(source=str(f)))
    assert problems and needle in problems[0].line(), [p.line() for p in problems]
    assert "hub" not in problems[0].line()
    with pytest.raises(MinigptError) as ei:  # what the run itself says, before datasets is asked
        domain.load_documents(DataConfig(source=str(f)))
    assert needle in ei.value.line()


def test_resume_of_a_folder_that_is_not_a_session_never_suggests_deleting_it(tmp_path):
    with pytest.raises(MinigptError) as ei:
        session_mod.open_session("/etc")
    assert "/etc is not a minigpt session" in ei.value.line() and "delete" not in ei.value.line()
    (tmp_path / "s" ).mkdir()
    (tmp_path / "s" / session_mod.STATE_FILE).write_text("{}")  # looks like a session: it may say so
    with pytest.raises(MinigptError, match="is corrupt: config.toml is missing"):
        session_mod.open_session(tmp_path / "s")


@pytest.mark.process
def test_an_in_run_error_is_printed_once(tmp_path, one_thread):
    cfg = tmp_path / "run.toml"
    cfg.write_text(ft_case.config(tmp_path, "gpt2", prune={"rule": "threshold", "activation_threshold": 1e9},
                                  finetune={"enabled": False}).to_toml())
    r = cli("run", str(cfg), "--root", "sessions", "--name", "collapse", cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out
    errs = [l for l in out.splitlines() if l.startswith("error: ")]
    assert len(errs) == 1 and "would leave layer 0" in errs[0], out[-3000:]


def test_a_session_name_too_long_is_one_line_before_a_folder(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(ft_case.config(tmp_path, "gpt2").to_toml())
    r = cli("run", str(cfg), "--root", "sessions", "--name", "a-name-of-thirty-characters-x", "--no-follow",
            cwd=tmp_path)
    one_line(r, 2, "a-name-of-thirty-characters-x", "the most is 24", "--name")
    assert not (tmp_path / "sessions").exists() or not any((tmp_path / "sessions").iterdir())


@pytest.mark.process
def test_logs_say_when_there_are_no_events_and_when_the_runner_is_gone(tmp_path):
    s = ft_case.session(tmp_path, "quiet", ft_case.config(tmp_path, "gpt2"))
    r = cli("logs", "quiet", "--root", "sessions", cwd=tmp_path)
    assert r.returncode == 0 and "has no events yet" in r.stdout
    s.update_state(status="running", pid=dead_pid())  # a runner that died without a word
    one_line(cli("logs", "quiet", "--root", "sessions", cwd=tmp_path), 1, "has no events", "events.jsonl is missing")
    w = s.writer()
    w.emit("run_start", pid=1, resumed=False, stages=list(session_mod.STAGES))
    w.close()
    r = cli("logs", "quiet", "--root", "sessions", "-f", cwd=tmp_path)
    assert r.returncode == 1 and "session quiet is disconnected" in r.stderr and "minigpt resume quiet" in r.stderr


# ---- 6. honest budgets ---------------------------------------------------------------------------
def test_budgets_below_one_block_are_refused_with_the_nearest_valid_value(tmp_path):
    with pytest.raises(MinigptError) as ei:
        ft_case.config(tmp_path, "gpt2", calibrate={"block_size": 256, "max_tokens": 100})
    assert ei.value.line() == ("calibrate.max_tokens = 100 is less than one block (calibrate.block_size = 256) — "
                               "set calibrate.max_tokens = 256 (one block) or more, or calibrate.block_size = 100")
    with pytest.raises(MinigptError, match="evaluate.max_tokens = 100 is less than one block"):
        ft_case.config(tmp_path, "gpt2", evaluate={"block_size": 256, "max_tokens": 100})


def test_a_block_above_the_context_is_a_warning_event_and_a_preflight_warning(tmp_path, one_thread):
    from engine.run import pipeline, preflight

    cfg = ft_case.config(tmp_path, "gpt2", calibrate={"block_size": 1000, "max_tokens": 1000},
                         finetune={"enabled": False}, evaluate={"evaluate_base": False})
    lines = [f.line() for f in preflight.check(cfg)]
    assert lines[0] == ("warning: calibrate.block_size = 1000 exceeds the model's context of 256 tokens: blocks of "
                        "256 are used — set calibrate.block_size = 256 or less")
    assert any("calibration uses 768 tokens" in l for l in lines)
    s = ft_case.session(tmp_path, "cap", cfg)
    pipeline.run(s, stages=["baseline", "calibrate"])
    warn = [e["message"] for e in ft_case.events(s) if e["type"] == "log" and e["level"] == "warning"]
    assert any("exceeds the model's context: calibrating in blocks of 256" in m for m in warn), warn
    assert any("calibrating on 768 tokens, not calibrate.max_tokens = 1000" in m for m in warn), warn
    assert s.results()["calibration"]["tokens"] == 768


# ---- 7. preflight -------------------------------------------------------------------------------------
@pytest.mark.process
def test_a_grid_typo_is_reported_in_under_5_s_before_any_cell(tmp_path):
    data = ft_case.corpus(tmp_path / "data")
    grid = tmp_path / "typo.toml"
    grid.write_text(f'models = ["nosuchmodel"]\ndomains = [{{name = "c", source = "{data}"}}]\n'
                    'thresholds = "paper"\n[run.calibrate]\nblock_size = 32\nmax_tokens = 256\n'
                    '[run.evaluate]\nblock_size = 32\nmax_tokens = 256\n')
    t0 = time.monotonic()
    r = cli("grid", str(grid), "--out", str(tmp_path / "g"), cwd=tmp_path)
    took = time.monotonic() - t0
    line = one_line(r, 2, "nosuchmodel", "not a preset either")
    assert took < 5, took
    assert not (tmp_path / "g" / "sessions").exists() or not list((tmp_path / "g" / "sessions").iterdir())
    print(f"grid typo: {took:.2f} s: {line}")


@pytest.mark.process
def test_check_reports_every_problem_at_once_and_run_creates_no_session(tmp_path):
    cfg = ft_case.config(tmp_path, "gpt2")
    bad = tmp_path / "bad.toml"
    d = cfg.to_dict()
    d["model"]["source"] = str(tmp_path / "nomodel")
    d["data"]["source"] = str(tmp_path / "nodata.jsonl")
    d["evaluate"]["mcq_files"] = [str(tmp_path / "noq.json")]
    import tomli_w

    bad.write_text(tomli_w.dumps(d))
    r = cli("check", str(bad), "--root", "sessions", cwd=tmp_path)
    errs = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert r.returncode == 2 and len(errs) == 3 and "Traceback" not in r.stderr, r.stderr
    r = cli("run", str(bad), "--root", "sessions", cwd=tmp_path)
    assert r.returncode == 2 and not (tmp_path / "sessions").exists()
    good = tmp_path / "good.toml"
    good.write_text(cfg.to_toml())
    r = cli("check", str(good), "--root", "sessions", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"{good}: ok (1 config)", (r.stdout, r.stderr)


def test_preflight_is_torch_free():
    code = ("import sys; from engine.run import preflight; from engine import config; "
            "preflight.check(config.RunConfig()); print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ft_case.env(), capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.split() == ["False", "False"], r.stderr


def test_the_sessions_root_needs_room_for_the_projected_artefacts(tmp_path, monkeypatch):
    from engine.run import preflight

    cfg = ft_case.config(tmp_path, "gpt2")
    monkeypatch.setattr(atomic, "free_bytes", lambda p: 1000)
    lines = [f.line() for f in preflight.check(cfg, tmp_path / "sessions")]
    assert any(l.startswith(f"error: sessions root {tmp_path / 'sessions'} has 1000 B free; this run writes about")
               for l in lines), lines


def test_preflight_refuses_a_malformed_pin_on_a_url_before_any_download(tmp_path):
    from engine import config
    from engine.run import preflight

    cfg = ft_case.config(tmp_path, "gpt2")
    d = cfg.to_dict()
    d["data"]["source"] = "http://127.0.0.1:9/corpus.jsonl#sha256=12"  # nothing listens: a download would fail
    d["evaluate"]["mcq_files"] = ["http://127.0.0.1:9/q.json#sha256=xyz0"]
    lines = [f.line() for f in preflight.check(config.from_dict(d))]
    assert ("error: bad pin 'sha256:12' for http://127.0.0.1:9/corpus.jsonl — write data.source = "
            "URL#sha256=<64 hex digits> (or git-sha1:<40 hex digits>)") in lines, lines
    assert not any("q.json" in l and "bad pin" in l for l in lines), lines  # 'xyz0' is no pin: part of the URL
    d["evaluate"]["mcq_files"] = ["http://127.0.0.1:9/q.json#sha256=abc"]
    lines = [f.line() for f in preflight.check(config.from_dict(d))]
    assert any(l.startswith("error: bad pin 'sha256:abc' for http://127.0.0.1:9/q.json — write evaluate.mcq_files")
               for l in lines), lines
