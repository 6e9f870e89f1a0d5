"""The run record (engine/run/record.py): docs/EVENTS.md is generated from it, and `event()`,
the check every writer goes through, refuses what the record does not list."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.run import record

ROOT = Path(__file__).resolve().parent.parent


def _valid(kind: str) -> dict:
    """An event of `kind` with every field the record lists, filled by its type."""
    sample = {"int": 1, "int|null": None, "bool": False, "number": 1.5, "number|null": None, "str": "x", "str|null": None,
              "list[str]": ["baseline"], "list[dict]": [], "dict": {}}
    fields = {f.name: sample[f.type] for f in record.KINDS[kind].fields}
    for (k, name), allowed in (*record.CHOICES.items(), *record.OPTIONAL_CHOICES.items()):
        if k == kind:
            fields[name] = allowed[0]
    if kind == "metric":
        fields["name"] = "ppl"
    return fields


def test_events_md_is_the_generated_text():
    doc = (ROOT / "docs" / "EVENTS.md").read_text(encoding="utf-8")
    assert doc == record.markdown(), "regenerate it: python -m engine.run.record > docs/EVENTS.md"


def test_every_kind_in_the_record_passes_its_own_check():
    for kind in record.KINDS:
        assert record.event(kind, _valid(kind)) is not None


def test_event_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown event kind 'gpu_sample'"):
        record.event("gpu_sample", {"device": 0})


def test_event_rejects_a_missing_field():
    fields = _valid("stage_end")
    del fields["seconds"]
    with pytest.raises(ValueError, match=r"missing \['seconds'\]"):
        record.event("stage_end", fields)


def test_event_allows_a_missing_optional_field_only():
    fields = _valid("metric")
    fields.pop("protocol", None)
    fields.pop("reused_from", None)
    record.event("metric", fields)
    assert [f.name for f in record.KINDS["metric"].fields if f.optional] == ["protocol", "reused_from"]


def test_event_rejects_an_unknown_field():
    with pytest.raises(ValueError, match=r"unknown \['nonzero_params'\]"):
        record.event("layer_report", {**_valid("layer_report"), "nonzero_params": 3})


def test_event_rejects_an_unknown_metric_name_and_model():
    with pytest.raises(ValueError, match="unknown metric 'bits_per_char'"):
        record.event("metric", {**_valid("metric"), "name": "bits_per_char"})
    with pytest.raises(ValueError, match="model = 'student'"):
        record.event("metric", {**_valid("metric"), "model": "student"})


def test_event_rejects_values_outside_the_closed_sets():
    with pytest.raises(ValueError, match="stage = 'export'"):
        record.event("stage_start", {"stage": "export"})
    with pytest.raises(ValueError, match="unit = 'blocks'"):
        record.event("progress", {**_valid("progress"), "unit": "blocks"})
    with pytest.raises(ValueError, match="status = 'running'"):
        record.event("run_end", {"status": "running"})
    with pytest.raises(ValueError, match="stage = 'evaluate'"):  # an optional field with a closed set
        record.event("train", {**_valid("train"), "stage": "evaluate"})


def test_the_record_is_consistent_with_itself():
    assert set(record.END_STATUSES) <= set(record.STATUSES) and set(record.LIVE_STATUSES) <= set(record.STATUSES)
    assert record.DISCONNECTED not in record.STATUSES and record.CORRUPT not in record.STATUSES
    assert [k for k, spec in record.KINDS.items() if spec.only_on] == ["gpu"]
    # the one kind a reader appends (the runner cannot record its own kill -9): tests/test_runner_death.py
    assert [k for k, spec in record.KINDS.items() if spec.writer != "runner"] == ["runner_died"]
    assert all(m.name.startswith("mcq_") and m.unit == "fraction" for m in map(record.METRICS.get, record.MCQ_METRICS))
    assert record.RESULTS["models"].keys == ()  # keyed by model, then by metric name
