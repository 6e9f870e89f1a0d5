"""A small, complete fine-tuning run for tests: tiny model on disk, a test-made corpus, a session.

Shared by test_finetune.py, test_resume.py and test_detached.py. Everything is seeded, so
two sessions made with the same arguments compute the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny

ROOT = Path(__file__).resolve().parent.parent
WORDS = tiny.TEXT.replace(",", "").replace(";", "").replace(".", "").split()[:40]


def corpus(folder: Path, docs: int = 60, words: int = 120, seed: int = 0) -> Path:
    """A jsonl corpus of seeded word salad over the tiny tokenizer's training text."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
            f.write(json.dumps({"text": f"Document {i}. {text}"}) + "\n")
    return path


def config(tmp: Path, family: str = "gpt2", **sections) -> "RunConfig":
    """Config for a tiny run; `sections` = {"finetune": {...}, ...} override the defaults."""
    from engine import config as config_mod

    model_dir = tmp / f"model-{family}"
    if not model_dir.exists():
        tiny.save(family, model_dir)
    data = tmp / "data"
    if not (data / "corpus.jsonl").exists():
        corpus(data)
    base = {
        "seed": 3,
        "model": {"source": str(model_dir), "device": "cpu", "dtype": "float32"},
        "data": {"source": str(data / "corpus.jsonl"), "calibrate_fraction": 0.3, "finetune_fraction": 0.5,
                 "evaluate_fraction": 0.2},
        "calibrate": {"block_size": 32, "max_tokens": 4096, "batch_size": 2},
        "prune": {"mode": "structural", "rule": "ratio", "ratio": 0.3, "min_keep": 4},
        "finetune": {"enabled": True, "lr": 3e-3, "batch_size": 2, "grad_accum": 2, "block_size": 32,
                     "max_steps": 12, "eval_every": 4, "checkpoint_every": 3, "warmup_steps": 2,
                     "weight_decay": 0.01, "target_ppl_ratio": 0.0},
        "evaluate": {"block_size": 32, "max_tokens": 1024, "batch_size": 4},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_mod.from_dict(base)


def session(tmp: Path, name: str, cfg) -> "Session":
    from engine.run import session as session_mod

    return session_mod.create(cfg, tmp / "sessions", name=name)


# ---- subprocess runners -----------------------------------------------------------------------
def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1")  # as the in-process reference runs (torch.set_num_threads(1))
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def start_runner(sess, reaper: list | None = None) -> subprocess.Popen:
    """`python -m engine.run.runner SESSION`, the detached child's own entry point."""
    log = open(sess.path / "test-runner.log", "ab")
    # niced, so that on a loaded machine the polling test sees each step before the runner races past
    proc = subprocess.Popen([sys.executable, "-m", "engine.run.runner", str(sess.path)], cwd=ROOT, env=env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: os.nice(10))
    if reaper is not None:
        reaper.append(proc.pid)
    return proc


def events(sess) -> list[dict]:
    from engine.run.events import read_events

    return read_events(sess.events_path)


class Tail:
    """Incremental view of a session's events (cheap to poll every few ms)."""

    def __init__(self, sess):
        from engine.run.events import EventReader

        self.reader = EventReader(sess.events_path)
        self.events: list[dict] = []

    def __call__(self) -> list[dict]:
        self.events += self.reader.poll()
        return self.events


def wait_for(pred, proc: subprocess.Popen | None = None, timeout: float = 300.0, what: str = "") -> None:
    """Poll `pred`; the timeout only guards against a hang (a loaded CI machine is slow)."""
    t0 = time.monotonic()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"runner exited ({proc.returncode}) before: {what}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.005)


def freeze_and_kill(proc: subprocess.Popen, still_inside) -> None:
    """SIGSTOP, check we really are mid-stage (`still_inside()`), then SIGKILL: no graceful exit."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert still_inside(), "the run got past the stage before it could be killed (test too small?)"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture
def reaper():
    """Pids of runners a test started; whatever is still alive at teardown is killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def single_thread():
    """Tiny models on one thread: on a busy 2-core machine, OpenMP's spinning second thread
    makes each tiny matmul ~30x slower (measured: 33 s against 1 s CPU for one tiny run)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    with single_thread():
        yield
