"""Every test gets its own calibration cache: statistics cached by one test must never
turn another test's calibration into a cache hit (child runners inherit the variable)."""

import os

import pytest

# Under pytest-xdist (the fast subset runs with -n 2) each worker gets one compute thread:
# two workers with a thread per core each oversubscribe 2 cores and run slower than one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MINIGPT_CALIBRATION_CACHE", str(tmp_path_factory.mktemp("calibration-cache")))


def pytest_collection_modifyitems(config, items):
    """Every test under tests/tui/ drives the Textual app (pilots, snapshots): marked `tui`, so the
    fast subset (-m "not slow and not process and not tui") stays under a minute on 2 cores."""
    tui = os.path.join("tests", "tui") + os.sep
    for item in items:
        if tui in str(item.fspath):
            item.add_marker(pytest.mark.tui)
