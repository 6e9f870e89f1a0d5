"""Loading causal LMs: hub ids, local folders, GGUF files, the embedded models, saved Mini-GPTs.

GGUF files are dequantised once (slow: ~36 s for SmolLM2) and cached as safetensors
(~0.7 s to reload) under $MINIGPT_CACHE (default ~/.cache/minigpt).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.config import ModelConfig, cache_dir
from engine.errors import MinigptError


def resolve_device(spec: str):
    import torch

    if spec in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise MinigptError(f"model.device = {spec!r} but no CUDA GPU is visible", "use device = \"cpu\" or \"auto\"")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise MinigptError(f"model.device = {spec!r} is not a device", "use auto, cpu, cuda or cuda:N") from None


def resolve_dtype(spec: str, device):
    """fp32 on CPU (bf16 is ~6x slower without bf16 hardware), bf16 on CUDA."""
    import torch

    if spec in ("", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def _gguf_cache(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, progress=None) -> Path:
    """Dequantise a GGUF file into a cached HF folder (safetensors) and return it."""
    from engine import atomic

    out = _gguf_cache(gguf)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"converting {gguf.name} from GGUF (once; cached in {out})")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as e:
        raise MinigptError(f"loading GGUF needs an extra package ({e})", "pip install gguf accelerate") from None
    except Exception as e:  # malformed file, unsupported GGUF arch
        raise MinigptError(f"cannot read GGUF file {gguf}: {e}", "check the file, or convert it to HF format") from None
    model.hf_quantizer = None  # a GGUF-loaded model refuses save_pretrained otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "minigpt_source.json").write_text(json.dumps({"gguf": str(gguf)}))

    return atomic.write_dir(out, write)


def resolve_source(cfg: ModelConfig, progress=None) -> str:
    """Turn a model spec into something `from_pretrained` takes (converting GGUF if needed)."""
    src = cfg.source.strip()
    if src.startswith("embedded:"):
        from engine.models import embedded

        return str(convert_gguf(embedded.gguf_path(src, progress), progress))
    path = Path(src).expanduser()
    if src.lower().endswith(".gguf"):
        if not path.is_file():
            raise MinigptError(f"GGUF file {src} not found", "check the path")
        return str(convert_gguf(path, progress))
    if path.is_dir():
        if cfg.gguf_file:
            return str(convert_gguf(path / cfg.gguf_file, progress))
        if not (path / "config.json").exists():
            raise MinigptError(f"folder {src} holds no config.json", "point model.source at a saved HF model folder")
        return str(path)
    if path.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise MinigptError(f"model path {src} not found", "check the path, or use a hub id like org/name")
    return src  # a hub id


def load_config(source: str, cfg: ModelConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, revision=cfg.revision or None,
                                          trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        msg = str(e).splitlines()[0][:200]
        raise MinigptError(f"cannot load model {source!r}: {msg}",
                           "check the hub id (or your network/HF token), or download it and pass its local folder") from None
    except ValueError as e:
        raise MinigptError(f"cannot read the config of {source!r}: {str(e).splitlines()[0][:200]}",
                           "use a causal LM of a supported family") from None


def load(cfg: ModelConfig, progress=None):
    """Return (model, tokenizer, device) ready for eval, on the configured device and dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.models import adapters
    from engine.models import export

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress/events replace HF's tqdm bars
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = resolve_source(cfg, progress)
    if export.is_minigpt_model(source):
        model = export.load_model(source, dtype=dtype)
    else:
        hf_cfg = load_config(source, cfg)
        adapters.for_config(hf_cfg)  # fail before downloading weights of an unsupported arch
        try:
            model = AutoModelForCausalLM.from_pretrained(source, revision=cfg.revision or None, dtype=dtype,
                                                         trust_remote_code=cfg.trust_remote_code)
        except OSError as e:
            raise MinigptError(f"cannot load weights of {source!r}: {str(e).splitlines()[0][:200]}",
                               "check the model files or your network") from None
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision or None,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise MinigptError(f"cannot load the tokenizer of {source!r}: {str(e).splitlines()[0][:200]}",
                           "the model folder needs its tokenizer files") from None
    model.to(device=device, dtype=dtype)
    model.eval()
    torch.set_grad_enabled(True)
    return model, tok, device
