"""The prune stage beyond MLP neurons: heads, hidden channels, blocks, and the parameter-budget
search that picks a mix of them (Minitron's recipe, on one machine, per domain).

Stage layer: it loads what the algorithms need (the structure statistics, cached like the
calibration; the corpus re-tokenized after a vocabulary cut), calls `engine.prune.*` with
explicit arguments, and reports through the run's `Reporter`. `apply_mix` is the one way a
set of `[prune]` keys becomes a pruned model; the search runs it on copies.
"""

from __future__ import annotations

import copy
import dataclasses
import time

from engine import atomic
from engine.errors import MinigptError


def other_axes(p) -> bool:
    return p.head_ratio > 0 or p.hidden_ratio > 0 or p.depth > 0


# ---- statistics --------------------------------------------------------------------------------
def structure_stats(ctx, model, blocks, folder) -> dict:
    """Heads, hidden-channel and block statistics of the unpruned model on the calibration
    blocks; kept in `folder` of the shared calibration cache, next to the MLP statistics."""
    import torch

    from engine.prune import structure

    bs = ctx.cfg.calibrate.batch_size
    path = folder / "structure.pt"
    if ctx.dist.bcast(path.is_file()):  # rank 0 decides (another node may not share the cache)
        ctx.rep.log(f"structure statistics from the cache ({folder})")
        return ctx.dist.bcast(torch.load(path, weights_only=True) if ctx.dist.main else None)
    t0 = time.perf_counter()
    stats = structure.collect(model, blocks, bs,
                              progress=lambda d, n, r: ctx.rep.progress("prune", d, n, "tokens", r, phase="structure"),
                              dist=ctx.dist)
    atomic.write_with(path, lambda tmp: torch.save(stats, tmp))
    ctx.rep.log(f"structure statistics: {blocks.numel():,} tokens in {time.perf_counter() - t0:.1f} s")
    return stats


# ---- one mix -------------------------------------------------------------------------------------
def apply_axes(model, p, struct, calib=None, batch_size: int = 4, progress=None) -> dict:
    """Heads, then blocks, then hidden channels, in place; every choice is made on the unpruned
    model's statistics (layer indices are the original ones until blocks are dropped)."""
    from engine.prune import depth, heads, hidden

    info: dict = {}
    if p.head_ratio > 0:
        plan = heads.select(model, heads.scores(model, struct, p.head_criterion), p.head_ratio, p.head_mode)
        # o_proj is refit by least squares unless compensation is off (Llama's o_proj has no bias)
        heads.apply(model, plan, struct, compensation="none" if p.compensation == "none" else "lstsq",
                    damping=p.damping)
        info["heads"] = plan
    if p.depth > 0:
        if p.depth_criterion == "loss":
            if calib is None:
                raise MinigptError("prune.depth_criterion = \"loss\" needs calibration tokens",
                                   "run the calibrate stage on a corpus with at least one block")
            b = calib() if callable(calib) else calib
            n = max(1, -(-p.sensitivity_tokens // b.shape[1]))
            scores = depth.loss_rise(model, b[:n], batch_size, progress=progress and (
                lambda d, t, *r: progress("depth", d, t)))
        else:
            scores = depth.influence(struct)
        drop = depth.select(scores, p.depth)
        depth.apply(model, drop)
        info["dropped"] = list(drop)
    if p.hidden_ratio > 0:
        keep = hidden.select(hidden.scores(model, struct), p.hidden_ratio, hidden.round_to(model))
        hidden.apply(model, keep)
        info["hidden"] = int(len(keep))
    return info


def chosen_config(p, mix):
    """The `[prune]` section that applies `mix`. Without the vocabulary among the search axes,
    the config's own vocabulary setting stands."""
    keys = mix.prune_keys()
    if "vocab" not in p.search_axes:
        keys.pop("embedding_threshold")
    return dataclasses.replace(p, **keys)


# ---- the search ------------------------------------------------------------------------------------
def search(ctx, model, stats, struct, calib, retokenize, vocab_cut, sensitivities=None):
    """Candidates within the budget, each pruned on a copy, distilled for `search_steps` and
    measured in held-out bits per byte; returns the best `budget.Mix`. Writes the table.
    `calib()`: the calibration blocks; `retokenize(tokenizer)`: the fine-tune split's ids under
    a pruned tokenizer; `vocab_cut(ε_emb)`: (plan, counts) of the vocabulary cut the prune stage
    makes (`stages.vocab_plan`: the keep rule's, `vocab_rows` included), priced and tried as is."""
    from engine.models import adapters, size
    from engine.prune import budget

    p = ctx.cfg.prune
    rows_cut = 0
    if "vocab" in p.search_axes and stats.token_counts is not None:
        rows_cut = int(vocab_cut(0.0)[0].keep.numel())
    costs = budget.costs(model, adapters.for_model(model), rows_cut)
    if "vocab" not in p.search_axes and p.embedding_threshold >= 0 and stats.token_counts is not None:
        costs.vocab_rows = int(vocab_cut(p.embedding_threshold)[0].keep.numel())
    total = size.count_params(model)
    target = budget.target_count(total, p.target_params)
    context = ctx.cfg.evaluate.block_size  # the speed floor is estimated for a prefill of this length
    cands = budget.choose(costs, target, p.search_tolerance, list(p.search_axes), p.search_candidates,
                          p.search_speedup, context)
    floor = f", estimated ≥ {p.search_speedup:g}x faster" if p.search_speedup else ""
    ctx.rep.log(f"budget {target:,} of {total:,} parameters ({target / total:.1%}): {len(cands)} candidate mixes "
                f"within ±{p.search_tolerance:.0%}{floor}"
                + (f", each distilled {p.search_steps} steps" if len(cands) > 1 else ""))
    for i, (mix, n) in enumerate(cands, 1):
        ctx.rep.log(f"  candidate {i}: {mix.label()} → {n:,} parameters, "
                    f"{budget.speedup(costs, mix, context):.2f}x fewer MACs per token")
    if len(cands) == 1:
        trials = [budget.Trial(cands[0][0], cands[0][1])]
    else:
        trial = _trial(ctx, model, stats, struct, calib, retokenize, vocab_cut, sensitivities)
        trials = budget.search(cands, trial,
                               progress=lambda d, n, r: ctx.rep.progress("prune", d, n, "items", r, phase="search"),
                               stop=ctx.rep.check_stop)
    for t in trials:
        t.speedup = budget.speedup(costs, t.mix, context)
    win = budget.best(trials)
    rows = [t.row() for t in trials]
    ctx.rep.section("search", {"target_params": target, "total_params": total, "tolerance": p.search_tolerance,
                               "min_speedup": p.search_speedup, "speedup_context": context,
                               "axes": list(p.search_axes), "steps": p.search_steps, "vocab_rows_cut": rows_cut,
                               "candidates": rows, "chosen": win.row()})
    _write_csv(ctx.session.path / "search.csv", rows)
    if len(trials) > 1:
        ctx.rep.log("search: " + "; ".join(f"{t.mix.label()}: {t.bpb:.4f} bpb" for t in trials))
    ctx.rep.log(f"chosen mix: {win.mix.label()}")
    return win.mix


def _write_csv(path, rows: list[dict]) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic.write_text(path, buf.getvalue())


def _trial(ctx, model, stats, struct, calib, retokenize, vocab_cut, sensitivities):
    """The candidate's score: prune a copy, distil it from the unpruned model for
    `search_steps` steps on the fine-tune split, then held-out bits per byte."""
    from engine.data.domain import blocks as to_blocks
    from engine.evaluate import perplexity
    from engine.models import size
    from engine.prune import mlp as prune_mlp
    from engine.prune import vocab
    from engine.train import finetune

    p, f, e = ctx.cfg.prune, ctx.cfg.finetune, ctx.cfg.evaluate
    d = ctx.domain()
    texts = vocab.held_out_texts(ctx.tokenizer, d.eval_texts, min(e.max_tokens or 4096, 4096))
    fcfg = dataclasses.replace(f, loss="kd", max_steps=max(p.search_steps, 1), max_epochs=0.0, eval_every=0,
                               checkpoint_every=0, lora_rank=0, target_ppl_ratio=0.0, warmup_steps=0,
                               gradient_checkpointing=False)

    def trial(mix):
        student = copy.deepcopy(model)
        pc = chosen_config(p, mix)
        tok, keep_ids = ctx.tokenizer, None
        if pc.embedding_threshold >= 0:
            cut, counts = vocab_cut(pc.embedding_threshold)
            keep_ids = cut.keep
            student, tok, _ = vocab.prune_vocabulary(student, ctx.tokenizer, counts, pc.embedding_threshold,
                                                     the_plan=cut)
        if pc.ratio > 0:
            plan = prune_mlp.select_and_compensate(student, stats, pc, calib,
                                                   ctx.cfg.calibrate.batch_size, ctx.cfg.seed,
                                                   sensitivities=sensitivities)
            prune_mlp.apply_structural(student, plan)
        apply_axes(student, pc, struct, calib, ctx.cfg.calibrate.batch_size)
        params = size.count_params(student)
        if p.search_steps > 0:
            ids = d.finetune if tok is ctx.tokenizer else retokenize(tok)
            block = max(2, min(f.block_size, 512))
            train = to_blocks(ids, block)[: fcfg.batch_size * fcfg.grad_accum * fcfg.max_steps]
            ft = finetune.Finetuner(student, train, fcfg, seed=ctx.cfg.seed, teacher=model, teacher_ids=keep_ids,
                                    dist=ctx.dist)  # DDP under torchrun: a copy is not worth sharding
            for _ in range(fcfg.max_steps):
                ft.train_step()
                ctx.rep.check_stop()
            student = ft.finished_model()
        b = perplexity.bits_per_byte(student, tok, texts, e.block_size, e.stride, e.batch_size, dist=ctx.dist)
        del student
        return params, round(b["bpb"], 6)

    return trial
