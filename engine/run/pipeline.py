"""The run: baseline → calibrate → prune → finetune → evaluate, as resumable stages.

Each stage's outputs land in the session folder before the stage is marked complete in
`state.json`, so a resumed run skips finished stages and reuses their artefacts (the
calibration statistics, the pruned model). Runs headless; the CLI and the app only
read what it writes.
"""

from __future__ import annotations

import os
import time

from engine.errors import MinigptError
from engine.run import session as session_mod
from engine.run.reporter import Reporter, StopRequested, clear_stop
from engine.run.stages import STAGE_FUNCS, Context


# ---- driver ------------------------------------------------------------------------------
def run(session: session_mod.Session, stages: list[str] | None = None, display=None,
        handle_signals: bool = False, redo_from: str | None = None) -> dict:
    """Run (or resume) a session's stages under its runner lock. Returns results."""
    import torch

    cfg = session.config()
    wanted = list(stages or session_mod.STAGES)
    with session.acquire():
        clear_stop(session.path)
        writer = session.writer()
        rep = Reporter(writer, display=display, stop_dir=session.path, results=session.results())
        if handle_signals:
            rep.install_signal_handlers()
        state = session.state()
        completed = list(state.get("completed_stages", []))
        if redo_from:
            completed = _forget_from(session, completed, redo_from)
        ctx = Context(cfg, session, rep)
        torch.manual_seed(cfg.seed)
        rep.emit("run_start", pid=os.getpid(), resumed=bool(completed), stages=wanted)
        session.update_state(status="running", pid=os.getpid(), error=None)
        stage = None
        try:
            for stage in wanted:
                if stage in completed:
                    rep.emit("stage_skip", stage=stage, reason="completed")
                    continue
                _check_order(stage, completed, wanted)
                session.update_state(stage=stage)
                rep.emit("stage_start", stage=stage)
                t0 = time.perf_counter()
                STAGE_FUNCS[stage](ctx)
                session.write_results(rep.results)
                completed.append(stage)
                session.update_state(completed_stages=completed)
                rep.emit("stage_end", stage=stage, seconds=round(time.perf_counter() - t0, 2))
                rep.check_stop()
            status = "done" if all(s in completed for s in session_mod.STAGES) else "stopped"
            session.update_state(status=status, stage=None)
            rep.emit("run_end", status=status)
            return rep.results
        except StopRequested:
            session.write_results(rep.results)
            session.update_state(status="stopped")
            rep.emit("run_end", status="stopped")
            return rep.results
        except MinigptError as e:
            rep.emit("error", stage=stage, message=e.line())
            session.update_state(status="failed", error=e.line())
            rep.emit("run_end", status="failed")
            raise
        except BaseException as e:
            msg = f"{type(e).__name__}: {e}"
            rep.emit("error", stage=stage, message=msg)
            session.update_state(status="failed", error=msg)
            rep.emit("run_end", status="failed")
            raise
        finally:
            writer.close()


def _forget_from(session: session_mod.Session, completed: list[str], stage: str) -> list[str]:
    """Redo `stage` and everything after it: later artefacts depend on it."""
    import shutil

    order = session_mod.STAGES
    if stage not in order:
        raise MinigptError(f"unknown stage {stage!r}", f"stages: {', '.join(order)}")
    cut = order.index(stage)
    kept = [s for s in completed if order.index(s) < cut]
    if cut <= order.index("prune"):
        session.update_state(model_is="base")
    if cut <= order.index("finetune") and session.checkpoints_dir.exists():
        shutil.rmtree(session.checkpoints_dir)
    session.update_state(completed_stages=kept)
    return kept


_NEEDS = {"prune": "calibrate", "finetune": "prune", "evaluate": "prune"}


def _check_order(stage: str, completed: list[str], wanted: list[str]) -> None:
    need = _NEEDS.get(stage)
    if need and need not in completed and need not in wanted:
        raise MinigptError(f"stage {stage} needs {need} first", f"run: minigpt {need} SESSION")
