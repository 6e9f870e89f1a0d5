"""`minigpt export SESSION --format gguf`: the file it writes loads in llama.cpp; bad input is
one line on stderr, exit code 2, and no file left behind (a full disk included)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

import tiny
from engine import config as config_mod
from engine.models.export import save_model
from engine.run import session as session_mod

pytestmark = pytest.mark.process  # runs the CLI as a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, fsize=None):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "minigpt_tui.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit if fsize else None)


def session_with(tmp_path, family="llama", model=True):
    s = session_mod.create(config_mod.RunConfig(name=f"x-{family}"), tmp_path)
    if model:
        save_model(tiny.model(family), tiny.tokenizer(), s.model_dir)
    return s


def files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def one_line_error(r, *words):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()  # progress lines may come first; the error is the one last line
    assert lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert sum(ln.startswith("error") for ln in lines) == 1, r.stderr
    for w in words:
        assert w in lines[-1], lines[-1]


def test_export_writes_a_file_llama_cpp_loads(tmp_path):
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed; run ./scripts/setup.sh --dev")
    s = session_with(tmp_path)
    r = cli("export", s.id, "--root", str(tmp_path), "--format", "gguf", "--quant", "q8_0")
    assert r.returncode == 0, r.stderr
    path = s.path / "export" / f"{s.id}-q8_0.gguf"
    assert f"wrote {path}" in r.stdout and f"{path.stat().st_size:,} bytes" in r.stdout
    assert files(s.path / "export") == [path.name]  # the f32 temp is gone
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    try:
        assert llm.n_vocab() == 320
    finally:
        llm.close()


def test_unknown_quantisation(tmp_path):
    s = session_with(tmp_path)
    one_line_error(cli("export", s.id, "--root", str(tmp_path), "--quant", "q9_z"), "unknown quantisation", "q4_k_m")
    assert files(s.path / "export") == []


def test_unknown_format(tmp_path):
    s = session_with(tmp_path)
    one_line_error(cli("export", s.id, "--root", str(tmp_path), "--format", "onnx"), "unknown export format", "gguf")


def test_session_without_a_model(tmp_path):
    s = session_with(tmp_path, model=False)
    one_line_error(cli("export", s.id, "--root", str(tmp_path)), "has no model yet", f"minigpt resume {s.id}")
    assert files(s.path / "export") == []


def test_unsupported_family(tmp_path):
    s = session_with(tmp_path, family="opt")
    one_line_error(cli("export", s.id, "--root", str(tmp_path)), "GGUF export of opt models is not supported",
                   "llama, mistral")
    assert files(s.path / "export") == []


def test_full_disk_leaves_no_partial_file(tmp_path):
    """The write fails part way (a file-size limit: the OS refuses the bytes, as a full disk does)."""
    s = session_with(tmp_path)
    r = cli("export", s.id, "--root", str(tmp_path), "--quant", "f32", fsize=40_000)
    one_line_error(r, "disk is full", "--out")
    assert files(s.path / "export") == []


def test_export_with_an_importance_matrix_from_the_calibration_split(tmp_path):
    import ft_case

    cfg = ft_case.config(tmp_path, "llama")
    s = session_mod.create(cfg, tmp_path / "sessions")
    save_model(tiny.model("llama"), tiny.tokenizer(), s.model_dir)
    r = cli("export", str(s.path), "--quant", "q4_k_m", "--imatrix", "256")
    assert r.returncode == 0, r.stderr
    assert "importance matrix from 256 calibration tokens of" in r.stderr, r.stderr
    assert "importance matrix: 14 of 14 block matrices" in r.stderr, r.stderr
    one_line_error(cli("export", str(s.path), "--quant", "f16", "--imatrix", "256"), "is not quantised", "q4_k_m")
    one_line_error(cli("export", str(s.path), "--quant", "q4_k_m", "--imatrix", "-5"), "negative")
