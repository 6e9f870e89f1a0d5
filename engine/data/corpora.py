"""Built-in domain corpora: real text every Python install already has, read in place.

Nothing is copied into the repository. Two domains, so the demo shows that different
domains keep different neurons:

* `licenses`: the licence texts shipped by the installed distributions (dist-info
  licence files), CPython's own LICENSE, and /usr/share/common-licenses where present;
  read in a fixed order, each distinct text once (near-copies dropped), so two installs of
  the same packages give the same corpus and the held-out split is not the fine-tune one.
* `stdlib-docs`: the docstrings of the standard library's modules, read with `ast`
  (no module is imported, so nothing runs).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import re
import sys
import sysconfig
from pathlib import Path

from engine.data.overlap import word_windows
from engine.errors import MinigptError

_LICENSE_NAME = re.compile(r"(^|/)(licen[cs]e|copying|notice)[^/]*$", re.I)
_SKIP_STDLIB = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo")


def _dedupe_key(text: str) -> str:
    # Licences differ mostly in their copyright line; drop it so near-copies of MIT or
    # Apache do not land in both the calibration and the held-out split.
    body = "\n".join(l for l in text.splitlines() if "copyright" not in l.lower())
    return hashlib.sha1(" ".join(body.split()).lower().encode()).hexdigest()


def licenses() -> list[str]:
    # Sorted by distribution and file: `md.distributions()` lists site-packages in the
    # filesystem's order, which differs between two installs of the same packages, and the
    # order decides which near-copy survives deduplication and where the seeded split puts it.
    found = []
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        for f in dist.files or []:
            s = str(f)
            if _LICENSE_NAME.search(s) and not s.endswith((".py", ".pyc", ".pyi")) and ".dist-info" in s:
                found.append((name, s, Path(dist.locate_file(f))))
    paths = [p for *_, p in sorted(found)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths += [stdlib / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt"]
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        paths += sorted(p for p in common.iterdir() if p.is_file())
    return _read_unique(paths, min_chars=400)


def stdlib_docs() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in _SKIP_STDLIB or p.startswith("test") for p in rel[:-1]) or rel[-1].startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc if isinstance(node, ast.Module) else f"{node.name}: {doc}")
        text = "\n\n".join(dict.fromkeys(parts))
        if len(text) >= 400:
            docs.append(text)
    return docs


def _read_unique(paths: list[Path], min_chars: int) -> list[str]:
    """The readable texts, each kept only when it is neither a copy of one kept before (but
    for its copyright lines) nor a near-copy: half or more of its 13-word windows already in
    the kept texts. Licence variants (one MIT text with many copyright holders, an Apache
    text with another appendix) are otherwise spread over every split, and held-out bits per
    byte after recovery would score recall of the fine-tune split."""
    seen, kept_windows, out = set(), set(), []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8", errors="replace").strip()
        except (OSError, IsADirectoryError):
            continue
        if len(text) < min_chars:
            continue
        key = _dedupe_key(text)
        if key in seen:
            continue
        windows = set(word_windows(text))
        if windows and len(windows & kept_windows) * 2 >= len(windows):
            continue
        seen.add(key)
        kept_windows |= windows
        out.append(text)
    return out


BUILTINS = {"licenses": licenses, "stdlib-docs": stdlib_docs}


def load_builtin(name: str) -> list[str]:
    if name not in BUILTINS:
        raise MinigptError(f"unknown built-in corpus {name!r}",
                           f"built-ins: {', '.join('builtin:' + n for n in BUILTINS)}")
    return BUILTINS[name]()
