"""The stages: baseline → calibrate → prune → finetune → evaluate, over the plain algorithms.

This is the only layer that does I/O for a run: it loads the model and the corpus, calls
the algorithms with explicit arguments (model, tensors, config sections, a progress
callback, a stop check), writes the artefacts into the session folder and reports every
fact once through the `Reporter` (event and results entry together). `minigpt sweep` and
the grid use the same functions (`load_domain`, `calibration`) and so the same
calibration cache, keyed one way (`calibration_key`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import atomic
from engine.config import RunConfig, cache_dir
from engine.distributed import Dist
from engine.errors import MinigptError
from engine.run import session as session_mod
from engine.run.reporter import Reporter, StopRequested


@dataclass
class Context:
    """What the stages of one run share: the config, the session, its reporter, and the
    model and corpus once loaded (lazily, so a resumed run loads only what it needs)."""

    cfg: RunConfig
    session: session_mod.Session
    rep: Reporter
    model: object = None
    tokenizer: object = None
    data: object = None
    model_is: str = ""  # "base" | "teacher" (corrected, engine.run.teacher) | "pruned" | "finetuned"
    masks: dict = field(default_factory=dict)
    vocab_keep: object = None  # a pruned vocabulary's kept ids (new id i = old id keep[i]), saved with the model
    vocab_cut: tuple | None = None  # (ε_emb, stages.vocab_plan's answer): the prune stage's one vocabulary plan
    dist: Dist = field(default_factory=Dist)  # under torchrun: this rank (every rank runs every stage)
    finetune_overlap: dict = field(default_factory=dict)  # the held-out text's overlap with the fine-tune split

    @property
    def results(self) -> dict:
        return self.rep.results

    def base_model(self):
        """The unpruned model: the base model, or the corrected teacher once its stage is done."""
        from engine.run import teacher

        want = teacher.unpruned_label(self.cfg, self.session)
        if self.model_is != want:
            from engine.models import load as models

            if want == "teacher":
                self.model, self.tokenizer = teacher.load_corrected(self.cfg, self.session, log=self.rep.log)
            else:
                self.rep.log(f"loading model {self.cfg.model.source}")
                self.model, self.tokenizer, _ = models.load(self.cfg.model, progress=self.rep.log)
            self.model_is = want
        return self.model

    def current_model(self):
        """The pruned/fine-tuned model saved by the last completed stage (base if none)."""
        saved = self.session.state().get("model_is")
        if saved and saved != "base" and self.model_is != saved:
            from transformers import AutoTokenizer

            from engine.models import export
            from engine.models import load as models

            device = models.resolve_device(self.cfg.model.device)
            dtype = models.resolve_dtype(self.cfg.model.dtype, device)
            self.model = export.load_model(self.session.model_dir, dtype=dtype, device=device)
            if self.tokenizer is None:
                self.tokenizer = AutoTokenizer.from_pretrained(self.session.model_dir)
            self.model_is = saved
            self.masks = export.load_masks(self.session.model_dir)
        elif not saved or saved == "base":
            self.base_model()
        return self.model

    def domain(self):
        if self.data is None:
            if self.tokenizer is None:
                self.base_model()
            self.rep.log(f"loading corpus {self.cfg.data.source}")
            self.data = load_domain(self.cfg, self.cfg.data, self.tokenizer, self.calib_block_size(),
                                    progress=self.rep.progress_fn("download", "bytes"))
            d = self.data
            self.rep.log(f"corpus split: calibrate {d.calibrate.numel()} tokens, finetune {d.finetune.numel()}, "
                         f"held-out {d.evaluate.numel()}")
        return self.data

    def calib_block_size(self) -> int:
        from engine.models.adapters import model_context

        cap = model_context(self.model) if self.model is not None else self.cfg.calibrate.block_size
        return max(1, min(self.cfg.calibrate.block_size, cap))


# ---- shared by the pipeline, the sweep and the grid ---------------------------------------------
def load_domain(cfg: RunConfig, data_cfg, tokenizer, calib_block: int, progress=None):
    """The corpus split and tokenized for a run: calibration capped at whole blocks of
    `calib_block` (at least one), held-out capped at evaluate.max_tokens."""
    from engine.data import domain as data_mod

    cal = calib_block * (cfg.calibrate.max_tokens // calib_block or 1)
    d = data_mod.DomainData.build(data_cfg, tokenizer, max_calib=cal, max_eval=cfg.evaluate.max_tokens,
                                  progress=progress)
    if d.evaluate.numel() < 2:
        raise MinigptError("the held-out split has no tokens", "raise data.evaluate_fraction or add documents")
    return d


def calibration_root() -> Path:
    """The calibration cache: $MINIGPT_CALIBRATION_CACHE, else <minigpt cache>/calibration."""
    env = os.environ.get("MINIGPT_CALIBRATION_CACHE")
    return Path(env) if env else cache_dir() / "calibration"


def calibration_key(cfg: RunConfig, data_cfg, blocks, batch_size: int, world: int = 1) -> str:
    """Statistics depend on the model (source, dtype, device), the corpus and its blocks (by
    content), the batch size and the number of processes (the order floats are summed in);
    nothing else."""
    import numpy as np

    digest = hashlib.sha1(np.ascontiguousarray(blocks.cpu().numpy()).tobytes()).hexdigest()
    key = {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(data_cfg),
           "shape": list(blocks.shape), "blocks": digest, "batch_size": batch_size}
    if world > 1:  # one process keeps the keys it always had
        key["world"] = world
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:20]


def cached_stats(folder: Path, linears: bool, gram: bool):
    """Statistics in the cache folder that hold at least what is wanted, else None."""
    from engine.prune.calibrate import STATS_FILE, Stats

    if not (folder / STATS_FILE).exists():
        return None
    try:
        stats = Stats.load(folder)
    except MinigptError:
        return None
    has = stats.meta.get("holds", {})
    if (gram and not stats.has_gram()) or (linears and not has.get("linears", True)):
        return None
    return stats


def calibration(model, blocks, cfg: RunConfig, data_cfg, linears: bool, gram: bool, progress=None,
                resume: dict | None = None, on_batch=None, log=None, root: Path | None = None, dist=None):
    """Calibration statistics for these blocks: from the cache (`root`, default
    `calibration_root()`) when it holds them, else measured (resumably: `resume`/`on_batch`
    as in `calibrate.calibrate`) and cached. Returns (stats, key, cached?). `dist`: measured
    split over the ranks; rank 0 decides whether the cache serves and sends what it holds."""
    from engine.prune import calibrate as cal_mod

    dist = dist or Dist(solo=True)
    key = calibration_key(cfg, data_cfg, blocks, cfg.calibrate.batch_size, dist.world)
    folder = Path(root or calibration_root()) / key
    stats = cached_stats(folder, linears, gram) if dist.main else None
    if dist.bcast(stats is not None):
        if dist.on:
            stats = dist.bcast(stats)
        if log:
            log(f"calibration statistics reused from the cache ({folder})")
        return stats, key, True
    held = cached_stats(folder, False, False) if dist.main else None  # holds less: measure the union, replace it
    if held is not None:
        linears = linears or held.meta.get("holds", {}).get("linears", True)
        gram = gram or held.has_gram()
    linears, gram = dist.bcast((linears, gram))
    t0 = time.perf_counter()
    r = resume or {}
    stats = cal_mod.calibrate(model, blocks, cfg.calibrate.batch_size, progress=progress, linears=linears,
                              gram=gram, start_batch=r.get("batch", 0), resume_state=r.get("state"),
                              on_batch=on_batch, dist=dist)
    stats.meta = {"block_size": int(blocks.shape[1]), "blocks": int(blocks.shape[0]),
                  "seconds": round(r.get("seconds", 0.0) + time.perf_counter() - t0, 2),
                  "model": cfg.model.source, "corpus": data_cfg.source, "holds": {"linears": linears, "gram": gram}}
    stats.save(folder)
    return stats, key, False


# ---- the stages -----------------------------------------------------------------------------------
def stage_baseline(ctx: Context) -> None:
    if not ctx.cfg.evaluate.evaluate_base:
        return
    _evaluate(ctx, ctx.base_model(), "baseline", "base")


def stage_calibrate(ctx: Context) -> None:
    import torch

    from engine.data.domain import blocks
    from engine.prune import calibrate as cal_mod
    from engine.prune import compensate
    from engine.run import teacher

    model = ctx.base_model()
    d = ctx.domain()
    bs = ctx.calib_block_size()
    calib = blocks(d.calibrate, bs)
    _warn_budget(ctx, bs, calib.numel())
    if calib.shape[0] == 0:
        raise MinigptError(f"calibration split has {d.calibrate.numel()} tokens, fewer than one block of {bs}",
                           "use a larger corpus, raise data.calibrate_fraction, or lower calibrate.block_size")
    gram = compensate.needs_gram(ctx.cfg.prune)
    partial = ctx.session.stats_dir / "partial.pt"
    ccfg = teacher.calibration_config(ctx.cfg, ctx.session)  # a corrected teacher is keyed as its own model
    dist = ctx.dist
    key = calibration_key(ccfg, ctx.cfg.data, calib, ctx.cfg.calibrate.batch_size, dist.world) + f"-gram{int(gram)}"
    resume = _load_partial(partial, key, ctx.rep, dist)
    every = ctx.cfg.calibrate.checkpoint_every
    t0 = time.perf_counter()
    before = resume.get("seconds", 0.0) if resume else 0.0

    def on_batch(done_batches, state):  # every rank, every round: the stop check is a collective
        stop = ctx.rep.stop_requested()
        if stop or (every and done_batches % every == 0):  # each rank's own partial sums, kept per rank
            states = dist.gather(state) if dist.on else state
            _save_partial(partial, done_batches, states, key, before + time.perf_counter() - t0)
        if stop:
            raise StopRequested()

    stats, _, cached = calibration(model, calib, ccfg, ctx.cfg.data, linears=True, gram=gram,
                                   progress=ctx.rep.progress_fn("calibrate", "tokens"), resume=resume,
                                   on_batch=on_batch, log=ctx.rep.log, dist=dist)
    vocab = max(model.get_input_embeddings().weight.shape[0], len(ctx.tokenizer))
    stats.t["token_counts"] = cal_mod.token_counts(torch.cat([d.calibrate, d.finetune]), vocab, dist=dist)
    secs = stats.meta["seconds"]
    stats.save(ctx.session.stats_dir)
    if partial.exists() and dist.main:
        partial.unlink()
    ctx.rep.metric("calibrate", "base", "calibration_seconds", round(secs, 2))
    ctx.rep.metric("calibrate", "base", "calibration_tokens", stats.n_tokens)
    ctx.rep.section("calibration", {"tokens": stats.n_tokens, "seconds": round(secs, 2), "block_size": bs,
                                    "cached": cached})


def _warn_budget(ctx: Context, bs: int, used: int) -> None:
    """Say so (a warning event, shown by the CLI and the app) when calibration cannot use exactly
    what the config asks: blocks capped by the model's context, a budget not a whole number of
    blocks, a split holding less."""
    c = ctx.cfg.calibrate
    if c.block_size > bs:
        ctx.rep.log(f"calibrate.block_size = {c.block_size} exceeds the model's context: calibrating in "
                    f"blocks of {bs} tokens (set calibrate.block_size = {bs} to silence this)", level="warning")
    if used < c.max_tokens:
        why = (f"the calibration split holds {used} tokens in whole blocks of {bs}" if used < c.max_tokens // bs * bs
               else f"{c.max_tokens} is not a whole number of blocks of {bs}")
        ctx.rep.log(f"calibrating on {used} tokens, not calibrate.max_tokens = {c.max_tokens}: {why}",
                    level="warning")


def _load_partial(path: Path, key: str, rep: Reporter, dist: Dist | None = None) -> dict | None:
    """A partial pass is reused only for the very same blocks, model and statistics wanted (and
    number of processes: the key holds it); under torchrun each rank takes its own sums."""
    import torch

    dist = dist or Dist(solo=True)
    if not dist.bcast(path.exists() if dist.main else None):
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # unreadable: never happens with atomic writes, unless edited by hand
        saved = {}
    state = saved.get("state")
    if saved.get("key") != key or (isinstance(state, list) and len(state) != dist.world):
        rep.log("discarding partial calibration statistics from another setup", level="warning")
        return None
    rep.log(f"resuming calibration at batch {int(saved['batch'])}")
    return {"batch": int(saved["batch"]), "state": state[dist.rank] if isinstance(state, list) else state,
            "seconds": float(saved.get("seconds", 0.0))}


def _save_partial(path, batch, state, key, seconds) -> None:
    import torch

    atomic.write_with(path, lambda tmp: torch.save({"batch": batch, "state": state, "key": key,
                                                    "seconds": seconds}, tmp))


def stage_prune(ctx: Context) -> None:
    from engine.models import adapters, export, size
    from engine.prune import mlp as prune
    from engine.prune.calibrate import Stats

    from engine.run import compress

    p = ctx.cfg.prune
    model = ctx.base_model()
    stats = Stats.load(ctx.session.stats_dir)
    struct = None
    if p.target_params > 0 or compress.other_axes(p):
        b = _calib_blocks(ctx)
        from engine.run import teacher

        key = calibration_key(teacher.calibration_config(ctx.cfg, ctx.session), ctx.cfg.data, b,
                              ctx.cfg.calibrate.batch_size)  # a corrected teacher is its own model
        struct = compress.structure_stats(ctx, model, b, calibration_root() / (key + "-structure"))
    sens = None
    if p.target_params > 0:  # a budget: the search picks the per-axis keys
        sens = prune.sensitivities_for(model, stats, dataclasses.replace(p, rule="ratio"), lambda: _calib_blocks(ctx),
                                       ctx.cfg.calibrate.batch_size,
                                       ctx.cfg.seed, progress=lambda what, d, n: ctx.rep.progress(
                                           "prune", d, n, "items", phase=what),
                                       dist=ctx.dist) if "mlp" in p.search_axes else None
        retokenize = lambda tok: load_domain(ctx.cfg, ctx.cfg.data, tok, ctx.calib_block_size()).finetune  # noqa: E731
        vocab_cut = lambda eps: vocab_plan(ctx, model, stats, eps)[:2]  # noqa: E731
        p = compress.chosen_config(p, compress.search(ctx, model, stats, struct, lambda: _calib_blocks(ctx),
                                                      retokenize, vocab_cut, sens))
    widths_before = adapters.for_model(model).widths()
    # mask mode counts nonzero parameters before and after: a base model may hold exact zeros
    # already (a dequantised GGUF: 325k in SmolLM2), which no pruning removed
    nonzero = p.mode == "mask"
    mlp_params_before = prune.mlp_param_counts(model, nonzero=nonzero)
    params_before = size.count_nonzero(model) if nonzero else size.count_params(model)
    plan = prune.select_and_compensate(  # sensitivity/sequential need the calibration tokens
        model, stats, p, lambda: _calib_blocks(ctx), ctx.cfg.calibrate.batch_size, ctx.cfg.seed,
        progress=lambda what, d, n: ctx.rep.progress("prune", d, n, "items", phase=what), sensitivities=sens,
        dist=ctx.dist)
    masks = {}
    if p.mode == "structural":
        if p.embedding_threshold >= 0:
            model = _prune_vocabulary(ctx, model, stats, p.embedding_threshold)
        prune.apply_structural(model, plan)
        if compress.other_axes(p):
            compress.apply_axes(model, p, struct, lambda: _calib_blocks(ctx), ctx.cfg.calibrate.batch_size,
                                progress=lambda what, d, n: ctx.rep.progress("prune", d, n, "items", phase=what))
    else:
        masks = prune.mlp_masks(model, plan)
        if p.linear_threshold >= 0:
            masks = prune.merge_masks(masks, prune.linear_masks(model, stats, p.linear_threshold))
        if p.embedding_threshold >= 0:
            masks = prune.merge_masks(masks, prune.embedding_masks(model, ctx.tokenizer, stats.token_counts,
                                                                   p.embedding_threshold))
        prune.apply_masks(model, masks)
    report = prune.layer_report(model, widths_before, params_before, p.mode, mlp_params_before)
    _same_on_every_rank(ctx, report)
    ctx.rep.emit("layer_report", **report)
    t = report["totals"]
    ctx.rep.log(f"pruned {t['neurons_before'] - t['neurons_after']} of {t['neurons_before']} MLP neurons; "
                f"params {t['params_before']:,} → {t['params_after']:,} (-{t['pct_removed']}%)")
    ctx.rep.metric("prune", "base", "params", t["params_before"])
    ctx.rep.metric("prune", "pruned", "params", t["params_after"])
    ctx.rep.section("prune", {"mode": p.mode, "widths": plan.widths_after, **t})
    export.save_model(model, ctx.tokenizer, ctx.session.model_dir,
                      meta={"stage": "pruned", "mode": p.mode, "base": ctx.cfg.model.source}, masks=masks,
                      vocab_keep=ctx.vocab_keep)
    ctx.masks, ctx.model_is = masks, "pruned"
    ctx.session.update_state(model_is="pruned")


def _same_on_every_rank(ctx: Context, report: dict) -> None:
    """Under torchrun every rank pruned its own copy from the same all-reduced statistics: the
    shapes must agree before DDP/FSDP meet them (a float tie broken differently would not)."""
    if not ctx.dist.on:
        return
    shapes = ctx.dist.gather(json.dumps(report, sort_keys=True, default=str))
    if len(set(shapes)) > 1:
        raise MinigptError("the ranks pruned to different shapes from the same statistics",
                           "this is a bug: report it; meanwhile run the prune stage in one process: "
                           "minigpt prune SESSION, then resume under torchrun")


def vocab_plan(ctx: Context, model, stats, threshold: float):
    """The vocabulary cut this run makes: (plan, the counts it ranks by, the held-out rule's
    record or None), made once per prune stage from the unpruned model, so the budget search
    prices and tries the very cut the stage then applies (it used to price ε_emb's cut whatever
    `vocab_rule` said). "seen": the ε_emb threshold's plan; "heldout": the ranked cut, sized by
    validation documents or to `vocab_rows`."""
    from engine.prune import vocab

    if ctx.vocab_cut is not None and ctx.vocab_cut[0] == threshold:
        return ctx.vocab_cut[1]
    p = ctx.cfg.prune
    counts, chosen, rule = stats.token_counts, None, None
    if p.vocab_rule == "heldout":
        counts, validation = heldout_counts(ctx, model, p.vocab_validation_tokens)
        expected = None
        if p.vocab_prior != 0:  # the unpruned model's expectation over the first calibration blocks
            expected = vocab.expected_counts(model, _calib_blocks(ctx), ctx.cfg.calibrate.batch_size, counts.numel(),
                                             max_tokens=p.vocab_prior_tokens,
                                             progress=lambda d, n, r: ctx.rep.progress("prune", d, n, "tokens", r,
                                                                                       phase="vocabulary prior"),
                                             dist=ctx.dist)
        if p.vocab_rows:  # a row budget: the ranking cut there, no sizing
            chosen = vocab.plan_of_size(ctx.tokenizer, counts, p.vocab_rows, model,
                                        vocab.ranking(ctx.tokenizer, counts, expected, p.vocab_prior))
            rule = {"rows_asked": p.vocab_rows, "prior_weight": p.vocab_prior if expected is not None else 0.0,
                    "candidates": [], "chosen_rows": int(chosen.keep.numel())}
            ctx.rep.log(f"vocabulary rule heldout: the ranking cut to {rule['chosen_rows']:,} rows "
                        f"(prune.vocab_rows = {p.vocab_rows:,})")
        else:
            chosen, rule = vocab.choose_cut(model, ctx.tokenizer, counts, validation, ctx.cfg.evaluate,
                                            p.vocab_tolerance, expected=expected, weight=p.vocab_prior,
                                            progress=lambda d, n, r: ctx.rep.progress("prune", d, n, "items",
                                                                                      phase="vocabulary cut"))
            ctx.rep.log(f"vocabulary rule heldout: {len(rule['candidates'])} cuts tried on "
                        f"{rule['validation_bytes']:,} validation bytes; kept {rule['chosen_rows']:,} rows")
    out = (chosen or vocab.plan(ctx.tokenizer, counts, threshold, model)), counts, rule
    ctx.vocab_cut = (threshold, out)
    return out


def _prune_vocabulary(ctx: Context, model, stats, threshold: float):
    from engine.prune import vocab

    p = ctx.cfg.prune
    chosen, counts, rule = vocab_plan(ctx, model, stats, threshold)
    # the kept ids (the same plan prune_vocabulary makes): distillation maps the student's ids to the teacher's
    ctx.vocab_keep = chosen.keep
    model, ctx.tokenizer, info = vocab.prune_vocabulary(model, ctx.tokenizer, counts, threshold,
                                                        held_out=ctx.domain().eval_texts, eval_cfg=ctx.cfg.evaluate,
                                                        the_plan=chosen)
    info["rule"] = p.vocab_rule
    if rule is not None:
        info["heldout"] = rule
    ctx.data = None  # the splits hold old ids: rebuilt with the new tokenizer on next use
    rep = ctx.rep
    rep.log(f"vocabulary {info['tokenizer_before']:,} → {info['tokenizer_after']:,} tokens "
            f"(embedding rows {info['rows_before']:,} → {info['rows_after']:,}), "
            f"{info['params_saved']:,} parameters removed; held-out coverage {100 * info['coverage']:.1f}%, "
            f"bits/byte {info['bpb_before']:.4f} → {info['bpb_after']:.4f}")
    rep.metric("prune", "base", "vocab_size", info["rows_before"])
    rep.metric("prune", "pruned", "vocab_size", info["rows_after"])
    rep.metric("prune", "pruned", "vocab_coverage", info["coverage"])
    for label, k in (("base", "bpb_before"), ("pruned", "bpb_after")):
        rep.metric("prune", label, "vocab_bpb", round(info[k], 6), protocol=info["bpb_protocol"])
    rep.section("vocab", info)
    return model


def heldout_counts(ctx: Context, model, validation_tokens: int):
    """For the held-out vocabulary rule: token counts over the calibration stream and the finetune
    split's documents but the last ones, which (up to `validation_tokens` tokens) are held back as
    the validation documents the cut is sized on. Both are disjoint from the evaluate split."""
    import torch

    from engine.data import domain as data_mod
    from engine.prune import calibrate as cal_mod
    from engine.prune import vocab as vocab_mod

    d = ctx.domain()
    docs = list(d.finetune_texts or [])
    held, n = [], 0
    while docs and n < validation_tokens:
        t = docs.pop()
        held.insert(0, t)
        n += len(ctx.tokenizer(t, add_special_tokens=False)["input_ids"])
    if not docs and not d.calibrate.numel():
        raise MinigptError("the held-out vocabulary rule leaves no text to count",
                           "lower prune.vocab_validation_tokens or use a larger corpus")
    held = vocab_mod.held_out_texts(ctx.tokenizer, held, validation_tokens)  # a long last document is cut
    ids = torch.cat([d.calibrate, data_mod.tokenize(ctx.tokenizer, docs)])
    rows = max(model.get_input_embeddings().weight.shape[0], len(ctx.tokenizer))
    return cal_mod.token_counts(ids, rows), held


def _calib_blocks(ctx: Context):
    from engine.data.domain import blocks

    return blocks(ctx.domain().calibrate, ctx.calib_block_size())


def stage_finetune(ctx: Context) -> None:
    if not ctx.cfg.finetune.enabled:
        ctx.rep.log("fine-tuning is off (finetune.enabled = false)")
        return
    from engine.run import recovery

    recovery.run(ctx)


def stage_evaluate(ctx: Context) -> None:
    model = ctx.current_model()
    _evaluate(ctx, model, "evaluate", ctx.session.state().get("model_is", "pruned"))


def _evaluate(ctx: Context, model, stage: str, label: str) -> None:
    from engine.evaluate import perplexity

    e = ctx.cfg.evaluate
    d = ctx.domain()
    progress = ctx.rep.progress_fn(stage, "tokens")

    def progress_or_stop(*args):  # evaluation is redone on resume, so stopping mid-way loses nothing
        progress(*args)
        ctx.rep.poll_stop()  # under torchrun: at the stage's end, where every rank checks

    res = perplexity.perplexity(model, d.evaluate, e.block_size, e.stride, e.batch_size, progress=progress_or_stop,
                                dist=ctx.dist)
    # token-level ppl only compares under the same tokenizer (vocabulary pruning changes it)
    res["protocol"]["vocab_size"] = len(ctx.tokenizer)
    ctx.rep.metric(stage, label, "ppl", res["ppl"], protocol=res["protocol"])
    if e.bpb:  # bits per byte compare across vocabularies: the same held-out bytes for every model
        from engine.data.domain import texts_sha256

        texts = _bpb_texts(ctx, d)
        b = perplexity.bits_per_byte(model, ctx.tokenizer, texts, e.block_size, e.stride, e.batch_size,
                                     progress=progress_or_stop, dist=ctx.dist)
        # which bytes, and which corpus: figures from another install compare only where both agree
        texts_hash = texts_sha256(texts)
        b["protocol"].update(texts_sha256=texts_hash, corpus_sha256=d.corpus_sha256,
                             finetune_overlap=_finetune_overlap(ctx, d, texts, texts_hash))
        ctx.rep.metric(stage, label, "bpb", round(b["bpb"], 6), protocol=b["protocol"])
    if e.mcq_files or e.mcq_generate:
        _mcq(ctx, model, stage, label, d)


def _bpb_texts(ctx: Context, d) -> list[str]:
    """The held-out documents bits per byte are measured on: cut where the base model's
    tokenizer reaches evaluate.max_tokens, then kept to that many bytes for every later
    model (a pruned tokenizer would otherwise cut the text elsewhere)."""
    from engine.prune.vocab import held_out_texts

    base = ctx.results.get("models", {}).get("base", {}).get("bpb_protocol") or {}
    if base.get("bytes"):
        return cut_bytes(d.eval_texts, int(base["bytes"]))
    return held_out_texts(ctx.tokenizer, d.eval_texts, ctx.cfg.evaluate.max_tokens)


def _finetune_overlap(ctx: Context, d, texts: list[str], key: str) -> dict:
    """The share of the measured held-out text's 13-word windows found in the fine-tune split
    (engine.data.overlap), once per run and held-out text (`key`: its sha256); logged, with a
    warning when it is high enough that bits per byte after recovery measure recall of the
    fine-tune text."""
    from engine.data import overlap

    if ctx.finetune_overlap.get("key") != key:
        o = overlap.ngram_overlap(texts, list(d.finetune_texts or []))
        ctx.finetune_overlap = {"key": key, "value": o}
        if o["share"] is not None:
            said = (f"{o['share']:.0%} of the held-out text's {o['n']}-word windows also occur in the fine-tune "
                    "split")
            if o["share"] >= overlap.HIGH and ctx.cfg.finetune.enabled:
                ctx.rep.log(said + ": after recovery its bits per byte measure recall of that text as much as the "
                            "domain, and favour CE on it over distillation; the splits are document-disjoint, the "
                            "documents near-copies. Judge recovery on a corpus with little overlap too",
                            level="warning")
            else:
                ctx.rep.log(said)
    return ctx.finetune_overlap["value"]


def cut_bytes(texts: list[str], n_bytes: int) -> list[str]:
    """The documents, in order, up to `n_bytes` UTF-8 bytes in all (the last one cut at a character)."""
    out, left = [], n_bytes
    for t in texts:
        if left <= 0 or not t:
            continue
        raw = t.encode("utf-8")
        out.append(t if len(raw) <= left else raw[:left].decode("utf-8", errors="ignore"))
        left -= len(out[-1].encode("utf-8"))
    return [t for t in out if t]


def _mcq(ctx: Context, model, stage: str, label: str, d) -> None:
    from engine.evaluate import mcq

    e = ctx.cfg.evaluate
    sets = mcq.sets_for(e, d.eval_texts, ctx.cfg.seed, ctx.cfg.data.source, log=ctx.rep.log)

    def progress(done, total, rate):
        ctx.rep.progress(stage, done, total, "items", rate)
        ctx.rep.poll_stop()  # evaluation is redone on resume: stopping mid-way loses nothing

    res = mcq.score_sets(model, ctx.tokenizer, sets, e, ctx.cfg.seed, progress=progress, dist=ctx.dist)
    for name, s in res["sets"].items():
        ctx.rep.log(f"MCQ {name} ({s['n']} items, {label}): "
                    + ", ".join(f"{r} {s[r]:.3f} ± {s['stderr'][r]:.3f}" for r in mcq.RULES))
    entry = ctx.rep.model_entry(label)
    entry["mcq"], entry["mcq_protocol"] = res["sets"], res["protocol"]
    for name, value in res["metrics"].items():
        ctx.rep.metric(stage, label, name, value)


STAGE_FUNCS = {"baseline": stage_baseline, "calibrate": stage_calibrate, "prune": stage_prune,
               "finetune": stage_finetune, "evaluate": stage_evaluate}
