"""Process ids for tests of what a dead writer or runner leaves behind."""

import os
from pathlib import Path

import pytest


def dead_pid() -> int:
    """A pid no process has now."""
    top = Path("/proc/sys/kernel/pid_max")
    for pid in range((int(top.read_text()) if top.exists() else 32768) - 1, 1, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free pid")
