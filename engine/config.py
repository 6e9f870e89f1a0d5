"""Run configuration: typed sections, strict TOML loading, round-trip dumping.

Every key is checked on load, so a typo fails before a 30-minute calibration, with a
message naming the key and the accepted ones.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from engine import presets
from engine.errors import MinigptError

EMBEDDED_DEFAULT = "embedded:smollm2"
# choices checked on load (engine.prune.criteria / engine.prune.compensate hold the implementations)
CRITERIA = ("paper", "rms", "random", "magnitude", "wanda", "fluctuation", "obs")
ALLOCATIONS = ("per_layer", "global", "sensitivity")
COMPENSATIONS = ("none", "bias", "lstsq")
HEAD_MODES = ("uniform", "per_layer")  # the same head count in every layer (loads stock) | counts per layer
HEAD_CRITERIA = ("norm", "wanda")  # Minitron's mean ||head output|| | Wanda on o_proj's columns
DEPTH_CRITERIA = ("influence", "loss")  # ShortGPT's 1 - cos(block in, block out) | measured loss rise
SEARCH_AXES = ("mlp", "heads", "hidden", "depth", "vocab")
LOSSES = ("ce", "kd")  # recovery by cross-entropy | by distillation from the unpruned model
VOCAB_RULES = ("seen", "heldout")  # frequency > ε_emb | a ranked cut sized by held-out bpb (engine.prune.vocab)


def cache_dir() -> Path:
    """minigpt's cache (converted GGUF models, downloads): $MINIGPT_CACHE or ~/.cache/minigpt."""
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))

@dataclass
class ModelConfig:
    source: str = EMBEDDED_DEFAULT  # hub id, local folder, .gguf file, or embedded:smollm2
    preset: str = ""  # engine.presets model name (fills source); see engine/presets.py
    gguf_file: str = ""  # file name inside `source` when it is a folder or hub repo with GGUF files
    revision: str = ""
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    source: str = "builtin:licenses"  # builtin:NAME, hub id, URL, or local file/folder
    preset: str = ""  # engine.presets domain name (fills source, columns, MCQ set); keys given here win
    name: str = ""  # hub dataset config (subset)
    files: list = field(default_factory=list)  # data files (globs) inside the hub repo / folder; [] = all
    split: str = "train"
    column: str = "text"
    template: str = ""  # e.g. "{en}\n{ch}"; overrides column
    delimiter: str = ""  # CSV/TSV field separator; "" = by extension ("," for .csv, tab for .tsv)
    skip_header: bool = False  # with a positional column ("#7"): drop the file's first row
    max_documents: int = 0  # 0 = all
    seed: int = 0
    calibrate_fraction: float = 0.4
    finetune_fraction: float = 0.4
    evaluate_fraction: float = 0.2


@dataclass
class CalibrateConfig:
    block_size: int = 2048  # capped by the model's context
    max_tokens: int = 65536
    batch_size: int = 2
    checkpoint_every: int = 8  # batches between partial-statistics saves (resume point); 0 = only on stop


@dataclass
class PruneConfig:
    mode: str = "structural"  # structural (weights removed) | mask (paper: zeroed, shapes kept)
    rule: str = "threshold"  # threshold (score <= activation_threshold) | ratio
    criterion: str = "paper"  # paper (mean |activation|) | rms | random | magnitude | wanda | fluctuation | obs
    activation_threshold: float = 1e-3
    linear_threshold: float = -1.0  # < 0: off. MLP rows/cols (structural), every linear (mask)
    embedding_threshold: float = -1.0  # < 0: off. >= 0: vocabulary pruning (0 prunes tokens never seen in the domain)
    vocab_rule: str = "seen"  # seen (keep frequency > ε_emb) | heldout (ranked cut sized by held-out bpb)
    vocab_tolerance: float = 0.01  # heldout: the bpb rise allowed on the validation documents (relative)
    vocab_validation_tokens: int = 4096  # heldout: finetune-split documents held back from counting
    vocab_prior: float = 0.3  # heldout: the model's expected counts, weighed as this share of the counted tokens (< 0: as a cost)
    vocab_prior_tokens: int = 16384  # heldout: calibration tokens the model's expectation is summed over
    vocab_rows: int = 0  # heldout: cut the ranking to this many embedding rows (0: sized on the validation documents)
    ratio: float = 0.3  # fraction of MLP neurons removed with rule = "ratio"
    allocation: str = "per_layer"  # per_layer | global | sensitivity (ratio rule)
    min_keep: int = 8  # neurons kept in every MLP at least
    allow_layer_collapse: bool = False  # clamp to min_keep instead of failing
    round_to: int = 1  # kept widths multiples of this (ratio rule: up or down, the total kept at the ratio)
    compensation: str = "none"  # none | bias (FLAP: mean into the output bias) | lstsq (refit down_proj)
    damping: float = 0.001  # lstsq/obs ridge, as a fraction of the mean Gram diagonal (measured: 1e-3 beats 1e-2)
    sequential: bool = False  # layer by layer, each calibrated on the already pruned layers' outputs
    sensitivity_probe: float = 0.5  # fraction of one layer pruned to measure its sensitivity
    sensitivity_tokens: int = 2048  # calibration tokens used to measure each layer's loss rise
    sensitivity_spread: float = 0.5  # sensitivity allocation: layer ratios within ratio × (1 ± spread)
    # -- the other axes (Minitron): attention heads, hidden (residual) channels, whole blocks --
    head_ratio: float = 0.0  # fraction of query heads removed (whole KV groups first, GQA-aware)
    head_mode: str = "uniform"  # uniform (same count per layer: stock transformers) | per_layer
    head_criterion: str = "norm"  # norm (mean ||head output||) | wanda (|o_proj column| x input rms)
    hidden_ratio: float = 0.0  # fraction of residual-stream channels removed (one set for the whole model)
    depth: int = 0  # whole decoder blocks removed
    depth_criterion: str = "influence"  # influence (1 - cos(block in, block out)) | loss (measured loss rise)
    # -- a parameter budget instead of per-axis ratios --
    target_params: float = 0.0  # 0 = off; < 1: share of the total kept (embeddings counted); >= 1: a count
    search_axes: list = field(default_factory=lambda: ["mlp", "heads", "hidden", "depth", "vocab"])
    search_candidates: int = 6  # mixes within the budget ranked by a short distillation run each
    search_steps: int = 8  # distillation steps per candidate
    search_tolerance: float = 0.05  # candidates within target ± this share of the budget
    search_speedup: float = 0.0  # 0 = off; else candidates must cut the MACs per token (prefill at the
    # evaluate block size, attention counted: budget.macs) by at least this factor


@dataclass
class FinetuneConfig:
    enabled: bool = False
    lr: float = 5e-5
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0  # linear from lr 0; cut to total steps - 1 where the run is shorter
    batch_size: int = 4
    block_size: int = 512
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_steps: int = 200
    max_epochs: float = 0.0  # 0 = no epoch limit
    eval_every: int = 50
    target_ppl_ratio: float = 1.0  # stop once held-out ppl <= ratio x base ppl
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eps: float = 1e-8  # AdamW epsilon
    gradient_checkpointing: bool = False
    lora_rank: int = 0  # > 0: LoRA via peft, merged before saving
    lora_alpha: float = 16.0
    loss: str = "ce"  # ce (cross-entropy on the corpus) | kd (forward KL to the unpruned teacher's logits)
    kd_temperature: float = 1.0  # softmax temperature of both distributions (the KL is scaled by T^2)
    kd_ce_weight: float = 0.0  # kd loss = KL + kd_ce_weight x CE
    teacher_steps: int = 0  # teacher correction: fine-tune the unpruned model this many steps first (0 = off)
    teacher_lr: float = 0.0  # the teacher correction's learning rate (0 = finetune.lr)
    control: bool = False  # also recover the unpruned model with the same budget and loss (the honest control)


@dataclass
class EvaluateConfig:
    block_size: int = 512
    stride: int = 0  # 0 = non-overlapping blocks; > 0 = sliding window
    max_tokens: int = 16384
    batch_size: int = 4
    mcq_files: list = field(default_factory=list)
    mcq_generate: int = 0  # sentence-completion questions generated from held-out text
    mcq_choices: int = 4  # choices per generated question
    mcq_fewshot: int = 0  # solved examples (from the same set, seeded) before each question
    mcq_context: str = ""  # line before every prompt; "" = the set's own (e.g. "Economics Test:")
    mcq_template: str = ""  # "" = "Question: {question}\nAnswer:" ("{question}" for generated sets)
    mcq_columns: list = field(default_factory=list)  # hub sets: ["question=COL", "choices=A,B,C,D", "answer=COL"]
    evaluate_base: bool = True
    bpb: bool = True  # also held-out bits per byte (compares across vocabularies; one more pass)


@dataclass
class DistributedConfig:
    """Under torchrun (`torchrun --nproc_per_node N -m engine.run.runner SESSION`); one process ignores it."""

    strategy: str = "ddp"  # ddp (a replica per rank) | fsdp (FSDP2: parameters, gradients, AdamW moments sharded)
    shard_teacher: bool = False  # fsdp: shard the KD teacher too (else every rank holds a whole bf16 copy)


@dataclass
class RunConfig:
    name: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> "RunConfig":
        _check_prune(self.prune)
        _choice("model.dtype", self.model.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("finetune.schedule", self.finetune.schedule, ("cosine", "linear", "constant"))
        _check_data(self.data)
        _check_evaluate(self.evaluate)
        for name, v in (("calibrate.block_size", self.calibrate.block_size),
                        ("evaluate.block_size", self.evaluate.block_size),
                        ("calibrate.batch_size", self.calibrate.batch_size),
                        ("evaluate.batch_size", self.evaluate.batch_size)):
            if v < 1:
                raise MinigptError(f"{name} = {v} must be positive", f"set {name} to e.g. 512")
        _check_finetune(self.finetune, self.calibrate)
        _check_budgets(self.calibrate, self.evaluate)
        _check_distributed(self.distributed, self.finetune, self.prune)
        return self

    def to_dict(self) -> dict:
        return _strip(dataclasses.asdict(self))

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())



def _check_prune(p: PruneConfig) -> None:
    _choice("prune.mode", p.mode, ("structural", "mask"))
    _choice("prune.rule", p.rule, ("threshold", "ratio"))
    _choice("prune.allocation", p.allocation, ALLOCATIONS)
    _choice("prune.criterion", p.criterion, CRITERIA)
    _choice("prune.compensation", p.compensation, COMPENSATIONS)
    if p.damping < 0:
        raise MinigptError(f"prune.damping = {p.damping} is negative", "use a small fraction such as 0.01")
    if not (0.0 < p.sensitivity_probe < 1.0) or not (0.0 <= p.sensitivity_spread <= 1.0):
        raise MinigptError("prune.sensitivity_probe must be in (0, 1) and prune.sensitivity_spread in [0, 1]",
                           "use e.g. sensitivity_probe = 0.5, sensitivity_spread = 0.5")
    if p.sensitivity_tokens < 1:
        raise MinigptError("prune.sensitivity_tokens must be positive", "use e.g. 2048")
    if p.sequential and p.rule != "ratio":
        raise MinigptError("prune.sequential needs prune.rule = \"ratio\"",
                           "set prune.rule = \"ratio\" (sequential re-chooses neurons layer by layer)")
    if not (0.0 <= p.ratio < 1.0):
        raise MinigptError(f"prune.ratio = {p.ratio} is outside [0, 1)", "use a fraction such as 0.3")
    if p.min_keep < 1:
        raise MinigptError("prune.min_keep must be at least 1", "set prune.min_keep = 8")
    if p.round_to < 1:
        raise MinigptError("prune.round_to must be at least 1", "use 1, 8 or 64")
    if p.mode == "mask" and (p.head_ratio or p.hidden_ratio or p.depth or p.target_params):
        raise MinigptError("prune.mode = \"mask\" zeroes MLP neurons, linears and embedding rows only; heads, "
                           "hidden channels, depth and target_params remove weights for real",
                           "set prune.mode = \"structural\", or drop head_ratio/hidden_ratio/depth/target_params")
    _choice("prune.vocab_rule", p.vocab_rule, VOCAB_RULES)
    if not (0.0 <= p.vocab_tolerance < 1.0) or p.vocab_validation_tokens < 1:
        raise MinigptError("prune.vocab_tolerance must be in [0, 1) and prune.vocab_validation_tokens >= 1",
                           "e.g. vocab_tolerance = 0.01, vocab_validation_tokens = 4096")
    if p.vocab_rows < 0:
        raise MinigptError(f"prune.vocab_rows = {p.vocab_rows} is not a number of rows",
                           "use 0 (the held-out rule sizes the cut) or a row count, e.g. vocab_rows = 31000")
    if p.vocab_rows and p.vocab_rule != "heldout":
        raise MinigptError("prune.vocab_rows cuts the held-out rule's ranking; the \"seen\" rule keeps what the "
                           "domain used", "set prune.vocab_rule = \"heldout\", or drop prune.vocab_rows")
    if p.vocab_prior < -1 or p.vocab_prior_tokens < 1:
        raise MinigptError("prune.vocab_prior must be >= -1 and prune.vocab_prior_tokens >= 1",
                           "e.g. vocab_prior = 0.3 (0: the domain's counts alone; < 0: the model's expected "
                           "mass as a cost), vocab_prior_tokens = 16384")
    _choice("prune.head_mode", p.head_mode, HEAD_MODES)
    _choice("prune.head_criterion", p.head_criterion, HEAD_CRITERIA)
    _choice("prune.depth_criterion", p.depth_criterion, DEPTH_CRITERIA)
    for key, v in (("prune.head_ratio", p.head_ratio), ("prune.hidden_ratio", p.hidden_ratio)):
        if not (0.0 <= v < 1.0):
            raise MinigptError(f"{key} = {v} is outside [0, 1)", f"use a fraction such as 0.25 ({key} = 0: off)")
    if p.depth < 0:
        raise MinigptError(f"prune.depth = {p.depth} is negative", "set prune.depth to the number of blocks to drop, or 0")
    if p.target_params < 0:
        raise MinigptError(f"prune.target_params = {p.target_params} is negative",
                           "use a share of the total to keep (e.g. 0.5) or a parameter count (e.g. 60e6); 0 = off")
    bad = [a for a in p.search_axes if a not in SEARCH_AXES]
    if bad or not p.search_axes:
        raise MinigptError(f"prune.search_axes = {p.search_axes} is invalid",
                           f"name one or more of: {', '.join(SEARCH_AXES)}")
    if p.search_speedup and (p.search_speedup <= 1.0 or not p.target_params):
        raise MinigptError(f"prune.search_speedup = {p.search_speedup:g} "
                           + ("needs a parameter budget" if p.search_speedup > 1.0 else "is no speed floor"),
                           "set prune.target_params (e.g. 0.5) with it" if p.search_speedup > 1.0
                           else "set it above 1 (e.g. 1.9 for a 1.9x cut in MACs per token) or 0 (off)")
    if p.search_candidates < 1 or p.search_steps < 0 or not (0.0 < p.search_tolerance < 1.0):
        raise MinigptError("prune.search_candidates must be >= 1, search_steps >= 0 and search_tolerance in (0, 1)",
                           "e.g. search_candidates = 6, search_steps = 8, search_tolerance = 0.05")


def _check_data(d: DataConfig) -> None:
    fr = (d.calibrate_fraction, d.finetune_fraction, d.evaluate_fraction)
    if min(fr) < 0 or d.calibrate_fraction <= 0 or d.evaluate_fraction <= 0 or sum(fr) > 1.0 + 1e-9:
        raise MinigptError(f"data fractions {fr} are invalid",
                           "calibrate and evaluate must be > 0 and the three must sum to at most 1")


def _check_evaluate(e: EvaluateConfig) -> None:
    if e.mcq_generate < 0 or e.mcq_fewshot < 0 or e.mcq_choices < 2:
        raise MinigptError("evaluate.mcq_generate/mcq_fewshot must be >= 0 and mcq_choices >= 2",
                           "e.g. mcq_generate = 100, mcq_fewshot = 0, mcq_choices = 4")
    if e.mcq_template and not _template_ok(e.mcq_template):
        raise MinigptError(f"evaluate.mcq_template {e.mcq_template!r} is not a template of {{question}} alone",
                           'e.g. mcq_template = "Question: {question}\\nAnswer:" (write {{ }} for braces)')


def _check_finetune(ft: FinetuneConfig, cal: CalibrateConfig) -> None:
    for name, v in (("finetune.batch_size", ft.batch_size), ("finetune.grad_accum", ft.grad_accum),
                    ("finetune.block_size", ft.block_size), ("finetune.keep_checkpoints", ft.keep_checkpoints)):
        if v < 1:
            raise MinigptError(f"{name} = {v} must be at least 1", f"set {name} to e.g. 1, 4 or 512")
    if not ft.lr > 0 or len(ft.betas) != 2 or not all(0.0 <= b < 1.0 for b in ft.betas):
        raise MinigptError(f"finetune.lr = {ft.lr} / betas = {list(ft.betas)} are invalid",
                           "use lr > 0 (e.g. 5e-5) and two betas in [0, 1), e.g. [0.9, 0.999]")
    if min(ft.warmup_steps, ft.eval_every, ft.checkpoint_every, ft.lora_rank, cal.checkpoint_every) < 0:
        raise MinigptError("finetune.warmup_steps, eval_every, checkpoint_every, lora_rank and "
                           "calibrate.checkpoint_every must not be negative", "use 0 to turn one off")
    _choice("finetune.loss", ft.loss, LOSSES)
    if ft.teacher_lr < 0:
        raise MinigptError(f"finetune.teacher_lr = {ft.teacher_lr} is negative",
                           "set finetune.teacher_lr > 0 (e.g. 2e-4), or 0 to use finetune.lr")
    if not ft.kd_temperature > 0 or ft.kd_ce_weight < 0 or ft.teacher_steps < 0:
        raise MinigptError(f"finetune.kd_temperature = {ft.kd_temperature}, kd_ce_weight = {ft.kd_ce_weight}, "
                           f"teacher_steps = {ft.teacher_steps} are invalid",
                           "use kd_temperature > 0 (1 is Minitron's best), kd_ce_weight >= 0, teacher_steps >= 0")
    for name, v in (("finetune.max_steps", ft.max_steps), ("finetune.max_epochs", ft.max_epochs)):
        if v < 0:  # a negative limit used to be taken as none
            raise MinigptError(f"{name} = {v} is negative", f"set {name} to e.g. 200, or 0 for no limit of this kind")

def _check_distributed(d: DistributedConfig, ft: FinetuneConfig, p: PruneConfig) -> None:
    _choice("distributed.strategy", d.strategy, ("ddp", "fsdp"))
    if d.shard_teacher and d.strategy != "fsdp":
        raise MinigptError("distributed.shard_teacher = true needs distributed.strategy = \"fsdp\"",
                           "set distributed.strategy = \"fsdp\", or shard_teacher = false")
    if d.strategy == "fsdp" and (ft.lora_rank > 0 or p.mode == "mask"):
        raise MinigptError("distributed.strategy = \"fsdp\" trains neither LoRA adapters nor mask-mode models",
                           "use distributed.strategy = \"ddp\", or prune.mode = \"structural\" with finetune.lora_rank = 0")


def _check_budgets(cal: CalibrateConfig, ev: EvaluateConfig) -> None:
    """Token budgets that cannot be met are refused with the nearest valid value, never rounded
    silently (calibration uses whole blocks; a budget below one block used to become one)."""
    if cal.max_tokens < cal.block_size:
        raise MinigptError(f"calibrate.max_tokens = {cal.max_tokens} is less than one block "
                           f"(calibrate.block_size = {cal.block_size})",
                           f"set calibrate.max_tokens = {cal.block_size} (one block) or more, or "
                           f"calibrate.block_size = {max(1, cal.max_tokens)}")
    if ev.max_tokens < 0:
        raise MinigptError(f"evaluate.max_tokens = {ev.max_tokens} is negative",
                           f"set evaluate.max_tokens = {ev.block_size} or more (0: the whole held-out split)")
    if 0 < ev.max_tokens < ev.block_size:
        raise MinigptError(f"evaluate.max_tokens = {ev.max_tokens} is less than one block "
                           f"(evaluate.block_size = {ev.block_size})",
                           f"set evaluate.max_tokens = {ev.block_size} or more, or evaluate.block_size = "
                           f"{max(2, ev.max_tokens)}")


def _template_ok(template: str) -> bool:
    try:
        return "{question}" in template and template.format(question="") is not None
    except (KeyError, IndexError, ValueError):
        return False


def _choice(key: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise MinigptError(f"{key} = {value!r} is not valid", f"use one of: {', '.join(allowed)}")


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise MinigptError(f"[{where}] must be a table", f"write it as [{where}] with key = value lines")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise MinigptError(
            f"unknown config key {prefix}{unknown[0]}",
            f"valid keys{' in [' + where + ']' if where else ''}: {', '.join(sorted(known))}",
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(key, hint, value)
    return cls(**kwargs)


def _coerce(key: str, hint, value):
    base = get_origin(hint) or hint
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is tuple and isinstance(value, list):
        return tuple(value)
    if base in (int, str, bool, list) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise MinigptError(
        f"config key {key} = {value!r} has the wrong type",
        f"it must be a {getattr(base, '__name__', base)}",
    )


def section_defaults(section: str) -> dict:
    """A section's keys at their defaults, as TOML values (what a preset may fill in)."""
    cls = {"model": ModelConfig, "data": DataConfig, "evaluate": EvaluateConfig}[section]
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cls()).items()}


def from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, presets.expand(data, section_defaults), "").validate()


def load(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise MinigptError(f"config file {path} not found", "pass the path to a .toml file (see configs/)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MinigptError(f"config {path} is not valid TOML ({e})", "fix the syntax at the position shown") from None
    return from_dict(data)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` overrides (value parsed as TOML, else taken as a string)."""
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise MinigptError(f"override {item!r} has no '='", "write it as section.key=value, e.g. prune.ratio=0.3")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        parts = key.strip().split(".")
        if len(parts) == 2 and parts[1] == "preset" and isinstance(data.get(parts[0]), dict):
            old = data[parts[0]].get("preset")  # switching presets: drop what the old one filled in
            if old and old != value:
                data = presets.unexpand(data, parts[0], old, section_defaults)
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise MinigptError(f"unknown config section {p!r} in override {item!r}",
                                   f"sections: {', '.join(k for k, v in data.items() if isinstance(v, dict))}")
            node = node[p]
        node[parts[-1]] = value
    return from_dict(data)
