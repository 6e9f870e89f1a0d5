"""The workbench's GGUF export (issue 14, item 1): a dialog on a finished session runs the real
`minigpt export` in a child process from a worker that posts typed messages; it shows the
blocks being written, then the file's path and size, or the engine's one-line error. The
files it writes are checked in llama.cpp itself."""

from __future__ import annotations

import pytest
from textual.widgets import ProgressBar, Select

from minigpt_tui.messages import ExportFinished, ExportProgress
from minigpt_tui.screens.export import DIRECT, QUANTS, ExportScreen, export_command, target_path
from minigpt_tui.screens.sessions import SessionsScreen
from minigpt_tui.widgets import Tick
from tui_helpers import finished_events, make_session, screen_text, wait_for


def test_the_dialog_offers_what_minigpt_export_accepts():
    from engine.models import gguf

    assert QUANTS == gguf.FORMATS
    assert set(DIRECT) == set(gguf.DIRECT)


def finished_with_model(root, name: str, family: str = "llama"):
    """A done session whose model/ is a real (tiny) saved model, as the prune stage leaves it."""
    import tiny
    from engine.models.export import save_model

    s = make_session(root, name, finished_events(), status="done")
    save_model(tiny.model(family), tiny.tokenizer(), s.model_dir)
    return s


def _text(screen, selector: str) -> str:
    from textual.widgets import Static

    return str(screen.query_one(selector, Static).content)


async def _open_dialog(pilot, name: str) -> ExportScreen:
    app = pilot.app
    await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded
                   and app.screen.current_row() is not None)
    screen = app.screen
    rows = [r["id"] for r in screen.visible_rows()]
    for _ in range(rows.index(name)):
        await pilot.press("down")
    await pilot.press("e")
    await wait_for(pilot, lambda: isinstance(app.screen, ExportScreen))
    return app.screen


@pytest.mark.process
async def test_export_q8_0_padded_from_the_dialog_loads_in_llama_cpp(root, make_app):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python: ./scripts/setup.sh --dev builds it")
    s = finished_with_model(root, "tiny-llama")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        dialog = await _open_dialog(pilot, "tiny-llama")
        dialog.query_one("#x-quant", Select).value = "q8_0"
        dialog.query_one("#x-pad", Tick).value = True
        await pilot.pause()
        out = target_path(s, "q8_0", True)
        assert _text(dialog, "#export-target") == f"to {out}" and "[x] pad every layer" in screen_text(app)
        await pilot.press("ctrl+s")
        assert dialog.running and dialog.query_one("#x-quant", Select).disabled
        await wait_for(pilot, lambda: dialog.result is not None, timeout=240)
        res = dialog.result
        assert res.error is None, res.error
        assert res.path == str(out) and out.is_file() and res.bytes == out.stat().st_size
        assert "llama" in res.summary and "q8_0" in res.summary.lower()
        assert _text(dialog, "#export-status").startswith(f"wrote {out}\n")
        assert f"{res.bytes:,} bytes" in screen_text(app)
        assert any("Exported" == (n.title or "") and str(out) in str(n.message) for n in app._notifications)
        assert dialog.blocks == [(1, 2), (2, 2)]  # one progress step per block written
        assert any("quantis" in line.lower() or "loading" in line for line in dialog.lines), dialog.lines
        assert dialog.query_one("#export-progress", ProgressBar).percentage == 1.0
        assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # the f32 temp is gone
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)
    try:
        assert llm.n_vocab() == 320
    finally:
        llm.close()


@pytest.mark.process
async def test_an_unsupported_family_shows_the_engine_line_and_leaves_no_file(root, make_app):
    s = finished_with_model(root, "tiny-opt", family="opt")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        dialog = await _open_dialog(pilot, "tiny-opt")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: dialog.result is not None, timeout=240)
        err = dialog.result.error
        assert err and "GGUF export of opt models is not supported" in err and "llama" in err
        assert "\n" not in err and "Traceback" not in screen_text(app)
        assert err[:60] in screen_text(app)
        assert not dialog.running and not dialog.query_one("#x-quant", Select).disabled  # ready to try again
    assert not (s.path / "export").exists() or not any((s.path / "export").iterdir())


async def test_export_is_refused_on_a_running_session_or_one_without_a_model(root, make_app):
    make_session(root, "live", finished_events()[:5], status="running", stage="baseline", completed=[])
    make_session(root, "nomodel", finished_events(), status="done")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded)
        for s in (root / "live", root / "nomodel"):
            from engine.run import session as session_mod

            app.open_export(session_mod.Session(s))
            await pilot.pause()
            assert not isinstance(app.screen, ExportScreen)
        messages = [str(n.message) for n in app._notifications]
        assert any("has no model yet" in m for m in messages)


async def test_messages_drive_the_dialog(root, make_app):
    """The handlers alone change the widgets: progress fills the bar, the end shows path and size."""
    s = finished_with_model(root, "tiny-llama")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        dialog = await _open_dialog(pilot, "tiny-llama")
        dialog.running = True
        dialog.query_one("#export-progress").display = True
        dialog.post_message(ExportProgress(3, 30))
        await pilot.pause()
        assert dialog.query_one("#export-progress", ProgressBar).progress == 3
        assert "writing blocks 3/30" in screen_text(app)
        out = target_path(s, "f16", False)
        dialog.post_message(ExportFinished(str(out), 1_234_567, summary="llama, 2 blocks, f16"))
        await pilot.pause()
        assert _text(dialog, "#export-status") == f"wrote {out}\n1.2 MB (1,234,567 bytes) · llama, 2 blocks, f16"
        assert "1.2 MB (1,234,567 bytes)" in screen_text(app)
        await pilot.press("escape")
        assert not isinstance(app.screen, ExportScreen)


async def test_the_importance_matrix_is_offered_for_quantised_types_only(root, make_app):
    """f32/f16 are written directly: the importance select is off and no --imatrix goes out; a
    quantised type turns it on, and the target file and the command carry the choice."""
    s = finished_with_model(root, "tiny-llama")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        dialog = await _open_dialog(pilot, "tiny-llama")
        im = dialog.query_one("#x-imatrix", Select)
        assert im.disabled and dialog.choice()[3] == 0
        dialog.query_one("#x-quant", Select).value = "q4_k_m"
        await pilot.pause()
        assert not im.disabled
        im.value = 4096
        await pilot.pause()
        out = target_path(s, "q4_k_m", False, 4096)
        assert out.name == "tiny-llama-q4_k_m-im4096.gguf" and _text(dialog, "#export-target") == f"to {out}"
        assert dialog.choice() == ("gguf", "q4_k_m", False, 4096)
        dialog.query_one("#x-quant", Select).value = "f16"
        await pilot.pause()
        assert im.disabled and dialog.choice()[3] == 0 and _text(dialog, "#export-target").endswith("-f16.gguf")
    cmd = export_command(s, "gguf", "q4_k_m", False, out, 4096)
    assert cmd[cmd.index("--imatrix") + 1] == "4096" and "--imatrix" not in export_command(s, "gguf", "f16", False, out)


@pytest.mark.process
async def test_export_q4_k_m_with_an_importance_matrix_from_the_dialog_loads_in_llama_cpp(root, make_app):
    """The dialog's importance choice reaches the real `minigpt export --imatrix`: the guided file
    is written under its own name, llama.cpp loads it, and its log names the calibration tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python: ./scripts/setup.sh --dev builds it")
    s = finished_with_model(root, "tiny-llama")
    app = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        dialog = await _open_dialog(pilot, "tiny-llama")
        dialog.query_one("#x-quant", Select).value = "q4_k_m"
        await pilot.pause()
        dialog.query_one("#x-imatrix", Select).value = 1024
        await pilot.pause()
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: dialog.result is not None, timeout=240)
        res = dialog.result
        assert res.error is None, res.error
        out = target_path(s, "q4_k_m", False, 1024)
        assert res.path == str(out) and out.is_file()
        assert any("importance matrix from" in line and "calibration tokens" in line for line in dialog.lines), \
            dialog.lines
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)
    try:
        assert llm.n_vocab() == 320
        llm.eval([1, 2, 3])
    finally:
        llm.close()
