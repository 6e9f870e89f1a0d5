"""Import hygiene at run time: the engine stays headless (no textual), and the app stays torch-free
so it starts fast and never initialises CUDA in the UI process. Each check imports in a fresh
interpreter; the static contracts (lint-imports) are tested in tests/test_architecture.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # each test starts a fresh interpreter

REPO = Path(__file__).resolve().parents[2]


def _run(args, cwd, extra_path: Path | None = None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(extra_path or cwd) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_importing_the_app_loads_neither_torch_nor_transformers():
    code = ("import json, sys, minigpt_tui.app; "
            "print(json.dumps([m for m in ('torch', 'transformers', 'engine.run.runner', 'engine.run.pipeline') "
            "if m in sys.modules]))")
    res = _run([sys.executable, "-c", code], REPO)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_engine_session_modules_do_not_load_textual():
    code = ("import json, sys, engine.run.session, engine.run.events, engine.run.launch, engine.config, "
            "engine.errors, engine.atomic; "
            "print(json.dumps([m for m in ('textual', 'torch') if m in sys.modules]))")
    res = _run([sys.executable, "-c", code], REPO)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
