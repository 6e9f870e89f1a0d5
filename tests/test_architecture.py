"""The import architecture: the contracts in `.importlinter` hold (the tool's exit status),
they really catch an engine→UI and an app→torch import, and `engine/` has no import cycle.

The lint-imports tests run the console script (marker `process`); the cycle check builds
grimp's graph in this process, lazy function-level imports included.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = str(exe) if exe.exists() else (shutil.which("lint-imports") or "lint-imports")
    env = dict(os.environ)
    # cwd first, so grimp finds the packages there (a copy) before the installed ones
    env["PYTHONPATH"] = str(cwd) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([cmd, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _contract_name(key: str) -> str:
    ini = configparser.ConfigParser()
    ini.read(REPO / ".importlinter")
    return ini[f"importlinter:contract:{key}"]["name"]


def _flat(text: str) -> str:
    """The report wraps long contract names at 80 columns: compare with whitespace collapsed."""
    return " ".join(text.split())


@pytest.mark.process
def test_lint_imports_passes():
    res = _lint_imports(REPO)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.process
@pytest.mark.parametrize("module,line,contract,edge", [
    ("engine/prune/criteria.py", "import textual", "engine-is-headless", "engine.prune.criteria -> textual"),
    ("minigpt_tui/widgets.py", "import torch", "ui-is-torch-free", "minigpt_tui.widgets -> torch"),
])
def test_a_forbidden_import_breaks_lint_imports(tmp_path, module, line, contract, edge):
    ignore = shutil.ignore_patterns("__pycache__")
    for pkg in ("engine", "minigpt_tui"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=ignore)
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    target = tmp_path / module
    text = target.read_text()
    text += ("" if text.endswith("\n") else "\n") + line + "\n"
    target.write_text(text)
    lineno = len(text.splitlines())  # only the copy has an import on this line: the copy was analysed
    res = _lint_imports(tmp_path)
    out = _flat(res.stdout + res.stderr)
    assert res.returncode != 0, out
    assert f"{_flat(_contract_name(contract))} BROKEN" in out, out
    assert f"{edge} (l.{lineno})" in out, out


def _strongly_connected(graph, modules: set[str]) -> list[list[str]]:
    """Tarjan's components of the import graph restricted to `modules` (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w) & modules))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def test_no_import_cycle_in_the_engine():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("engine")  # module level and function level (lazy) imports alike
    modules = {m for m in graph.modules if m == "engine" or m.startswith("engine.")}
    cycles = [c for c in _strongly_connected(graph, modules) if len(c) > 1]
    lines = []
    for comp in cycles:
        lines.append("cycle: " + ", ".join(comp))
        for a in comp:
            for b in sorted(graph.find_modules_directly_imported_by(a) & set(comp)):
                at = sorted(d["line_number"] for d in graph.get_import_details(importer=a, imported=b))
                lines.append(f"  {a} -> {b} (l.{', '.join(map(str, at))})")
    assert not cycles, "\n".join(lines)


def test_the_cycle_check_sees_a_cycle():
    """The component search itself: a -> b -> c -> a is one component, d alone."""
    class Graph:
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}

        def find_modules_directly_imported_by(self, m):
            return set(self.edges[m])

    comps = _strongly_connected(Graph(), set(Graph.edges))
    assert sorted(comps) == [["a", "b", "c"], ["d"]]
