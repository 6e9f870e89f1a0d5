"""The run: baseline → teacher → calibrate → prune → finetune → evaluate → control, as resumable stages.

`teacher` (teacher correction) and `control` (the unpruned model after the same recovery)
are optional: a config that leaves one off gets a `stage_skip` whose reason starts with
`record.SKIP_OFF`, and the stage counts as completed (a redo from an earlier stage
reconsiders it).

Each stage's outputs land in the session folder before the stage is marked complete in
`state.json`, so a resumed run skips finished stages and reuses their artefacts (the
calibration statistics, the pruned model). Runs headless; the CLI and the app only
read what it writes.

Under torchrun every rank runs this driver and every stage (SPMD): rank 0 holds the lock
and writes the session (events, state, results, artefacts; the other ranks' writes are
no-ops, `atomic.set_writer`), what to run is rank 0's decision (broadcast), and the ranks
meet at a barrier after each stage, so each reads what rank 0 wrote before going on.
"""

from __future__ import annotations

import contextlib
import os
import time

from engine.distributed import Dist
from engine.errors import MinigptError
from engine.run import record
from engine.run import session as session_mod
from engine.run.reporter import Reporter, StopRequested, clear_stop
from engine.run import control
from engine.run import teacher as teacher_mod
from engine.run.stages import STAGE_FUNCS as _CORE_FUNCS
from engine.run.stages import Context

STAGE_FUNCS = {**_CORE_FUNCS, "teacher": control.stage_teacher, "control": control.stage_control}


# ---- driver ------------------------------------------------------------------------------
def run(session: session_mod.Session, stages: list[str] | None = None, display=None,
        handle_signals: bool = False, redo_from: str | None = None, keep_stop: bool = False) -> dict:
    """Run (or resume) a session's stages under its runner lock. Returns results.

    `keep_stop`: a stop request already in the session is for this run (the detached runner:
    its launcher cleared older ones, and a `minigpt stop` made while it started must hold)."""
    import torch

    cfg = session.config()
    wanted = list(stages or session_mod.STAGES)
    dist = Dist()
    with session.acquire() if dist.main else contextlib.nullcontext():
        if not keep_stop and dist.main:
            clear_stop(session.path)
        writer = session.writer() if dist.main else None
        rep = Reporter(writer, display=display if dist.main else None, stop_dir=session.path,
                       results=session.results(), dist=dist)
        if handle_signals:
            rep.install_signal_handlers()
        state = session.state()
        completed = list(state.get("completed_stages", []))
        if redo_from:
            completed = _forget_from(session, completed, redo_from, rep.results)
        if dist.on:  # rank 0's view of the session decides what runs
            completed, rep.results = dist.bcast((completed, rep.results))
        ctx = Context(cfg, session, rep, dist=dist)
        torch.manual_seed(cfg.seed)
        rep.emit("run_start", pid=os.getpid(), resumed=bool(completed), stages=wanted)
        session.update_state(status="running", pid=os.getpid(), error=None)
        if dist.on:
            rep.log(f"torchrun: {dist.world} processes ({dist.backend}), distributed.strategy = "
                    f"{cfg.distributed.strategy}; rank 0 writes the session")
        dist.barrier()
        stage = None
        try:
            rep.check_stop()  # a stop requested while the runner started: its first safe point
            for stage in wanted:
                if stage in completed:
                    rep.emit("stage_skip", stage=stage, reason=record.SKIP_COMPLETED)
                    continue
                off = control.off_reason(cfg, stage)
                if off:
                    rep.emit("stage_skip", stage=stage, reason=off)
                    completed.append(stage)
                    session.update_state(completed_stages=completed)
                    continue
                _check_order(stage, completed, wanted, cfg)
                session.update_state(stage=stage)
                rep.emit("stage_start", stage=stage)
                t0 = time.perf_counter()
                STAGE_FUNCS[stage](ctx)
                session.write_results(rep.results)
                completed.append(stage)
                session.update_state(completed_stages=completed)
                rep.emit("stage_end", stage=stage, seconds=round(time.perf_counter() - t0, 2))
                dist.barrier()  # what rank 0 wrote is there for every rank's next stage
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
            _fail(session, rep, stage, e.line())
            raise
        except BaseException as e:  # atomic.DiskFull (an OSError) reads as one line of its own
            from engine.distributed import peer_lost

            _fail(session, rep, stage, e.line() if hasattr(e, "line") else
                  peer_lost(e, dist.world) or f"{type(e).__name__}: {e}")
            raise
        finally:
            if writer is not None:
                writer.close()


def _fail(session: session_mod.Session, rep: Reporter, stage: str | None, msg: str) -> None:
    """Record a failure; what was measured before it stays in results.json."""
    rep.emit("error", stage=stage, message=msg)
    try:
        session.write_results(rep.results)
    except OSError:  # a full disk may be why it failed: the event log still holds the figures
        pass
    session.update_state(status="failed", error=msg)
    rep.emit("run_end", status="failed")


# what each stage adds to results.json besides the base model's entry: sections, model labels
_RESULTS_OF = {"teacher": (("teacher",), ("teacher",)), "calibrate": (("calibration",), ()),
               "prune": (("prune", "search", "vocab"), ("pruned",)), "finetune": (("finetune",), ("finetuned",)),
               "evaluate": ((), ()), "control": (("control",), ("control",))}
_BASE_METRICS_OF = {"calibrate": ("calibration_seconds", "calibration_tokens"),
                    "prune": ("params", "vocab_size", "vocab_bpb", "vocab_bpb_protocol")}


def _forget_results(results: dict, stages) -> None:
    """Drop what the stages being redone wrote, so no figure of the old run stays behind."""
    models = results.get("models", {})
    for st in stages:
        sections, labels = _RESULTS_OF.get(st, ((), ()))
        for name in sections:
            results.pop(name, None)
        for label in labels:
            models.pop(label, None)
        for name in _BASE_METRICS_OF.get(st, ()):
            models.get("base", {}).pop(name, None)


def _forget_from(session: session_mod.Session, completed: list[str], stage: str, results: dict) -> list[str]:
    """Redo `stage` and everything after it: later artefacts (and results) depend on it."""
    import shutil

    order = session_mod.STAGES
    if stage not in order:
        raise MinigptError(f"unknown stage {stage!r}", f"stages: {', '.join(order)}")
    cut = order.index(stage)
    kept = [s for s in completed if order.index(s) < cut]
    from engine import atomic

    if not atomic.writer():  # a torchrun rank > 0: rank 0 forgets for everyone
        return kept
    if cut <= order.index("prune"):
        session.update_state(model_is="base")
    if cut <= order.index("finetune") and session.checkpoints_dir.exists():
        shutil.rmtree(session.checkpoints_dir)
    # the control matches the pruned model's recovery, so any redo before it starts it again
    shutil.rmtree(session.path / control.CONTROL_CHECKPOINTS, ignore_errors=True)
    if cut <= order.index("teacher"):
        shutil.rmtree(teacher_mod.checkpoints(session), ignore_errors=True)
        shutil.rmtree(teacher_mod.folder(session), ignore_errors=True)
    _forget_results(results, order[cut:])
    session.write_results(results)
    session.update_state(completed_stages=kept)
    return kept


_NEEDS = {"prune": "calibrate", "finetune": "prune", "evaluate": "prune", "control": "finetune"}


def _check_order(stage: str, completed: list[str], wanted: list[str], cfg=None) -> None:
    need = _NEEDS.get(stage)
    if stage == "calibrate" and cfg is not None and teacher_mod.on(cfg):
        need = "teacher"  # calibration starts from the corrected teacher
    if need and need not in completed and need not in wanted:
        raise MinigptError(f"stage {stage} needs {need} first", f"run: minigpt {need} SESSION")
