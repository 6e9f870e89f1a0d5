"""Compare screen: sessions side by side from their results.json, sortable, exported atomically
to CSV and Markdown under <root>/exports/."""

from __future__ import annotations

import csv
import io

from textual.widgets import DataTable

from engine.run import session as session_mod
from minigpt_tui.data import compare_row
from minigpt_tui.screens.compare import CompareScreen
from tui_helpers import head_events, make_session, screen_text, standard_root, wait_for


async def _compare(pilot, paths) -> CompareScreen:
    await pilot.pause()
    pilot.app.open_compare(paths)
    screen = pilot.app.screen
    await wait_for(pilot, lambda: screen.loaded)
    return screen


def test_compare_row_reads_results_json_alone(root):
    """The record keeps each metric once in results.json (models[model][name]) and the prune
    totals in its prune section: the row reads those, never the events nor the layer report."""
    s = make_session(root, "partial", head_events(), status="stopped", completed=["baseline"],
                     results={"models": {"base": {"ppl": 12.5, "params": 134_515_008, "mcq_acc": 0.62},
                                         "pruned": {"ppl": 20.5, "params": 100_000_000, "mcq_acc": 0.5}},
                              "prune": {"mode": "mask", "params_before": 134_515_008,
                                        "params_after": 100_000_000, "pct_removed": 25.66}})
    row = compare_row(session_mod.Session(s.path))
    assert row["ppl_base"] == 12.5  # results.json's, not the metric event's 12.4031
    assert row["params_base"] == 134_515_008 and row["mcq_base"] == 0.62
    assert row["ppl_pruned"] == 20.5 and row["params_pruned"] == 100_000_000 and row["mcq_pruned"] == 0.5
    assert row["pct_removed"] == 25.66 and row["ppl_finetuned"] is None and row["params_finetuned"] is None
    assert row["status"] == "stopped"
    # a session inside its first stage has no results.json yet: nothing to compare, whatever the events say
    early = make_session(root, "early", head_events(), status="stopped", completed=[], results={})
    assert all(compare_row(session_mod.Session(early.path))[k] is None
               for k in ("ppl_base", "params_base", "mcq_base", "pct_removed"))


async def test_two_sessions_side_by_side_sort_and_export(root, make_app):
    sessions = standard_root(root)
    app = make_app()
    async with app.run_test(size=(200, 30)) as pilot:
        screen = await _compare(pilot, [sessions["done"].path, sessions["ratio"].path])
        assert not screen.transposed  # wide enough for one row per session
        table = screen.query_one(DataTable)
        assert table.row_count == 2
        ppl_at = list(table.columns).index("ppl_base")
        assert [str(c) for c in table.get_row("phi-stdlib-ratio")][ppl_at:ppl_at + 3] == ["12.40", "18.59", "15.15"]
        assert str(table.get_cell("phi-stdlib-ratio", "recipe")) == "mlp"  # config: no other axis, no recovery
        # sort by "ppl ft": move the cursor to that column and press s; again reverses
        col = [k for k in table.columns].index("ppl_finetuned")
        table.move_cursor(column=col)
        await pilot.press("s")
        assert [r["id"] for r in screen.sorted_rows()] == ["smollm2-licenses-eps", "phi-stdlib-ratio"]
        await pilot.press("s")
        assert [r["id"] for r in screen.sorted_rows()] == ["phi-stdlib-ratio", "smollm2-licenses-eps"]
        assert table.coordinate_to_cell_key((0, 0)).row_key.value == "phi-stdlib-ratio"
        assert "sorted by ppl ft (descending)" in screen_text(app)

        await pilot.press("e")
        csv_path = screen.last_export
        assert csv_path is not None and csv_path.parent == root.resolve() / "exports" and csv_path.suffix == ".csv"
        rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
        assert [r["id"] for r in rows] == ["phi-stdlib-ratio", "smollm2-licenses-eps"]
        assert rows[1]["ppl_finetuned"] == "13.7718" and rows[1]["pct_removed"] == "3.7"
        assert f"exported to {csv_path}" in screen_text(app)

        await pilot.press("m")
        md = screen.last_export.read_text().splitlines()
        assert screen.last_export.suffix == ".md"
        assert md[0].startswith("| session | model | domain | method | axes · loss | state | params base |")
        assert md[2].startswith("| phi-stdlib-ratio | microsoft/phi-1_5 | builtin:stdlib-docs | struct 30% | mlp "
                                "| done |")
        assert "| 13.77 |" in md[3]
        # atomic writes leave no temp files behind
        assert sorted(p.suffix for p in (root / "exports").iterdir()) == [".csv", ".md"]


async def test_narrow_terminal_transposes_and_still_sorts(root, make_app):
    sessions = standard_root(root)
    app = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _compare(pilot, [sessions["done"].path, sessions["ratio"].path,
                                        sessions["disconnected"].path])
        assert screen.transposed
        table = screen.query_one(DataTable)
        assert [c.label.plain for c in table.columns.values()] == ["", "smollm2-licenses-eps",
                                                                   "phi-stdlib-ratio", "opt-licenses-mask"]
        # cursor on the "ppl pruned" row, s sorts sessions by it (no value sorts last)
        table.move_cursor(row=[k.value for k in table.rows].index("ppl_pruned"))
        await pilot.press("s")
        assert [r["id"] for r in screen.sorted_rows()] == ["smollm2-licenses-eps", "phi-stdlib-ratio",
                                                           "opt-licenses-mask"]
        await pilot.press("t")
        assert not screen.transposed and table.row_count == 3
        await pilot.press("escape")
        assert not isinstance(app.screen, CompareScreen)


def _svg_runs(svg_text: str) -> dict:
    """The SVG's polylines by the run each names (its <title>), their colours and point counts."""
    import xml.etree.ElementTree as ET

    ns = {"s": "http://www.w3.org/2000/svg"}
    tree = ET.fromstring(svg_text)
    out: dict = {}
    for line in tree.iter("{http://www.w3.org/2000/svg}polyline"):
        name = line.find("s:title", ns).text
        out.setdefault(name, []).append((line.get("stroke"), len(line.get("points").split())))
    return out


async def test_curves_overlay_stable_colours_pinned_base_and_one_key_export(root, make_app):
    """Curves tab: both runs' loss and held-out ppl on the same axes, each in its own colour and
    glyph that stays with the run when the table is re-sorted; the base model's perplexity is
    the pinned first legend item; x writes CSV, Markdown and an SVG of the curves at once."""
    from minigpt_tui.widgets import OverlayPlot

    sessions = standard_root(root)
    app = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _compare(pilot, [sessions["done"].path, sessions["ratio"].path])
        await pilot.press("2")
        await pilot.pause()
        loss = screen.query_one("#compare-loss", OverlayPlot)
        ppl = screen.query_one("#compare-ppl", OverlayPlot)
        assert [name for name, _, _ in loss.series] == ["smollm2-licenses-eps", "phi-stdlib-ratio"]
        assert all(len(ser) == 40 for _, _, ser in loss.series)  # 40 steps each, on one x axis
        assert [len(ser) for _, _, ser in ppl.series] == [5, 5]  # step 0 (pruned) + every 10 steps
        assert ppl.refs == [("base 12.40", "bright_black", 12.4031)]
        styles = {name: style for name, style, _ in loss.series}
        assert len(set(styles.values())) == 2
        text = screen_text(app)
        glyphs = [s.split()[0] for s in styles.values()]
        assert "── base 12.40" in text and all(g in text for g in glyphs)
        assert "held-out perplexity by step" in text
        # sorting reorders the legend, never the colours
        screen.sort_by_column("ppl_finetuned")
        screen.sort_by_column("ppl_finetuned")
        assert [name for name, _, _ in loss.series] == ["phi-stdlib-ratio", "smollm2-licenses-eps"]
        assert {name: style for name, style, _ in loss.series} == styles
        # reopening the same marked runs (in the other order) gives the same colours
        await pilot.press("escape")
        screen2 = await _compare(pilot, [sessions["ratio"].path, sessions["done"].path])
        assert {n: st for n, st, _ in screen2._series("loss")} == styles

        await pilot.press("x")
        await pilot.pause()
        exports = sorted((root / "exports").iterdir())
        assert [p.suffix for p in exports] == [".csv", ".md", ".svg"]
        assert len({p.stem for p in exports}) == 1  # one stamp for the three
        assert any("Wrote 3 files" in str(n.message) and str(root.resolve() / "exports") in str(n.message)
                   for n in app._notifications)
        svg = exports[2].read_text()
        runs = _svg_runs(svg)
        assert set(runs) == {"smollm2-licenses-eps", "phi-stdlib-ratio"}
        assert [n for _, n in runs["smollm2-licenses-eps"]] == [40, 5]  # loss panel, ppl panel
        colours = {name: {c for c, _ in lines} for name, lines in runs.items()}
        assert all(len(c) == 1 for c in colours.values()) and colours["smollm2-licenses-eps"] != colours[
            "phi-stdlib-ratio"]
        assert "stroke-dasharray" in svg and "base model ppl (12.4031)" in svg  # the pinned baseline
        assert "fine-tuning loss" in svg and "held-out perplexity" in svg and ">step<" in svg


def test_stable_styles_depend_on_the_run_not_the_order():
    from minigpt_tui.data import RUN_STYLES, stable_styles

    ids = [f"run-{i}" for i in range(5)]
    a = stable_styles(ids)
    assert a == stable_styles(list(reversed(ids)))
    assert len(set(a.values())) == 5 and set(a.values()) <= set(RUN_STYLES)
    # more runs than styles: every run still gets one
    many = stable_styles([f"r{i}" for i in range(len(RUN_STYLES) + 3)])
    assert len(many) == len(RUN_STYLES) + 3


def test_recipe_and_control_columns_read_the_config_and_results(root):
    """Compression axes and the recovery loss come from config.toml; the control's perplexity and
    bits per byte from results.json (models.control.ppl, models.finetuned.bpb)."""
    s = make_session(root, "heads-kd", head_events(), status="done",
                     overrides={"prune": {"head_ratio": 0.25, "head_mode": "per_layer", "depth": 2},
                                "finetune": {"enabled": True, "loss": "kd", "teacher_steps": 10, "control": True}},
                     results={"models": {"base": {"ppl": 12.5}, "finetuned": {
                         "ppl": 14.0, "bpb": 0.91,
                         "bpb_protocol": {"finetune_overlap": {"n": 13, "windows": 5245, "share": 0.9415}}},
                         "control": {"ppl": 11.8}}})
    row = compare_row(session_mod.Session(s.path))
    assert row["recipe"] == "mlp · heads 25% per layer · depth 2 · kd+teacher 10 +control"
    assert row["ppl_control"] == 11.8 and row["bpb_finetuned"] == 0.91
    assert row["heldout_overlap"] == 94.2  # % of the held-out 13-word windows in the fine-tune split
    budget = make_session(root, "budget", head_events(), status="done",
                          overrides={"prune": {"target_params": 0.5, "search_axes": ["mlp", "heads"]}})
    assert compare_row(session_mod.Session(budget.path))["recipe"].startswith("budget 50% · mlp/heads")
