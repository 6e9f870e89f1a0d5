"""The unpruned model a run prunes and distils from: the base model, or the corrected teacher.

Teacher correction (Minitron: when the domain is new, fine-tune the teacher on it first) is
on when `finetune.teacher_steps > 0`: the "teacher" stage (`engine.run.control`) fine-tunes
the base model on the domain by cross-entropy and saves it in `SESSION/teacher/`; once that
stage is complete, calibration, pruning, distillation and the control start from it.

This module only finds and loads that model (it imports no other stage module, so the
stage `Context` can ask it which model is "the unpruned one" without an import cycle).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from engine.errors import MinigptError

FOLDER = "teacher"  # SESSION/teacher/: the corrected teacher, a normal HF folder
CHECKPOINTS = "teacher_checkpoints"  # its own resumable checkpoints


def on(cfg) -> bool:
    return cfg.finetune.teacher_steps > 0


def folder(session) -> Path:
    return session.path / FOLDER


def checkpoints(session) -> Path:
    return session.path / CHECKPOINTS


def ready(cfg, session) -> bool:
    """The corrected teacher is what the run starts from: correction on and its stage complete."""
    return on(cfg) and "teacher" in session.state().get("completed_stages", [])


def unpruned_label(cfg, session) -> str:
    """The Context's `model_is` of the unpruned model the stages use: "teacher" or "base"."""
    return "teacher" if ready(cfg, session) else "base"


def load_unpruned(ctx):
    """(model, tokenizer, name) of the unpruned model, loaded fresh (ctx.model is left alone):
    the corrected teacher once its stage is complete (name "teacher"), else the base model
    from `model.source` (name "base")."""
    from engine.models import load as models

    if not ready(ctx.cfg, ctx.session):
        if on(ctx.cfg):
            raise MinigptError("teacher correction is on (finetune.teacher_steps > 0) but its stage has not run",
                               f"run the whole pipeline: minigpt resume {ctx.session.id}")
        ctx.rep.log(f"loading model {ctx.cfg.model.source}")
        model, tok, _ = models.load(ctx.cfg.model, progress=ctx.rep.log)
        return model, tok, "base"
    return (*load_corrected(ctx.cfg, ctx.session, ctx.rep.log), "teacher")


def load_corrected(cfg, session, log=None):
    """(model, tokenizer) of the corrected teacher saved in SESSION/teacher/."""
    from transformers import AutoTokenizer

    from engine.models import export
    from engine.models import load as models

    path = folder(session)
    if not (path / "config.json").is_file():
        raise MinigptError(f"the corrected teacher is missing from {path}",
                           f"redo the run from calibration after the teacher stage: delete {session.path} "
                           "and start it again, or set finetune.teacher_steps = 0")
    if log:
        log(f"loading the corrected teacher ({path})")
    device = models.resolve_device(cfg.model.device)
    dtype = models.resolve_dtype(cfg.model.dtype, device)
    return export.load_model(path, dtype=dtype, device=device), AutoTokenizer.from_pretrained(path)


def identity(cfg) -> str:
    """A short digest of what the corrected teacher is a function of (base model, data, seed,
    the fine-tuning keys): calibration statistics of one teacher never serve another."""
    from engine.train.finetune import RESUMABLE_KEYS

    f = {k: v for k, v in dataclasses.asdict(cfg.finetune).items() if k not in RESUMABLE_KEYS}
    key = {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data), "seed": cfg.seed,
           "finetune": f}
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:12]


def calibration_config(cfg, session):
    """The run config calibration is keyed by: the model source marks a corrected teacher (the
    shared calibration cache must not hand the base model's statistics to it, nor its to others)."""
    if not ready(cfg, session):
        return cfg
    model = dataclasses.replace(cfg.model, source=f"{cfg.model.source}#teacher-{identity(cfg)}")
    return dataclasses.replace(cfg, model=model)
