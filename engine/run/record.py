"""The run record: every event kind and its fields, the stages, statuses and metrics, and
the results schema. The one source of truth for what the engine writes and the readers
(CLI display, TUI reducer, compare table, grid tables) read.

Writers go through `event()` (unknown kinds, missing or unknown fields are a bug and
raise); readers import the names from here. `docs/EVENTS.md` is generated from this
module (`python -m engine.run.record > docs/EVENTS.md`), and a test checks the two agree.
Torch-free: the app imports it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

STAGES = ("baseline", "teacher", "calibrate", "prune", "finetune", "evaluate", "control")
# stages a config can leave off (teacher correction, the control): a run skips them with a
# stage_skip whose reason starts with SKIP_OFF, and they count as completed
OPTIONAL_STAGES = ("teacher", "control")
# the model a figure was measured on: the unpruned model, after pruning, after recovery; the
# corrected teacher (the unpruned model fine-tuned on the domain first: finetune.teacher_steps)
# and the control (the unpruned model, or the corrected teacher, after the same recovery)
MODELS = ("base", "pruned", "finetuned", "teacher", "control")
# state.json's status (`starting`: launched, the runner still importing); readers derive two more:
# `disconnected` (running, but no one holds the lock) and `corrupt` (the session's files are unreadable)
STATUSES = ("new", "starting", "running", "stopped", "failed", "done")
DISCONNECTED = "disconnected"
CORRUPT = "corrupt"
END_STATUSES = ("done", "stopped", "failed")
LIVE_STATUSES = ("starting", "running")
# stage_skip's reason for a stage a previous run completed (resume)
SKIP_COMPLETED = "completed"
# stage_skip's reason for a stage the config leaves off starts with this (then why)
SKIP_OFF = "off"
# the stages that train (the `train`, `eval` and `checkpoint` events' optional `stage`; absent: finetune)
TRAINING_STAGES = ("teacher", "finetune", "control")
UNITS = ("tokens", "steps", "items", "bytes")
LEVELS = ("info", "warning", "error")


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # a JSON type name, for the docs and the check
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class Kind:
    name: str
    doc: str
    fields: tuple[Field, ...]
    # emitted only where it can be (a CUDA device): readers must not wait for it
    only_on: str = ""
    # who appends it: the runner, or a reader (the death record: the runner cannot write it)
    writer: str = "runner"


def _f(name: str, type: str, doc: str, optional: bool = False) -> Field:
    return Field(name, type, doc, optional)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("run_start", "a runner process started (or resumed) the session",
         (_f("pid", "int", "the runner's process id"), _f("resumed", "bool", "some stage was already complete"),
          _f("stages", "list[str]", "the stages this run will go through, in order"))),
    Kind("stage_start", "a stage began", (_f("stage", "str", "one of STAGES"),)),
    Kind("stage_skip", "a stage was not run",
         (_f("stage", "str", "one of STAGES"), _f("reason", "str", "`completed` (SKIP_COMPLETED: resume), or why it is off"))),
    Kind("progress", "coalesced progress of the running stage (at most 4 a second per stage, plus the last)",
         (_f("stage", "str", "the stage, or `download` (the corpus)"), _f("done", "number", "units done"),
          _f("total", "number", "units in all"), _f("unit", "str", "one of UNITS"),
          _f("rate", "number", "units per second"), _f("eta_s", "number|null", "seconds left at this rate"),
          _f("phase", "str", "what part of the stage (prune: `sensitivity`, `sequential`)", optional=True))),
    Kind("metric", "one measured number; the same value is in results.json under models[model][name]",
         (_f("stage", "str", "the stage that measured it"), _f("model", "str", "one of MODELS"),
          _f("name", "str", "one of METRICS"), _f("value", "number", "in the metric's unit"),
          _f("protocol", "dict", "how it was measured (tokens, block size, vocabulary ...)", optional=True),
          _f("reused_from", "str", "the session it was copied from (grids share baselines)", optional=True))),
    Kind("train", "one optimiser step of fine-tuning",
         (_f("step", "int", "steps done"), _f("total_steps", "int", "the step limit"),
          _f("loss", "number", "mean over the step's micro-batches and ranks"),
          _f("lr", "number", "the learning rate the step used"), _f("grad_norm", "number", "before clipping"),
          _f("tokens_per_s", "number", "this process's training steps only"),
          _f("eta_s", "number", "seconds left, held-out evaluations included"),
          _f("epoch", "number", "epochs of the fine-tune split done"),
          _f("kl", "number", "loss = kd: the distillation term, KL(teacher || student) x T^2, mean over tokens",
             optional=True),
          _f("ce", "number", "loss = kd: the cross-entropy term (before kd_ce_weight), mean over tokens",
             optional=True),
          _f("stage", "str", "one of TRAINING_STAGES; absent: finetune", optional=True))),
    Kind("eval", "held-out perplexity during fine-tuning; step 0 is the model before it (pruned, for finetune)",
         (_f("step", "int", "steps done"), _f("ppl", "number", "held-out perplexity"),
          _f("target_ppl", "number|null", "fine-tuning stops once ppl <= target_ppl (null: no target)"),
          _f("stage", "str", "one of TRAINING_STAGES; absent: finetune", optional=True))),
    Kind("layer_report", "the per-layer pruning report",
         (_f("mode", "str", "`structural` or `mask`"),
          _f("rows", "list[dict]", "per MLP: layer, module, neurons_before/after, params_before/after, pct_removed"),
          _f("totals", "dict", "params_before/after (stored; mask mode: nonzero), pct_removed, "
                               "neurons_before/after; mask mode also nonzero_params_after and stored_params"))),
    Kind("checkpoint", "a complete checkpoint was written (periodic, on a graceful stop, at the end)",
         (_f("step", "int", "the step it holds"), _f("path", "str", "its folder"),
          _f("stage", "str", "one of TRAINING_STAGES; absent: finetune", optional=True))),
    Kind("stage_end", "the stage completed", (_f("stage", "str", "one of STAGES"),
                                              _f("seconds", "number", "wall time of the stage"))),
    Kind("log", "a human-readable line", (_f("level", "str", "one of LEVELS"), _f("message", "str", "the line"))),
    Kind("error", "the run failed with this one-line message",
         (_f("stage", "str|null", "the stage that failed"), _f("message", "str", "problem — fix"))),
    Kind("run_end", "the runner exits", (_f("status", "str", "one of END_STATUSES"),)),
    Kind("gpu", "a GPU memory sample of one process (torch.cuda; utilisation with nvidia-ml-py): rank 0's, and "
                "under torchrun every rank's every 10 training steps, written by rank 0",
         (_f("device", "int", "CUDA device index"), _f("rank", "int", "torch.distributed rank (0 alone)"),
          _f("mem_used_mb", "number", "memory reserved by torch"),
          _f("mem_peak_mb", "number", "peak memory allocated by torch in this process"),
          _f("mem_total_mb", "number", "the device's memory"),
          _f("util_pct", "number|null", "utilisation, null without nvidia-ml-py")), only_on="cuda"),
    Kind("runner_died", "the runner died without ending its run (kill -9, the OOM killer, a crash); appended "
                        "once by the first reader that finds the session disconnected (engine/run/death.py)",
         (_f("pid", "int|null", "the dead runner's process id"),
          _f("stage", "str|null", "the stage it was in"),
          _f("step", "int|null", "the last fine-tuning step it reported (finetune only)"),
          _f("signal", "str|null", "the signal that killed it (e.g. SIGKILL), when the reader launched it and saw "
                                   "its exit status; null when unknown"),
          _f("exit_code", "int|null", "its exit status, when known"),
          _f("message", "str", "e.g. `runner died (SIGKILL) during finetune at step 12`")), writer="reader"),
)}


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    doc: str
    lower_is_better: bool | None = None  # None: neither (a size, a count)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("ppl", "", "held-out perplexity (token level: compare only under one tokenizer)", True),
    Metric("params", "parameters", "parameters: stored (structural), nonzero (mask mode)", True),
    Metric("calibration_seconds", "s", "wall time of the calibration pass", True),
    Metric("calibration_tokens", "tokens", "tokens the calibration saw"),
    Metric("mcq_acc", "fraction", "MCQ accuracy, summed log-likelihood (lm-eval acc)", False),
    Metric("mcq_acc_norm", "fraction", "MCQ accuracy, per-character normalised (lm-eval acc_norm)", False),
    Metric("mcq_acc_bytes", "fraction", "MCQ accuracy, per-byte normalised", False),
    Metric("mcq_acc_paper", "fraction", "MCQ accuracy, lowest perplexity of the whole sequence (the paper)", False),
    Metric("vocab_size", "rows", "embedding rows (structural vocabulary pruning)"),
    Metric("vocab_coverage", "fraction", "share of held-out tokens kept as single tokens", False),
    Metric("bpb", "bits/byte", "held-out bits per UTF-8 byte: compares across vocabularies (the same bytes for "
                               "every model of a run)", True),
    Metric("vocab_bpb", "bits/byte", "held-out bits per byte before and after the vocabulary step alone", True),
    Metric("tokens_per_s", "tokens/s", "fine-tuning throughput of this process", False),
)}
MCQ_METRICS = tuple(n for n in METRICS if n.startswith("mcq_"))

# fields whose value is one of a closed set (the check in `event()`)
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    **{(k, "stage"): STAGES for k in ("stage_start", "stage_skip", "stage_end")},
    ("progress", "unit"): UNITS, ("log", "level"): LEVELS, ("run_end", "status"): END_STATUSES,
    ("layer_report", "mode"): ("structural", "mask"), ("metric", "model"): MODELS,
}
# optional fields with a closed set: checked when present
OPTIONAL_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    (k, "stage"): TRAINING_STAGES for k in ("train", "eval", "checkpoint")}


# ---- results.json ------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    name: str
    doc: str
    keys: tuple[str, ...] = field(default=())


RESULTS: dict[str, Section] = {s.name: s for s in (
    Section("models", "per model (MODELS): every metric by name, `<name>_protocol` where it has one, "
                      "`mcq` (per set: accuracies, stderr, n, protocol) and `mcq_protocol`"),
    Section("calibration", "the calibration pass", ("tokens", "seconds", "block_size", "cached")),
    Section("prune", "the pruning step: the layer report's totals", (
        "mode", "widths", "params_before", "params_after", "pct_removed", "neurons_before", "neurons_after",
        "nonzero_params_after", "stored_params", "heads_before", "heads_after", "kv_before", "kv_after",
        "hidden_before", "hidden_after", "dropped_blocks")),
    Section("search", "the parameter-budget search (prune.target_params): every candidate mix ranked by held-out "
                      "bits per byte after a short distillation, and the chosen one; each with its estimated "
                      "`mac_speedup`, and the speed floor (prune.search_speedup) at `speedup_context` tokens", (
        "target_params", "total_params", "tolerance", "axes", "steps", "vocab_rows_cut", "min_speedup",
        "speedup_context", "candidates", "chosen")),
    Section("vocab", "structural vocabulary pruning", (
        "threshold", "tokenizer_before", "tokenizer_after", "rows_before", "rows_after", "kept_because",
        "params_before", "params_after", "params_saved", "coverage", "bpb_before", "bpb_after",
        "eval_tokens_before", "eval_tokens_after", "bpb_protocol", "rule")),
    Section("finetune", "recovery fine-tuning", (
        "steps", "total_steps", "tokens", "tokens_per_s", "train_seconds", "stopped_because", "final_loss",
        "base_ppl", "target_ppl", "curve", "epochs", "block_size", "batch_size", "grad_accum", "lr", "schedule",
        "lora_rank", "resumed_from_step", "loss", "kd_temperature", "kd_ce_weight", "teacher", "final_kl",
        "final_ce")),
    Section("teacher", "teacher correction (finetune.teacher_steps > 0): the unpruned model fine-tuned on the "
                       "domain by cross-entropy before calibration; saved in teacher/", ("steps", "tokens",
        "tokens_per_s", "train_seconds", "stopped_because", "final_loss", "curve", "epochs", "block_size",
        "batch_size", "grad_accum", "lr", "schedule", "lora_rank", "resumed_from_step", "loss", "path")),
    Section("control", "the control (finetune.control = true): the unpruned model (the corrected teacher, if "
                       "any) recovered with the pruned model's token budget and loss", ("steps", "tokens",
        "tokens_per_s", "train_seconds", "stopped_because", "final_loss", "curve", "epochs", "block_size",
        "batch_size", "grad_accum", "lr", "schedule", "lora_rank", "resumed_from_step", "loss", "kd_temperature",
        "kd_ce_weight", "teacher", "final_kl", "final_ce", "start")),
)}


def event(kind: str, fields: dict) -> dict:
    """Check an event against the record; returns the fields. A mismatch is a bug: it raises."""
    spec = KINDS.get(kind)
    if spec is None:
        raise ValueError(f"unknown event kind {kind!r} (engine/run/record.py lists them)")
    names = {f.name for f in spec.fields}
    missing = [f.name for f in spec.fields if not f.optional and f.name not in fields]
    extra = sorted(set(fields) - names)
    if missing or extra:
        raise ValueError(f"{kind} event: missing {missing}, unknown {extra} (engine/run/record.py)")
    if kind == "metric" and fields["name"] not in METRICS:
        raise ValueError(f"unknown metric {fields['name']!r} (engine/run/record.py METRICS)")
    for (k, name), allowed in CHOICES.items():
        if k == kind and fields.get(name) not in allowed:
            raise ValueError(f"{kind} event: {name} = {fields.get(name)!r} is not one of {allowed}")
    for (k, name), allowed in OPTIONAL_CHOICES.items():
        if k == kind and name in fields and fields[name] not in allowed:
            raise ValueError(f"{kind} event: {name} = {fields[name]!r} is not one of {allowed}")
    return fields


def markdown() -> str:
    """docs/EVENTS.md."""
    out = ["# `events.jsonl` schema", "",
           "Generated from `engine/run/record.py` (`python -m engine.run.record > docs/EVENTS.md`); a test keeps",
           "the two equal. One JSON object per line, appended by the session's runner. Every event has",
           "`t` (unix seconds) and `type`. Readers ignore unknown types and fields and tolerate a torn last",
           "line (no newline yet).", "",
           f"Stages: {', '.join(f'`{s}`' for s in STAGES)}. Models: {', '.join(f'`{m}`' for m in MODELS)}. "
           f"Units: {', '.join(f'`{u}`' for u in UNITS)}. Log levels: {', '.join(f'`{v}`' for v in LEVELS)}. "
           f"`run_end` statuses: {', '.join(f'`{v}`' for v in END_STATUSES)}.", "",
           "| type | fields | meaning |", "|---|---|---|"]
    for k in KINDS.values():
        fields = ", ".join(f"`{f.name}`{' (optional)' if f.optional else ''}" for f in k.fields)
        only = (f" (only on {k.only_on})" if k.only_on else "") + (f" (written by a {k.writer})"
                                                                    if k.writer != "runner" else "")
        out.append(f"| `{k.name}` | {fields} | {k.doc}{only} |")
    out += ["", "## Fields", ""]
    for k in KINDS.values():
        out.append(f"- `{k.name}`: " + "; ".join(f"`{f.name}` ({f.type}) {f.doc}" for f in k.fields))
    out += ["", "## Metrics (`metric.name`)", "", "| name | unit | better | meaning |", "|---|---|---|---|"]
    for m in METRICS.values():
        better = {True: "lower", False: "higher", None: ""}[m.lower_is_better]
        out.append(f"| `{m.name}` | {m.unit} | {better} | {m.doc} |")
    out += ["", "## `state.json`", "",
            f"Rewritten atomically: `status` ({', '.join(f'`{s}`' for s in STATUSES)}), `stage`, "
            "`completed_stages`, `pid`, `model_is`, `created`, `updated`, `error`, `reused_from` (a grid cell "
            "seeded from another's baseline). A session whose state says "
            f"`running` while no one holds `runner.lock` reads as `{DISCONNECTED}`; one whose files cannot be read, "
            f"as `{CORRUPT}`.", "",
            "## `results.json`", "", "| section | keys | meaning |", "|---|---|---|"]
    for s in RESULTS.values():
        out.append(f"| `{s.name}` | {', '.join(f'`{k}`' for k in s.keys) or '(by model)'} | {s.doc} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
