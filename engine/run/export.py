"""`minigpt export SESSION --format gguf`: a session's model as one file other runtimes load.

Finds the session's saved model (`model/`, written by the prune stage and replaced by
fine-tuning), refuses a session without one or one whose run is still writing it, and
writes the GGUF file atomically (`engine.models.gguf.export` goes through
`engine.atomic.write_with`): a failure, a full disk included, leaves no partial file.
Bad input is one `MinigptError` line, raised before any model is loaded.
"""

from __future__ import annotations

import errno
from pathlib import Path

from engine.errors import MinigptError
from engine.run.session import Session

FORMATS = ("gguf",)


def check(session: Session, fmt: str, quant: str, imatrix_tokens: int = 0) -> str:
    """Validate the request (format, quantisation, the session's model) without loading anything."""
    from engine.models import gguf

    if fmt.lower() not in FORMATS:
        raise MinigptError(f"unknown export format {fmt!r}", f"use --format {' / '.join(FORMATS)}")
    quant = gguf.check_quant(quant)
    if imatrix_tokens < 0:
        raise MinigptError(f"--imatrix {imatrix_tokens} is negative", "pass a token count, e.g. --imatrix 4096, or 0")
    if imatrix_tokens and quant in gguf.DIRECT:
        raise MinigptError(f"--imatrix guides quantisation; {quant} is not quantised",
                           "pick a quantised type (e.g. --quant q4_k_m) or drop --imatrix")
    if session.status() in ("running", "starting", "stopping"):
        raise MinigptError(f"session {session.id} is still running; its model may change",
                           f"wait for it to finish, or stop it: minigpt stop {session.id}")
    if not (session.model_dir / "config.json").is_file():
        raise MinigptError(f"session {session.id} has no model yet (no {session.model_dir.name}/ folder)",
                           f"run it through the prune stage first: minigpt resume {session.id}")
    from transformers import AutoConfig

    from engine.models import adapters

    try:
        adapters.check_gguf(AutoConfig.from_pretrained(session.model_dir))
    except (OSError, ValueError) as e:
        raise MinigptError(f"cannot read {session.model_dir / 'config.json'}: {str(e).splitlines()[0][:200]}",
                           f"redo the prune stage: minigpt prune {session.id}") from None
    if quant not in gguf.DIRECT:
        gguf.runtime()
    return quant


def export(session: Session, fmt: str = "gguf", quant: str = "f16", pad_uniform: bool = False,
           out: str | Path | None = None, progress=None, log=None, imatrix_tokens: int = 0):
    """Export the session's model; returns `engine.models.gguf.Result` (path, bytes, types ...).
    `imatrix_tokens` > 0: quantise with an importance matrix measured on that many tokens of
    the session's own calibration split (never its held-out split)."""
    from engine.models import gguf
    from engine.models.export import load_model

    quant = check(session, fmt, quant, imatrix_tokens)
    path = Path(out) if out else session.export_path(quant, pad_uniform, imatrix_tokens)
    if path.is_dir():
        raise MinigptError(f"{path} is a folder", "pass a file name ending in .gguf to --out")
    say = log or (lambda m: None)
    say(f"loading {session.model_dir}")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = load_model(session.model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(session.model_dir)
    except (OSError, ValueError) as e:
        raise MinigptError(f"cannot load the tokenizer of {session.model_dir}: {str(e).splitlines()[0][:200]}",
                           "the model folder needs its tokenizer files") from None
    imatrix = importance(session.config(), model, tok, imatrix_tokens, say) if imatrix_tokens else None
    try:
        return gguf.export(model, tok, path, quant, pad_uniform=pad_uniform, progress=progress, log=log,
                           imatrix=imatrix)
    except OSError as e:
        if hasattr(e, "problem") and hasattr(e, "fix"):  # engine.atomic's own disk-full error, where it has one
            raise MinigptError(e.problem, e.fix) from None
        short_write = e.errno is None and "written" in str(e)  # numpy's tofile: "N requested and M written"
        if short_write or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise MinigptError(f"the disk is full while writing {path} ({e.strerror}); nothing was left behind",
                               "free some space, or write elsewhere with --out") from None
        raise MinigptError(f"cannot write {path}: {e.strerror or e}", "check the folder and its permissions") from None


def importance(cfg, model, tok, n_tokens: int, say=None) -> dict:
    """llama.cpp's importance matrix from `n_tokens` of a run's calibration split (`cfg`'s data,
    tokenized by `tok`: the session's own model, or the base model beside it in a benchmark)."""
    import dataclasses

    from engine.data.domain import blocks
    from engine.models import gguf
    from engine.models.adapters import model_context
    from engine.run import stages

    block = max(1, min(cfg.calibrate.block_size, model_context(model), n_tokens))
    cfg = dataclasses.replace(cfg, calibrate=dataclasses.replace(cfg.calibrate, max_tokens=n_tokens))
    d = stages.load_domain(cfg, cfg.data, tok, block)
    b = blocks(d.calibrate, block)
    if len(b) == 0:
        raise MinigptError(f"the calibration split of {cfg.data.source} has fewer than {block} tokens",
                           "lower --imatrix or add documents")
    if say:
        say(f"importance matrix from {b.numel():,} calibration tokens of {cfg.data.source}")
    return gguf.importance(model, b, cfg.calibrate.batch_size)
