"""Every test gets its own calibration cache: statistics cached by one test must never
turn another test's calibration into a cache hit (child runners inherit the variable)."""

import pytest


@pytest.fixture(autouse=True)
def _calibration_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MINIGPT_CALIBRATION_CACHE", str(tmp_path_factory.mktemp("calibration-cache")))
