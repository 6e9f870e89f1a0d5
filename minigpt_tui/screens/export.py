"""Export a finished session's model as one GGUF file (issue 14 in the workbench): choose the
format and the quantisation, optionally an importance matrix to guide it, optionally pad every
layer to one width, watch the blocks being written, then read the file's path and size.

The export is `minigpt export SESSION --format gguf --quant Q [--imatrix N] [--pad-uniform]
--out PATH --progress`, run as a child process by a thread worker that only reads its output and posts
`ExportProgress` / `ExportFinished` (harlequin's rule: workers post, handlers change widgets).
So torch and transformers load in the child, never in the app (the import contract holds and
the UI stays responsive while the weights are converted); the error is the CLI's own one line
(`MinigptError`: problem — fix), and escape stops the child (the file is written atomically, so
nothing partial is left).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, ProgressBar, Select, Static
from textual.worker import get_current_worker

from engine.run import session as session_mod

from ..data import fmt_bytes
from ..messages import ExportFinished, ExportProgress
from ..widgets import Tick

if TYPE_CHECKING:
    from ..app import MinigptApp

FORMATS = [("gguf — llama.cpp, Ollama, LM Studio", "gguf")]
# what `minigpt export --quant` accepts (engine.models.gguf.FORMATS; a test keeps the two equal:
# that module loads numpy and the adapters, which the app must not import)
QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
          "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
QUANT_HINTS = {"f32": "exact, 4 bytes/weight", "f16": "exact to f16, written directly",
               "q8_0": "8.5 bits/weight, llama.cpp's quantizer", "q4_k_m": "~4.8 bits/weight, the usual pick"}
DIRECT = ("f32", "f16")  # engine.models.gguf.DIRECT: written directly, nothing to guide (a test keeps them equal)
# --imatrix N: the mean square of every matmul input over N tokens of the session's calibration split
IMATRIX = [("none", 0), ("1,024 calibration tokens", 1024), ("4,096 calibration tokens (measured best here)", 4096),
           ("16,384 calibration tokens", 16384)]
REPO = Path(__file__).resolve().parents[2]


def target_path(session: session_mod.Session, quant: str, pad_uniform: bool, imatrix: int = 0) -> Path:
    """Where the file goes: the session's own export name (the CLI's default), passed as --out."""
    return session.export_path(quant, pad_uniform, imatrix).resolve()


def export_command(session: session_mod.Session, fmt: str, quant: str, pad_uniform: bool, out: Path,
                   imatrix: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "minigpt_tui.cli", "export", str(session.path.resolve()), "--format", fmt,
           "--quant", quant, "--out", str(out), "--progress"]
    return cmd + (["--pad-uniform"] if pad_uniform else []) + (["--imatrix", str(imatrix)] if imatrix else [])


class ExportScreen(ModalScreen[None]):
    """The export dialog over a finished session."""

    BINDINGS = [
        Binding("ctrl+s", "start", "Export", id="export.start", priority=True),
        Binding("escape", "close", "Close / stop", id="export.close"),
    ]

    app: "MinigptApp"

    def __init__(self, session: session_mod.Session) -> None:
        super().__init__()
        self.session = session
        self.running = False
        self.result: ExportFinished | None = None
        self.lines: list[str] = []  # the export's log lines, in order (tests read them)
        self.blocks: list[tuple[int, int]] = []  # every (done, total) progress step shown
        self._proc: subprocess.Popen | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="export-dialog"):
            yield Label(f"Export {self.session.id}", id="export-title")
            with Horizontal(classes="field-row"):
                yield Label("format", classes="field-label")
                yield Select(FORMATS, value="gguf", allow_blank=False, id="x-format", compact=True)
            with Horizontal(classes="field-row"):
                yield Label("quantisation", classes="field-label")
                yield Select([(f"{q}  ({QUANT_HINTS[q]})" if q in QUANT_HINTS else q, q) for q in QUANTS],
                             value="f16", allow_blank=False, id="x-quant", compact=True)
            with Horizontal(classes="field-row"):
                yield Label("importance", classes="field-label")
                yield Select(IMATRIX, value=0, allow_blank=False, id="x-imatrix", compact=True)
            with Horizontal(classes="field-row"):
                yield Label("", classes="field-label")
                yield Tick("pad every layer to the widest (plain llama file)", False, id="x-pad", compact=True)
            yield Static("", id="export-target", markup=False)
            yield ProgressBar(total=None, show_eta=False, id="export-progress")
            yield Static("", id="export-status", markup=False)
            with Horizontal(id="export-buttons"):
                yield Button("Export (ctrl+s)", variant="primary", id="x-start", compact=True)
                yield Button("Close (esc)", id="x-close", compact=True)

    def on_mount(self) -> None:
        self.query_one("#export-progress").display = False
        self._update_target()
        self.query_one("#x-quant", Select).focus()

    def choice(self) -> tuple[str, str, bool, int]:
        """(format, quantisation, pad, importance-matrix tokens); no matrix for f32/f16."""
        fmt = self.query_one("#x-format", Select).value
        quant = str(self.query_one("#x-quant", Select).value)
        imatrix = 0 if quant in DIRECT else int(self.query_one("#x-imatrix", Select).value)
        return str(fmt), quant, bool(self.query_one("#x-pad", Tick).value), imatrix

    @on(Select.Changed)
    @on(Tick.Changed)
    def _update_target(self) -> None:
        _fmt, quant, pad, imatrix = self.choice()
        if not self.running:  # the matrix only guides llama.cpp's quantizer: f32/f16 have none
            self.query_one("#x-imatrix", Select).disabled = quant in DIRECT
        self.query_one("#export-target", Static).update(f"to {target_path(self.session, quant, pad, imatrix)}")

    @on(Button.Pressed, "#x-start")
    def _start_pressed(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#x-close")
    def _close_pressed(self) -> None:
        self.action_close()

    # ---- running ---------------------------------------------------------------------
    def action_start(self) -> None:
        if self.running:
            return
        fmt, quant, pad, imatrix = self.choice()
        out = target_path(self.session, quant, pad, imatrix)
        self.running, self.result, self.lines, self.blocks = True, None, [], []
        for w in self.query("Select, Tick, #x-start"):
            w.disabled = True
        bar = self.query_one("#export-progress", ProgressBar)
        bar.update(total=None, progress=0)
        bar.display = True
        how = (" (padded uniform)" if pad else "") + (f", importance matrix from {imatrix:,} tokens" if imatrix else "")
        self._status(f"exporting as {fmt} {quant}{how}: loading the model…")
        self._run(export_command(self.session, fmt, quant, pad, out, imatrix), out)

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def _run(self, cmd: list[str], out: Path) -> None:
        worker = get_current_worker()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env, cwd=str(REPO))
        except OSError as e:
            self.post_message(ExportFinished(None, error=f"cannot start the export: {e.strerror or e}"))
            return
        self._proc = proc
        errors: list[str] = []
        assert proc.stderr is not None and proc.stdout is not None
        for raw in proc.stderr:  # progress and log lines; the error, if any, is the last one
            line = raw.rstrip("\n")
            if worker.is_cancelled:
                break
            done_total = _blocks(line)
            if done_total:
                self.post_message(ExportProgress(*done_total))
            elif line.startswith("error: "):
                errors.append(line[len("error: "):])
            elif line.strip():
                self.post_message(ExportProgress(line=line.strip()))
        stdout = proc.stdout.read()
        rc = proc.wait()
        if rc == 0 and out.is_file():
            wrote = next((ln for ln in stdout.splitlines() if ln.startswith("wrote ")), "")
            self.post_message(ExportFinished(str(out), out.stat().st_size, summary=wrote.split(": ", 1)[-1]))
        elif rc < 0:
            self.post_message(ExportFinished(None, error="export stopped; no file was left behind"))
        else:
            self.post_message(ExportFinished(None, error=errors[-1] if errors else f"export failed (exit {rc})"))

    def on_export_progress(self, msg: ExportProgress) -> None:
        if msg.total:
            self.blocks.append((msg.done, msg.total))
            self.query_one("#export-progress", ProgressBar).update(total=msg.total, progress=msg.done)
            self._status(f"writing blocks {msg.done}/{msg.total}")
        elif msg.line:
            self.lines.append(msg.line)
            self._status(msg.line)

    def on_export_finished(self, msg: ExportFinished) -> None:
        self.running, self.result, self._proc = False, msg, None
        for w in self.query("Select, Tick, #x-start"):
            w.disabled = False
        self._update_target()  # the importance select stays off for f32/f16
        bar = self.query_one("#export-progress", ProgressBar)
        status = self.query_one("#export-status", Static)
        if msg.error:
            bar.display = False
            status.set_class(True, "-error")
            self._status(msg.error)
            self.notify(msg.error, title="Export failed", severity="error", timeout=10)
            return
        bar.update(total=1, progress=1)
        status.set_class(False, "-error")
        size = f"{fmt_bytes(msg.bytes)} ({msg.bytes:,} bytes)"
        self._status(f"wrote {msg.path}\n{size}" + (f" · {msg.summary}" if msg.summary else ""))
        self.notify(f"{msg.path} · {fmt_bytes(msg.bytes)}", title="Exported", timeout=10)

    def on_unmount(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def _status(self, text: str) -> None:
        self.query_one("#export-status", Static).update(text)

    def action_close(self) -> None:
        proc = self._proc
        if self.running and proc is not None and proc.poll() is None:
            proc.terminate()  # the worker reports "stopped"; the atomic write leaves no partial file
            self._status("stopping the export…")
            return
        self.dismiss(None)


def _blocks(line: str) -> tuple[int, int] | None:
    """`  blocks 3/30` (the CLI's --progress line) -> (3, 30)."""
    text = line.strip()
    if not text.startswith("blocks "):
        return None
    done, _, total = text[len("blocks "):].partition("/")
    try:
        return int(done), int(total)
    except ValueError:
        return None
