"""Import hygiene: the engine stays headless (no textual), and the app stays torch-free so it
starts fast and never initialises CUDA in the UI process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    return str(exe) if exe.exists() else (shutil.which("lint-imports") or "lint-imports")


def _run(args, cwd, extra_path: Path | None = None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(extra_path or cwd) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_import_linter_contracts_are_kept():
    res = _run([_lint_imports(), "--no-cache"], REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 kept, 0 broken" in res.stdout


def test_import_linter_contract_catches_a_violation(tmp_path):
    """The contract is real: an engine module importing textual breaks it."""
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    for pkg in ("engine", "minigpt_tui", "minigpt_tui/screens"):
        (tmp_path / pkg).mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    for mod in ("app", "data", "runview", "widgets"):
        (tmp_path / "minigpt_tui" / f"{mod}.py").write_text("")
    (tmp_path / "engine" / "bad.py").write_text("import textual\n")
    res = _run([_lint_imports(), "--no-cache"], tmp_path, extra_path=tmp_path)
    assert res.returncode != 0
    assert "engine.bad -> textual" in res.stdout


def test_importing_the_app_loads_neither_torch_nor_transformers():
    code = ("import json, sys, minigpt_tui.app; "
            "print(json.dumps([m for m in ('torch', 'transformers', 'engine.run.runner', 'engine.run.pipeline') "
            "if m in sys.modules]))")
    res = _run([sys.executable, "-c", code], REPO)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_engine_session_modules_do_not_load_textual():
    code = ("import json, sys, engine.run.session, engine.run.events, engine.config, engine.errors, engine.atomic; "
            "print(json.dumps([m for m in ('textual', 'torch') if m in sys.modules]))")
    res = _run([sys.executable, "-c", code], REPO)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
