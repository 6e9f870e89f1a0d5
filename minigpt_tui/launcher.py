"""The one boundary between the app and running a pipeline: launch and stop a runner.

`engine.run.launch` (owned by the engine, torch-free) spawns a detached
`python -m engine.run.runner PATH` process and asks it to stop. It is imported plainly, so
import-linter sees the edge and checks that nothing behind it reaches torch; tests
monkeypatch `engine.run.launch.launch_detached` / `engine.run.launch.request_stop` or
inject another launcher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from engine.run import launch


class Launcher(Protocol):
    def launch(self, session_path: Path) -> int: ...

    def stop(self, session_path: Path) -> None: ...

    def reap(self) -> list[int]: ...


class EngineLauncher:
    """Calls `engine.run.launch.launch_detached(path) -> pid` and `engine.run.launch.request_stop(path)`."""

    def launch(self, session_path: Path) -> int:
        return int(launch.launch_detached(Path(session_path)))

    def stop(self, session_path: Path) -> None:
        launch.request_stop(Path(session_path))

    def reap(self) -> list[int]:
        """Collect the runners this process launched that have ended: no `<defunct>` children."""
        return launch.reap()
