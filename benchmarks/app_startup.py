"""Startup benchmark: time from launch to the app's first frame, and `minigpt --help`.

Each measurement is a fresh interpreter (imports included), the way a user starts it:

- app first frame: `MinigptApp` runs headless; the clock stops once the sessions screen
  has loaded its rows and the following refresh has been painted.
- `minigpt --help`: `python -m minigpt_tui.cli --help` as a subprocess.

Targets (see the TUI issue): first frame <= 1 s, --help <= 0.3 s. This prints measurements
only.  Usage: .venv/bin/python benchmarks/app_startup.py [--runs 5] [--root SESSIONS]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from minigpt_tui.app import MinigptApp
from minigpt_tui.screens.sessions import SessionsScreen
imported = time.time()

class Bench(MinigptApp):
    def on_mount(self):
        super().on_mount()
        self._poll = self.set_interval(0.002, self._check)

    def _check(self):
        screen = self.screen
        if isinstance(screen, SessionsScreen) and screen.loaded:
            self._poll.stop()
            self.call_after_refresh(self._done)

    def _done(self):
        self.exit(time.time())

t = Bench(root=Path({root!r})).run(headless=True, size=(120, 40))
print(f"{{imported!r}} {{t!r}}")
"""


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def first_frame(root: Path, tmp: Path) -> tuple[float, float, float]:
    """Seconds from spawning the interpreter to (imports done, first frame painted), and the
    child's CPU seconds (less sensitive than wall time to other load on the machine)."""
    script = tmp / "first_frame_child.py"  # a file: Textual resolves CSS paths via source files
    script.write_text(CHILD.format(repo=str(REPO), root=str(root)))
    cpu0, start = _child_cpu(), time.time()
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "TEXTUAL_ANIMATIONS": "none"}, timeout=60)
    cpu = _child_cpu() - cpu0
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "child failed")
    imported, painted = (float(x) for x in res.stdout.strip().splitlines()[-1].split())
    return imported - start, painted - start, cpu


def cli_help() -> tuple[float, float] | str:
    cpu0, start = _child_cpu(), time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", "minigpt_tui.cli", "--help"], capture_output=True,
                             text=True, cwd=REPO, timeout=60)
    except subprocess.TimeoutExpired:
        return "n/a (timed out after 60 s)"
    elapsed, cpu = time.perf_counter() - start, _child_cpu() - cpu0
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["exit code %d" % res.returncode])[-1]
        return f"n/a ({last})"
    return elapsed, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--root", type=Path, default=None, help="session root to list (default: an empty temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "sessions"
        frames = [first_frame(root, Path(tmp)) for _ in range(args.runs)]
    helps = [cli_help() for _ in range(args.runs)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"runs: {args.runs}  python: {sys.version.split()[0]}  cpus: {os.cpu_count()}  load(1m): {load:.1f}")

    def line(label: str, values: list[float], cpu: list[float] | None = None) -> None:
        text = f"{label:<22} wall median {statistics.median(values):.3f} s  min {min(values):.3f} s"
        if cpu:
            text += f"  | cpu median {statistics.median(cpu):.3f} s"
        print(text)

    line("app imports done:", [f[0] for f in frames])
    line("app first frame:", [f[1] for f in frames], [f[2] for f in frames])
    numbers = [h for h in helps if isinstance(h, tuple)]
    if numbers:
        line("minigpt --help:", [h[0] for h in numbers], [h[1] for h in numbers])
    else:
        print(f"{'minigpt --help:':<22} {helps[0]}")


if __name__ == "__main__":
    main()
