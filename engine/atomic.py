"""Atomic writes: temp file (or folder) beside the target, fsync, rename.

A reader never sees a half-written state, config, result or model, even if the process
is killed mid-write. Large artefacts (a writer that needs a path: safetensors,
save_pretrained) go through `write_with` and `write_dir`, whose temp names,
`.<name>.tmp<pid>`, tell whose they are: the next write of the same target removes the
ones a dead process left (`remove_stale`), so a kill -9 mid-write costs no disk for good.
Small files are written through `.<name>.tmp<pid>.<random>`; `remove_orphans(folder)`
removes every dead writer's temp in a folder (a session's, when it is opened).

A full disk (ENOSPC, EDQUOT, or a library's write error of any wording while under 16 MiB is
free there) is a `DiskFull` error, one line with the path, the bytes the write needed and the
bytes free, and the fix; the temp is removed and the previous copy of the target stays as it was.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_WRITER = True  # False in a torchrun rank > 0: rank 0 alone writes the session (engine.run.runner)


def set_writer(on: bool) -> None:
    """Whether this process writes files. A torchrun rank > 0 runs the same pipeline as rank 0
    but writes nothing: every write and clean-up here becomes a no-op that returns its target."""
    global _WRITER
    _WRITER = bool(on)


def writer() -> bool:
    """True unless this process is a rank > 0 (see `set_writer`)."""
    return _WRITER


class DiskFull(OSError):
    """A write ran out of space: the path, what it needed and what is free, and the fix.

    An OSError (errno ENOSPC), so code that tolerates a failed write still does; it reads as
    one line like `engine.errors.MinigptError` (`problem`, `fix`, `line()`). It cannot be one:
    the root modules import nothing of each other."""

    def __init__(self, path: Path, needed: int, free: int | None):
        self.path, self.needed, self.free = Path(path), int(needed), free
        free_s = "unknown" if free is None else human_bytes(free)
        self.problem = (f"disk full writing {self.path}: it needs at least {human_bytes(self.needed)} "
                        f"({self.needed:,} bytes), {free_s} free there")
        short = self.needed - free if free is not None and free < self.needed else self.needed
        self.fix = (f"free at least {human_bytes(short)} on that disk (or point --root / MINIGPT_SESSIONS / "
                    "MINIGPT_CACHE at a larger one), then resume: the previous copy is intact")
        super().__init__(errno.ENOSPC, self.line(), str(self.path))

    def line(self) -> str:
        return f"{self.problem} — {self.fix}"

    def __str__(self) -> str:
        return self.line()


def human_bytes(n: int) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(p: Path) -> int:
    try:
        if p.is_dir() and not p.is_symlink():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        return p.stat().st_size
    except OSError:
        return 0


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _FULL


def _full(target: Path, tmp: Path | None, needed: int = 0) -> DiskFull:
    """The DiskFull error for a write of `target` cut short (call before discarding `tmp`)."""
    written = _size(tmp) if tmp is not None else 0
    return DiskFull(target, max(needed, written + 1), free_bytes(target.parent))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    if not _WRITER:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name tells remove_orphans whose it is; the random part keeps threads apart
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp{os.getpid()}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if is_disk_full(e):
            raise DiskFull(path, len(data), free_bytes(path.parent)) from None
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
    if not _WRITER:
        return []
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


_ORPHAN = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>\d+)(?:\.[A-Za-z0-9_]+)?")


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove every dead writer's temp in `folder` (`.<name>.tmp<pid>`, `.<name>.tmp<pid>.<random>`),
    and settle a cut folder swap: `.<name>.old` goes back to `<name>` when `<name>` is missing,
    and is removed when `<name>` is there. Live writers' temps stay. Returns what was removed
    (or put back). The caller makes sure no live writer swaps folders here (a session's lock)."""
    folder = Path(folder)
    if not folder.is_dir() or not _WRITER:
        return []
    done = []
    for p in sorted(folder.iterdir()):
        m = _ORPHAN.fullmatch(p.name)
        if m:
            pid = int(m.group("pid"))
            if pid == os.getpid() or _pid_alive(pid):
                continue
            _discard(p)
            done.append(p)
        elif p.name.startswith(".") and p.name.endswith(".old") and len(p.name) > 5:
            final = p.with_name(p.name[1:-4])
            if final.exists():
                _discard(p)
            else:
                os.replace(p, final)
            done.append(p)
    return done


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
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

    def commit(tmp: Path, target: Path) -> None:
        fsync(tmp)
        os.replace(tmp, target)

    return _swap_in(path, write, commit, needed=lambda target: 0)


def write_dir(folder: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Create (or replace) the folder `folder` atomically with `write(tmp)`, which fills a
    fresh temp folder (save_pretrained). Every file is fsynced before the swap. Returns `folder`."""

    def fill(tmp: Path) -> None:
        tmp.mkdir()
        write(tmp)

    def commit(tmp: Path, target: Path) -> None:
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and not p.is_symlink():
                fsync(p)
        replace_dir(tmp, target)

    return _swap_in(folder, fill, commit, needed=_size)


def _swap_in(target: str | os.PathLike, fill: Callable[[Path], Any], commit: Callable[[Path, Path], None],
             needed: Callable[[Path], int]) -> Path:
    """The one path of write_with and write_dir: a dead writer's temps go, `fill` writes this
    process's temp, `commit` puts it in place; on failure the temp goes, and a full disk is
    `DiskFull` (needing at least `needed(target)`, what the old copy holds)."""
    if not _WRITER:
        return Path(target)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = temp_path(target)
    _discard(tmp)
    try:
        fill(tmp)
        commit(tmp, target)
    except BaseException as e:
        full = _full(target, tmp, needed=needed(target)) if _caused_by_full_disk(e, target) else None
        _discard(tmp)
        if full is not None:
            raise full from None
        raise
    return target


_LOW_WATER = 16 << 20  # bytes: a write that failed with less than this free ran out of space


def _caused_by_full_disk(e: BaseException, target: Path) -> bool:
    """ENOSPC itself, or a library's error wrapping it (safetensors and torch re-raise as
    RuntimeError with the OS message), or a write error of any wording while the disk holding
    `target` is all but full: torch's zip writer reports a short write as "unexpected pos"."""
    if isinstance(e, (OSError, RuntimeError)):
        free = free_bytes(target.parent)
        if free is not None and free < _LOW_WATER:
            return True
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, DiskFull) or is_disk_full(e):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False
