"""The one boundary between the app and running a pipeline: launch and stop a runner.

`engine.run.runner` (owned by the engine) spawns a detached `minigpt run-session PATH`
process and asks it to stop. It is imported lazily, inside the call, so importing the app
never pulls in the runner's dependencies, and tests can monkeypatch
`engine.run.runner.launch_detached` / `engine.run.runner.request_stop` or inject another launcher.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

from engine.errors import MinigptError


class Launcher(Protocol):
    def launch(self, session_path: Path) -> int: ...

    def stop(self, session_path: Path) -> None: ...


class EngineLauncher:
    """Calls `engine.run.runner.launch_detached(path) -> pid` and `engine.run.runner.request_stop(path)`."""

    def _runner(self):
        try:
            return importlib.import_module("engine.run.runner")
        except ImportError as e:
            raise MinigptError(f"cannot start runs: engine.run.runner is not available ({e})",
                               "install minigpt fully, or run it from the CLI: minigpt run-session PATH") from None

    def launch(self, session_path: Path) -> int:
        return int(self._runner().launch_detached(Path(session_path)))

    def stop(self, session_path: Path) -> None:
        self._runner().request_stop(Path(session_path))
