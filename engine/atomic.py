"""Atomic writes: temp file (or folder) beside the target, fsync, rename.

A reader never sees a half-written state, config, result or model, even if the process
is killed mid-write. Large artefacts (a writer that needs a path: safetensors,
save_pretrained) go through `write_with` and `write_dir`, whose temp names,
`.<name>.tmp<pid>`, tell whose they are: the next write of the same target removes the
ones a dead process left (`remove_stale`), so a kill -9 mid-write costs no disk for good.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Swap a fully written temp folder into place (old copy removed after the swap)."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


# ---- large artefacts: a writer that takes a path -------------------------------------------
def temp_path(target: str | os.PathLike) -> Path:
    """This process's temp sibling of `target`: `.<name>.tmp<pid>`."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the temp siblings of `target` (`.<name>.tmp<pid>`) whose writer is dead.

    Live writers' temps (this process's included) are never touched. Returns what went.
    """
    target = Path(target)
    folder = target.parent
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp(\d+)")
    removed = []
    for p in folder.iterdir():
        m = pattern.fullmatch(p.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:  # another process cleaned it first
            continue
        removed.append(p)
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def write_with(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Create `path` atomically with `write(tmp)`, a writer that needs a file name
    (safetensors' save_file, a download loop). Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = temp_path(path)
    _discard(tmp)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    return path


def write_dir(folder: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Create (or replace) the folder `folder` atomically with `write(tmp)`, which fills a
    fresh temp folder (save_pretrained). Every file is fsynced before the swap. Returns `folder`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(folder)
    tmp = temp_path(folder)
    _discard(tmp)
    try:
        tmp.mkdir()
        write(tmp)
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and not p.is_symlink():
                _fsync(p)
        replace_dir(tmp, folder)
    except BaseException:
        _discard(tmp)
        raise
    return folder
