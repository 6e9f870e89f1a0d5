"""Preflight: check a run's whole request before a session folder is made or a model loaded.

`minigpt check CONFIG` runs these checks alone; `run`, `sweep` and `grid` run them first and
report every problem at once (a grid with a misspelt model name fails in a second, not
after trying all its cells). Torch-free and network-light: the model is resolved from its
config alone (config.json, a GGUF file's magic bytes, the embedded package's metadata, the
Hugging Face cache; the hub is asked only when the id is nowhere local and the machine is
not offline, with a short timeout), data files are sniffed (`engine.data.domain.check_files`),
not loaded.

Each finding is a `Finding` (level "error" or "warning", problem, fix). Errors stop the
command (exit 2); warnings are printed and the run goes on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from engine import atomic
from engine import presets
from engine.config import EMBEDDED_DEFAULT, RunConfig
from engine.errors import MinigptError

HUB_TIMEOUT = 5.0  # seconds for the one hub question a check may ask


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning"
    problem: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.level}: {self.problem}" + (f" — {self.fix}" if self.fix else "")


def _err(e: MinigptError) -> Finding:
    return Finding("error", e.problem, e.fix)


@dataclass
class ModelFacts:
    """What the config alone says about a model: its family's context length, a size estimate."""

    context: int | None = None
    weight_bytes: int | None = None  # on-disk size of its weights, when known


# ---- the model ----------------------------------------------------------------------------------
def _config_facts(config: dict, where: str, out: list[Finding]) -> ModelFacts:
    from engine.models import adapters

    ns = SimpleNamespace(**config)
    try:
        a = adapters.for_config(ns)
    except MinigptError as e:
        out.append(Finding("error", f"model {where}: {e.problem}", e.fix))
        return ModelFacts()
    return ModelFacts(context=a.context_length(ns))


def _read_config(path: Path, where: str, out: list[Finding]) -> dict | None:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("not an object")
        return cfg
    except OSError as e:
        out.append(Finding("error", f"cannot read {path} ({e.strerror or e})", f"check the permissions of {where}"))
    except ValueError as e:
        out.append(Finding("error", f"{path} is not valid JSON ({str(e)[:80]})",
                           f"repair it, or download {where} again"))
    return None


def _weights_size(folder: Path) -> int | None:
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    return sum(p.stat().st_size for p in files) if files else None


def _gguf(path: Path, out: list[Finding]) -> ModelFacts:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        out.append(Finding("error", f"model file {path} cannot be read ({e.strerror or e})",
                           "check model.source and the file's permissions"))
        return ModelFacts()
    if magic != b"GGUF":
        out.append(Finding("error", f"model file {path} is not a GGUF file (it does not start with the GGUF magic bytes)",
                           "check the file (a broken download?), or convert the model to HF format"))
        return ModelFacts()
    return ModelFacts(weight_bytes=path.stat().st_size)


def _model_names() -> str:
    return ", ".join(presets.model_names())


def check_model(cfg: RunConfig, out: list[Finding]) -> ModelFacts:
    """The model source resolves, from its config only."""
    from engine.data import download

    m = cfg.model
    src = m.source.strip()
    if src.startswith("embedded:"):
        from engine.models import embedded

        if src not in embedded.names():
            out.append(Finding("error", f"model.source = {src!r} is not an embedded model",
                               f"use one of: {', '.join(embedded.names())}, or model.preset = one of: {_model_names()}"))
            return ModelFacts()
        try:
            path, n_bytes = embedded.locate(src)  # packages and chunks present; nothing joined yet
        except MinigptError as e:
            out.append(_err(e))
            return ModelFacts()
        facts = _gguf(path, out)
        facts.context = embedded.get(src).context  # max_position_embeddings (its GGUF metadata)
        if facts.weight_bytes is not None:
            facts.weight_bytes = n_bytes
        return facts
    p = Path(src).expanduser()
    if src.lower().endswith(".gguf") or p.is_file():
        if not p.exists():
            out.append(Finding("error", f"model file {src} not found", "check model.source (a path to a .gguf file)"))
            return ModelFacts()
        return _gguf(p, out)
    if p.is_dir():
        if m.gguf_file:
            return _gguf(p / m.gguf_file, out) if (p / m.gguf_file).exists() else \
                _missing(out, f"model folder {src} has no file {m.gguf_file}", "check model.gguf_file")
        if not (p / "config.json").exists():
            out.append(Finding("error", f"model folder {src} has no config.json (not a Hugging Face model folder)",
                               "point model.source at the folder save_pretrained wrote, a .gguf file or a hub id"))
            return ModelFacts()
        conf = _read_config(p / "config.json", src, out)
        if conf is None:
            return ModelFacts()
        facts = _config_facts(conf, src, out)
        facts.weight_bytes = _weights_size(p)
        if facts.weight_bytes is None:
            out.append(Finding("error", f"model folder {src} holds no weights (*.safetensors or *.bin)",
                               "copy the weight files next to its config.json"))
        return facts
    if src.startswith((".", "/", "~")) or os.sep in src and src.count("/") != 1:
        out.append(Finding("error", f"model path {src} not found", "check model.source"))
        return ModelFacts()
    return _hub_model(src, m.revision or None, out, download)


def _missing(out: list[Finding], problem: str, fix: str) -> ModelFacts:
    out.append(Finding("error", problem, fix))
    return ModelFacts()


def _hub_model(repo: str, revision: str | None, out: list[Finding], download) -> ModelFacts:
    """A hub id: its config from the HF cache; else ask the hub (unless offline), briefly."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # not even a valid repo name (HFValidationError)
        out.append(Finding("error", f"model.source = {repo!r} is not a model: not a local folder, a .gguf file, "
                                    f"{EMBEDDED_DEFAULT} or a hub id (org/name)",
                           f"use model.preset = one of: {_model_names()}, or a path"))
        return ModelFacts()
    if isinstance(cached, str):
        conf = _read_config(Path(cached), repo, out)
        return _config_facts(conf, repo, out) if conf is not None else ModelFacts()
    hint = "" if "/" in repo else (f" (not a preset either: {_model_names()})")
    if download.hub_offline():
        e = download.hub_unavailable(repo, "model", setting="model.source")
        out.append(Finding("error", e.problem + hint, e.fix))
        return ModelFacts()
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT)
    except Exception as e:
        name = type(e).__name__
        if "NotFound" in name or "Gated" in name or "HFValidation" in name:
            out.append(Finding("error", f"model {repo!r} is not on the hub ({name}){hint}",
                               f"check the id, or use model.preset = one of: {_model_names()}, or a local folder"))
        else:
            e2 = download.hub_unavailable(repo, "model", setting="model.source", reason=name)
            out.append(Finding("error", e2.problem + hint, e2.fix))
    return ModelFacts()


# ---- the data -----------------------------------------------------------------------------------
def check_data(cfg: RunConfig, out: list[Finding]) -> None:
    """Data files exist, are readable text of their declared format, and hold their columns."""
    from engine.data import corpora
    from engine.data import domain
    from engine.data import download

    d = cfg.data
    src = d.source.strip()
    if src.startswith("builtin:"):
        name = src.split(":", 1)[1]
        if name not in corpora.BUILTINS:
            out.append(Finding("error", f"data.source = {src!r} is not a built-in corpus",
                               f"built-in corpora: {', '.join('builtin:' + n for n in corpora.BUILTINS)}"))
        return
    if download.is_url(src):
        try:
            download.check_pin(src, "data.source")
        except MinigptError as e:
            out.append(_err(e))
            return
        if not download.cache_path(src).is_file():
            out.append(Finding("warning", f"data.source {src} is downloaded on first use",
                               f"offline? download it to {download.cache_path(src)} first"))
        return
    p = Path(src).expanduser()
    if p.exists():
        if p.is_dir() and (domain._is_saved_dataset(p) or domain._is_hub_folder(p)) and not d.files:
            return  # datasets reads these folders itself
        try:
            files = domain._data_files(p, d.files)
        except MinigptError as e:
            out.append(_err(e))
            return
        if not files:
            out.append(Finding("error", f"no data files in {p}", f"supported: {', '.join(sorted(domain._BUILDERS))}"))
            return
        if not d.column.startswith("#") or d.template:
            kinds = {domain._BUILDERS.get(f.suffix.lower()) for f in files}
            if None in kinds or len(kinds) != 1:
                out.append(Finding("error", f"cannot read {p}: mixed or unsupported file types "
                                            f"({', '.join(sorted({f.suffix or '(none)' for f in files}))})",
                                   f"use one of {', '.join(sorted(domain._BUILDERS))}"))
                return
        out.extend(_err(e) for e in domain.check_files(files, d)[:5])
        return
    if src.startswith((".", "/", "~")):
        out.append(Finding("error", f"data path {src} not found", "check data.source"))
        return
    if download.hub_offline() and d.files:  # a hub dataset read as files: they must be in the cache
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(src, repo_type="dataset", allow_patterns=list(d.files), local_files_only=True)
        except Exception:
            e = download.hub_unavailable(src, "dataset", d.files, "data.source")
            out.append(Finding("error", e.problem, e.fix))


def check_mcq(cfg: RunConfig, out: list[Finding]) -> None:
    from engine.data import download

    for ref in cfg.evaluate.mcq_files:
        if download.is_url(ref):
            try:
                download.check_pin(ref, "evaluate.mcq_files")
            except MinigptError as e:
                out.append(_err(e))
            continue
        if ref.startswith("hub:"):
            continue
        if not Path(ref).expanduser().exists():
            out.append(Finding("error", f"MCQ file {ref} not found",
                               "check evaluate.mcq_files (a .jsonl, .csv or .json file, or hub:ID for a hub dataset)"))


# ---- token budgets ------------------------------------------------------------------------------
def check_budgets(cfg: RunConfig, facts: ModelFacts, out: list[Finding]) -> None:
    """Block sizes against the model's context, budgets against blocks (the config itself
    refuses a budget below one block)."""
    c, e, ft = cfg.calibrate, cfg.evaluate, cfg.finetune
    if facts.context:
        ctx = facts.context
        for key, size in (("calibrate.block_size", c.block_size), ("evaluate.block_size", e.block_size)):
            if size > ctx:
                out.append(Finding("warning", f"{key} = {size} exceeds the model's context of {ctx} tokens: "
                                              f"blocks of {ctx} are used", f"set {key} = {ctx} or less"))
        if ft.enabled and ft.block_size > ctx:
            out.append(Finding("error", f"finetune.block_size = {ft.block_size} exceeds the model's context of {ctx}",
                               f"set finetune.block_size = {ctx} or less"))
        block = min(c.block_size, ctx)
        if c.max_tokens < block:
            out.append(Finding("error", f"calibrate.max_tokens = {c.max_tokens} is less than one block of {block}",
                               f"set calibrate.max_tokens = {block} or calibrate.block_size = {c.max_tokens}"))
        eblock = min(e.block_size, ctx)
        if 0 < e.max_tokens < eblock:
            out.append(Finding("error", f"evaluate.max_tokens = {e.max_tokens} is less than one block of {eblock}",
                               f"set evaluate.max_tokens = {eblock} or evaluate.block_size = {e.max_tokens}"))
    else:
        block = c.block_size
    if c.max_tokens % block:
        used = c.max_tokens // block * block
        out.append(Finding("warning", f"calibrate.max_tokens = {c.max_tokens} is not a whole number of blocks of "
                                      f"{block}: calibration uses {used} tokens",
                           f"set calibrate.max_tokens = {used} or {used + block}"))


# ---- the sessions root ----------------------------------------------------------------------------
def projected_bytes(cfg: RunConfig, facts: ModelFacts) -> int:
    """What a session may write, roughly: the pruned model (fp32: at most the base's size) and,
    fine-tuning, `keep_checkpoints` checkpoints of weights plus AdamW's two moments."""
    w = facts.weight_bytes or 0
    if cfg.model.source.startswith("embedded:") or cfg.model.source.lower().endswith(".gguf"):
        w *= 4  # a quantised GGUF, dequantised to fp32 (SmolLM2's Q8: ~1 byte per weight)
    per_ckpt = 3 * w
    return w + (cfg.finetune.keep_checkpoints * per_ckpt if cfg.finetune.enabled else 0) + (1 << 20)


def check_root(root: Path, need: int, out: list[Finding]) -> None:
    from engine.run.session import unwritable

    problem = unwritable(root)
    if problem:
        out.append(Finding("error", f"sessions root {root} is not writable ({problem})",
                           "pass --root DIR (or set MINIGPT_SESSIONS) to a writable folder"))
        return
    free = atomic.free_bytes(root)
    if free is not None and need and free < need:
        out.append(Finding("error", f"sessions root {root} has {atomic.human_bytes(free)} free; this run writes "
                                    f"about {atomic.human_bytes(need)} (model and checkpoints)",
                           f"free {atomic.human_bytes(need - free)} there, pass --root DIR on a larger disk, or "
                           "lower finetune.keep_checkpoints"))


# ---- the whole request ----------------------------------------------------------------------------
def check(cfg: RunConfig, root: Path | None = None, finetune: bool = True) -> list[Finding]:
    """Every finding for one run config (and its sessions root, when given)."""
    out: list[Finding] = []
    facts = check_model(cfg, out)
    check_data(cfg, out)
    check_mcq(cfg, out)
    check_budgets(cfg, facts, out)
    if root is not None:
        check_root(Path(root), projected_bytes(cfg, facts) if finetune else 0, out)
    return out


def check_all(cfgs: list[RunConfig], root: Path | None = None) -> list[Finding]:
    """Findings of many configs (a grid's cells), each reported once; the space needed is the sum."""
    seen: dict[str, Finding] = {}
    models: dict[str, tuple[ModelFacts, list[Finding]]] = {}
    need = 0
    for cfg in cfgs:
        key = json.dumps([cfg.model.source, cfg.model.gguf_file, cfg.model.revision])
        if key not in models:
            found_m: list[Finding] = []
            models[key] = (check_model(cfg, found_m), found_m)
        facts, out = models[key][0], list(models[key][1])
        check_data(cfg, out)
        check_mcq(cfg, out)
        check_budgets(cfg, facts, out)
        need += projected_bytes(cfg, facts)
        for f in out:
            seen.setdefault(f.line(), f)
    found = list(seen.values())
    if root is not None:
        check_root(Path(root), need, found)
    return found


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]
