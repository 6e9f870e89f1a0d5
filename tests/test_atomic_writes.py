"""One atomic-write path for the artefacts of the models, prune and data wings.

Model folders, the GGUF cache, calibration statistics, masks and downloads are written
through `engine.atomic` (temp sibling `.<name>.tmp<pid>`, fsync, rename). A writer killed
mid-write leaves its temp behind; the next write of the same target removes it, and
never a live writer's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from pids import dead_pid
import tiny
from engine import atomic
from engine.models import export

ROOT = Path(__file__).resolve().parents[1]


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_write_with_leaves_only_the_target_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "a.bin"
    atomic.write_with(target, lambda tmp: tmp.write_bytes(b"one"))
    assert target.read_bytes() == b"one" and _siblings(target) == []

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_with(target, broken)
    assert target.read_bytes() == b"one" and _siblings(target) == []  # old copy intact, no temp


def test_stale_temps_of_dead_writers_go_and_live_ones_stay(tmp_path):
    target = tmp_path / "model"
    dead = tmp_path / f".model.tmp{dead_pid()}"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    dead_file = tmp_path / f".stats.tmp{dead_pid()}"
    dead_file.write_bytes(b"torn")
    live = tmp_path / f".model.tmp{os.getppid()}"  # a live process's write in progress
    live.mkdir()
    other = tmp_path / ".model.tmpfoo"  # not ours: no pid
    other.mkdir()
    atomic.write_dir(target, lambda tmp: (tmp / "f").write_text("new"))
    assert (target / "f").read_text() == "new"
    assert not dead.exists() and live.exists() and other.exists()
    assert dead_file.exists()  # another target's temp: only its own next write removes it
    assert atomic.remove_stale(tmp_path / "stats") == [dead_file] and not dead_file.exists()


def test_save_model_replaces_a_folder_and_leaves_no_temp(tmp_path):
    m = tiny.model("gpt2")
    folder = tmp_path / "m"
    export.save_model(m, tiny.tokenizer(), folder)
    export.save_model(m, tiny.tokenizer(), folder)  # over an existing copy
    assert _siblings(folder) == []
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(export.load_model(folder)(x).logits, m(x).logits)


@pytest.mark.process
def test_a_kill_during_the_model_write_leaves_no_temp_for_good(tmp_path):
    """A real SIGKILL mid-write: the temp folder stays, the old model too; the next save removes it."""
    folder = tmp_path / "m"
    export.save_model(tiny.model("llama"), tiny.tokenizer(), folder)
    before = (folder / "model.safetensors").read_bytes()
    code = (
        "import os, signal, sys\n"
        "sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']\n"
        "import tiny\n"
        "from engine.models import export\n"
        "m = tiny.model('llama', seed=1)\n"
        "orig = m.save_pretrained\n"
        "def killed(path, **kw):\n"
        "    orig(path, **kw)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "m.save_pretrained = killed\n"
        "export.save_model(m, None, sys.argv[2])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(folder)], stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err.decode()[-2000:]
    assert _siblings(folder) == [f".m.tmp{proc.pid}"] and (folder / "model.safetensors").read_bytes() == before
    export.save_model(tiny.model("llama", seed=2), tiny.tokenizer(), folder)
    assert _siblings(folder) == []


def test_masks_round_trip_through_the_atomic_path(tmp_path):
    masks = {"a.weight": torch.rand(4, 3) > 0.5, "b.bias": torch.tensor([True, False])}
    export.save_masks(masks, tmp_path)
    assert (tmp_path / export.MASKS_FILE).exists() and _siblings(tmp_path / export.MASKS_FILE) == []
    back = export.load_masks(tmp_path)
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)
    assert export.load_masks(tmp_path / "none") == {}


def test_calibration_stats_round_trip_and_leave_no_temp(tmp_path):
    from engine.prune.calibrate import STATS_FILE, Stats

    t = {"mlp.0.abs": torch.rand(8, dtype=torch.float64), "token_counts": torch.arange(5)}
    Stats(t, 7, {"k": 1}).save(tmp_path / "stats")
    back = Stats.load(tmp_path / "stats")
    assert back.n_tokens == 7 and back.meta == {"k": 1} and torch.equal(back.t["mlp.0.abs"], t["mlp.0.abs"])
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == sorted([STATS_FILE, "calibration.json"])


def test_url_download_lands_atomically(tmp_path, monkeypatch):
    from engine.data import download

    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "www"
    served.mkdir()
    (served / "corpus.txt").write_text("hello " * 1000)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/corpus.txt"
        seen = []
        path = download.fetch(url, progress=lambda d, t, r: seen.append((d, t)))
        assert path.read_text() == "hello " * 1000 and seen[-1] == (6000, 6000)
        assert _siblings(path) == []
        with pytest.raises(Exception, match="cannot download"):
            download.fetch(url.replace("corpus", "missing"))
        assert not download.cache_path(url.replace("corpus", "missing")).exists()
        assert _siblings(path) == []
    finally:
        server.shutdown()
