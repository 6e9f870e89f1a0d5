"""The run: baseline → calibrate → prune → finetune → evaluate, as resumable stages.

Each stage's outputs land in the session folder before the stage is marked complete in
`state.json`, so a resumed run skips finished stages and reuses their artefacts (the
calibration statistics, the pruned model). Runs headless; the CLI and the app only
read what it writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

from engine.models import size
from engine.run import session as session_mod
from engine.config import RunConfig
from engine.errors import MinigptError
from engine.run.reporter import Reporter, StopRequested, clear_stop

MASKS_FILE = "minigpt_masks.safetensors"


@dataclass
class Context:
    cfg: RunConfig
    session: session_mod.Session
    rep: Reporter
    model: object = None
    tokenizer: object = None
    device: object = None
    data: object = None
    model_is: str = ""  # "base" | "pruned" | "finetuned"
    masks: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    # ---- lazy resources --------------------------------------------------------------
    def base_model(self):
        if self.model_is != "base":
            from engine.models import load as models

            self.rep.log(f"loading model {self.cfg.model.source}")
            self.model, self.tokenizer, self.device = models.load(self.cfg.model, progress=self.rep.log)
            self.model_is = "base"
        return self.model

    def current_model(self):
        """The pruned/fine-tuned model saved by the last completed stage (base if none)."""
        state = self.session.state()
        saved = state.get("model_is")
        if saved and saved != "base" and self.model_is != saved:
            from engine.models import export
            from engine.models import load as models

            device = models.resolve_device(self.cfg.model.device)
            dtype = models.resolve_dtype(self.cfg.model.dtype, device)
            self.model = export.load_model(self.session.model_dir, dtype=dtype, device=device)
            if self.tokenizer is None:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(self.session.model_dir)
            self.device, self.model_is = device, saved
            self.masks = load_masks(self.session.model_dir)
        elif not saved or saved == "base":
            self.base_model()
        return self.model

    def domain(self):
        if self.data is None:
            from engine.data import domain as data_mod

            if self.tokenizer is None:
                self.base_model()
            self.rep.log(f"loading corpus {self.cfg.data.source}")
            cal = self.calib_block_size() * (self.cfg.calibrate.max_tokens // self.calib_block_size() or 1)
            self.data = data_mod.DomainData.build(self.cfg.data, self.tokenizer, max_calib=cal,
                                                  max_eval=self.cfg.evaluate.max_tokens,
                                                  progress=self.rep.progress_fn("download", "bytes"))
            d = self.data
            self.rep.log(f"corpus split: calibrate {d.calibrate.numel()} tokens, finetune {d.finetune.numel()}, "
                         f"held-out {d.evaluate.numel()}")
            if d.evaluate.numel() < 2:
                raise MinigptError("the held-out split has no tokens", "raise data.evaluate_fraction or add documents")
        return self.data

    def calib_block_size(self) -> int:
        from engine.data.domain import model_context

        cap = model_context(self.model) if self.model is not None else self.cfg.calibrate.block_size
        return max(1, min(self.cfg.calibrate.block_size, cap))

    def save_results(self) -> None:
        self.session.write_results(self.results)


# ---- stages -------------------------------------------------------------------------
def stage_baseline(ctx: Context) -> None:
    if not ctx.cfg.evaluate.evaluate_base:
        return
    model = ctx.base_model()
    _evaluate(ctx, model, "baseline", "base")


def stage_calibrate(ctx: Context) -> None:
    import torch

    from engine.prune import calibrate as cal_mod
    from engine.prune import compensate
    from engine.data.domain import blocks

    model = ctx.base_model()
    d = ctx.domain()
    bs = ctx.calib_block_size()
    calib = blocks(d.calibrate, bs)
    if calib.shape[0] == 0:
        raise MinigptError(f"calibration split has {d.calibrate.numel()} tokens, fewer than one block of {bs}",
                           "use a larger corpus, raise data.calibrate_fraction, or lower calibrate.block_size")
    partial = ctx.session.stats_dir / "partial.pt"
    every = ctx.cfg.calibrate.checkpoint_every
    # a partial pass is reused only for the very same blocks, model and statistics wanted
    setup = {k: v for k, v in dataclasses.asdict(ctx.cfg.calibrate).items() if k != "checkpoint_every"}
    key = json.dumps({"blocks": int(calib.shape[0]), "block_size": bs, "calibrate": setup,
                      "prune": dataclasses.asdict(ctx.cfg.prune), "model": ctx.cfg.model.source,
                      "data": dataclasses.asdict(ctx.cfg.data)}, sort_keys=True, default=list)
    start, resume, before = 0, None, 0.0
    if partial.exists():
        try:
            saved = torch.load(partial, weights_only=True)
        except Exception:  # unreadable: never happens with atomic writes, unless edited by hand
            saved = {}
        if saved.get("key") == key:
            start, resume, before = int(saved["batch"]), saved["state"], float(saved.get("seconds", 0.0))
            ctx.rep.log(f"resuming calibration at batch {start}")
        else:
            ctx.rep.log("discarding partial calibration statistics from another setup", level="warning")
    t0 = time.perf_counter()

    def on_batch(done_batches, state):
        if ctx.rep.stop_requested():
            _save_partial(partial, done_batches, state, key, before + time.perf_counter() - t0)
            raise StopRequested()
        if every and done_batches % every == 0:
            _save_partial(partial, done_batches, state, key, before + time.perf_counter() - t0)

    stats = cal_mod.calibrate(model, calib, ctx.cfg.calibrate.batch_size,
                              progress=ctx.rep.progress_fn("calibrate", "tokens"),
                              start_batch=start, resume_state=resume, on_batch=on_batch,
                              gram=compensate.needs_gram(ctx.cfg.prune))
    vocab = max(model.get_input_embeddings().weight.shape[0], len(ctx.tokenizer))
    train_ids = torch.cat([d.calibrate, d.finetune])
    stats.t["token_counts"] = cal_mod.token_counts(train_ids, vocab)
    secs = before + time.perf_counter() - t0
    stats.meta = {"block_size": bs, "blocks": int(calib.shape[0]), "seconds": round(secs, 2),
                  "model": ctx.cfg.model.source, "corpus": ctx.cfg.data.source}
    stats.save(ctx.session.stats_dir)
    if partial.exists():
        partial.unlink()
    ctx.rep.metric("calibrate", "base", "calibration_seconds", round(secs, 2))
    ctx.rep.metric("calibrate", "base", "calibration_tokens", stats.n_tokens)
    ctx.results["calibration"] = {"tokens": stats.n_tokens, "seconds": round(secs, 2), "block_size": bs}


def _save_partial(path, batch, state, key, seconds) -> None:
    import io

    import torch

    from engine import atomic

    buf = io.BytesIO()
    torch.save({"batch": batch, "state": state, "key": key, "seconds": seconds}, buf)
    atomic.write_bytes(path, buf.getvalue())


def stage_prune(ctx: Context) -> None:
    from engine.models import adapters
    from engine.models import export
    from engine.prune import mlp as prune
    from engine.prune.calibrate import Stats

    p = ctx.cfg.prune
    model = ctx.base_model()
    stats = Stats.load(ctx.session.stats_dir)
    widths_before = adapters.for_model(model).widths()
    # mask mode counts nonzero parameters before and after: a base model may hold exact zeros
    # already (a dequantised GGUF: 325k in SmolLM2), which no pruning removed
    nonzero = p.mode == "mask"
    mlp_params_before = prune.mlp_param_counts(model, nonzero=nonzero)
    params_before = size.count_nonzero(model) if nonzero else size.count_params(model)
    plan = prune.select_and_compensate(  # sensitivity/sequential need the calibration tokens
        model, stats, p, lambda: _calib_blocks(ctx), ctx.cfg.calibrate.batch_size, ctx.cfg.seed,
        progress=lambda what, d, n: ctx.rep.progress("prune", d, n, "items", phase=what))
    masks = {}
    if p.mode == "structural":
        if p.embedding_threshold >= 0:
            from engine.prune import vocab

            model, ctx.tokenizer, vinfo = vocab.prune_vocabulary(model, ctx.tokenizer, stats.token_counts,
                                                                 p.embedding_threshold, ctx)
            ctx.results["vocab"] = vinfo
        prune.apply_structural(model, plan)
    else:
        masks = prune.mlp_masks(model, plan)
        if p.linear_threshold >= 0:
            masks = prune.merge_masks(masks, prune.linear_masks(model, stats, p.linear_threshold))
        if p.embedding_threshold >= 0:
            masks = prune.merge_masks(masks, prune.embedding_masks(model, ctx.tokenizer, stats.token_counts,
                                                                   p.embedding_threshold))
        prune.apply_masks(model, masks)
    report = prune.layer_report(model, widths_before, params_before, p.mode, mlp_params_before)
    ctx.rep.emit("layer_report", **report)
    t = report["totals"]
    ctx.rep.log(f"pruned {t['neurons_before'] - t['neurons_after']} of {t['neurons_before']} MLP neurons; "
                f"params {t['params_before']:,} → {t['params_after']:,} (-{t['pct_removed']}%)")
    ctx.rep.metric("prune", "base", "params", t["params_before"])
    ctx.rep.metric("prune", "pruned", "params", t["params_after"])
    ctx.results["prune"] = {"mode": p.mode, "widths": plan.widths_after, **t}
    export.save_model(model, ctx.tokenizer, ctx.session.model_dir,
                      meta={"stage": "pruned", "mode": p.mode, "base": ctx.cfg.model.source})
    if masks:
        save_masks(masks, ctx.session.model_dir)
    ctx.masks, ctx.model_is = masks, "pruned"
    ctx.session.update_state(model_is="pruned")


def _calib_blocks(ctx: Context):
    from engine.data.domain import blocks

    return blocks(ctx.domain().calibrate, ctx.calib_block_size())


def stage_finetune(ctx: Context) -> None:
    if not ctx.cfg.finetune.enabled:
        ctx.rep.log("fine-tuning is off (finetune.enabled = false)")
        return
    from engine.train import finetune

    finetune.run(ctx)


def stage_evaluate(ctx: Context) -> None:
    model = ctx.current_model()
    label = ctx.session.state().get("model_is", "pruned")
    _evaluate(ctx, model, "evaluate", label)


def _evaluate(ctx: Context, model, stage: str, label: str) -> None:
    from engine.evaluate import perplexity as evaluate

    e = ctx.cfg.evaluate
    d = ctx.domain()
    progress = ctx.rep.progress_fn(stage, "tokens")

    def progress_or_stop(*args):  # evaluation is redone on resume, so stopping mid-way loses nothing
        progress(*args)
        ctx.rep.check_stop()

    res = evaluate.perplexity(model, d.evaluate, e.block_size, e.stride, e.batch_size, progress=progress_or_stop)
    # token-level ppl only compares under the same tokenizer (vocabulary pruning changes it)
    res["protocol"]["vocab_size"] = len(ctx.tokenizer)
    ctx.rep.metric(stage, label, "ppl", round(res["ppl"], 4), protocol=res["protocol"])
    ctx.results.setdefault("models", {}).setdefault(label, {})["ppl"] = res["ppl"]
    ctx.results["models"][label]["ppl_protocol"] = res["protocol"]
    from engine.prune import mlp as prune

    ctx.results["models"][label]["params"] = size.count_params(model)
    if label == "pruned" and ctx.cfg.prune.mode == "mask":
        ctx.results["models"][label]["nonzero_params"] = size.count_nonzero(model)
    mcq = getattr(evaluate, "mcq_metrics", None)
    if mcq and (e.mcq_files or e.mcq_generate):
        for name, value in mcq(ctx, model, label).items():
            ctx.rep.metric(stage, label, name, value)
            ctx.results["models"][label][name] = value


STAGE_FUNCS = {"baseline": stage_baseline, "calibrate": stage_calibrate, "prune": stage_prune,
               "finetune": stage_finetune, "evaluate": stage_evaluate}


# ---- masks persistence -----------------------------------------------------------------
def save_masks(masks: dict, folder) -> None:
    import torch
    from safetensors.torch import save_file

    tmp = folder / f".{MASKS_FILE}.tmp"
    save_file({k: v.to("cpu").to(torch.uint8).contiguous() for k, v in masks.items()}, str(tmp))
    os.replace(tmp, folder / MASKS_FILE)


def load_masks(folder) -> dict:
    from safetensors.torch import load_file

    path = folder / MASKS_FILE
    return {k: v.bool() for k, v in load_file(str(path)).items()} if path.exists() else {}


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
        rep = Reporter(writer, display=display, stop_dir=session.path)
        if handle_signals:
            rep.install_signal_handlers()
        state = session.state()
        completed = list(state.get("completed_stages", []))
        if redo_from:
            completed = _forget_from(session, completed, redo_from)
        ctx = Context(cfg, session, rep, results=session.results())
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
                ctx.save_results()
                completed.append(stage)
                session.update_state(completed_stages=completed)
                rep.emit("stage_end", stage=stage, seconds=round(time.perf_counter() - t0, 2))
                rep.check_stop()
            status = "done" if all(s in completed for s in session_mod.STAGES) else "stopped"
            session.update_state(status=status, stage=None)
            rep.emit("run_end", status=status)
            return ctx.results
        except StopRequested:
            ctx.save_results()
            session.update_state(status="stopped")
            rep.emit("run_end", status="stopped")
            return ctx.results
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
