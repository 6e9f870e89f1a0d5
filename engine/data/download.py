"""Fetching what presets name: files by URL and dataset/model repos from the Hugging Face hub.

URL downloads land once in the minigpt cache (`<cache>/downloads/<host>/<path>`) and are
read from there ever after, so a grid re-run or an offline machine never fetches twice.
Every failure is one `MinigptError` that says what to download and where to put it:
machines without network (GPU boxes behind a firewall, CI) are the common case, not an
edge. Torch-free.

`progress(done, total, rate)` callbacks match `Reporter.progress_fn`, so downloads show
up as events in a run and as a rich bar in the CLI.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from engine import atomic
from engine.config import cache_dir
from engine.errors import MinigptError

CHUNK = 1 << 16
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def is_url(ref: str) -> bool:
    return ref.strip().lower().startswith(("https://", "http://"))


def cache_root() -> Path:
    return cache_dir() / "downloads"


def cache_path(url: str) -> Path:
    """Where a URL's file is kept: readable, stable, one file per URL."""
    u = urlparse(url.strip())
    parts = [p for p in u.path.split("/") if p and p not in (".", "..")]
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in [u.netloc or "local", *parts]]
    if u.query:
        safe[-1] += "_" + re.sub(r"[^A-Za-z0-9._-]+", "_", u.query)
    return cache_root().joinpath(*safe)


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


def fetch(url: str, setting: str = "data.source", progress=None, timeout: float = 60.0) -> Path:
    """The cached local copy of `url`, downloading it first if needed (atomically)."""
    url = url.strip()
    dest = cache_path(url)
    if dest.is_file():
        return dest
    fix = (f"download it yourself with `curl -L -o {shlex.quote(str(dest))} {shlex.quote(url)}` "
           f"(that path is the cache, used from then on), or set {setting} = PATH to a local copy")

    def download(tmp: Path) -> None:
        with urlopen(Request(url, headers={"User-Agent": "minigpt"}), timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            done, t0 = 0, time.perf_counter()
            with open(tmp, "wb") as f:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        dt = time.perf_counter() - t0
                        progress(done, max(total, done), done / dt if dt > 0 else 0.0)
        if progress:
            progress(done, done, 0.0)

    try:
        atomic.write_with(dest, download)  # temp file, fsync, rename; a dead download's temp is removed
    except (URLError, OSError, TimeoutError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise MinigptError(f"cannot download {url} ({str(reason).splitlines()[0][:160]})", fix) from None
    return dest


def resolve(ref: str, setting: str = "data.source", progress=None) -> Path:
    """A local path for a URL (fetched into the cache) or a path given as is."""
    if is_url(ref):
        return fetch(ref, setting=setting, progress=progress)
    return Path(ref).expanduser()


# ---- the Hugging Face hub --------------------------------------------------------------------
def hub_command(repo: str, repo_type: str = "dataset", files: list | tuple = (), local_dir: str = "PATH") -> str:
    parts = ["hf", "download"]
    if repo_type != "model":
        parts += ["--repo-type", repo_type]
    parts.append(repo)
    for f in files or ():
        parts += ["--include", f]
    parts += ["--local-dir", local_dir]
    return " ".join(shlex.quote(p) if p != "PATH" else p for p in parts)


def hub_unavailable(repo: str, repo_type: str = "dataset", files: list | tuple = (), setting: str = "data.source",
                    reason: str = "") -> MinigptError:
    what = "dataset" if repo_type == "dataset" else "model"
    why = "not available offline" if hub_offline() or not reason else f"not reachable ({reason})"
    return MinigptError(f"{what} {repo} is {why}",
                        f"download it with `{hub_command(repo, repo_type, files)}` and set {setting} = PATH")


def _tqdm_forwarder(progress):
    """A tqdm class that draws nothing and forwards byte counts to `progress`."""
    from tqdm.auto import tqdm

    state = {"done": 0, "total": 0, "t0": time.perf_counter()}

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._bytes = kwargs.get("unit") == "B"

        def update(self, n=1):
            if self._bytes and progress and n:
                state["done"] += n
                state["total"] = max(state["total"], int(self.total or 0), state["done"])
                dt = time.perf_counter() - state["t0"]
                progress(state["done"], state["total"], state["done"] / dt if dt > 0 else 0.0)
            return super().update(n)

    return Forward


def hub_snapshot(repo: str, repo_type: str = "dataset", allow_patterns: list | None = None,
                 setting: str = "data.source", progress=None, revision: str | None = None) -> Path:
    """Download (or find in the HF cache) a hub repo's files; the local snapshot folder."""
    from huggingface_hub import snapshot_download

    kwargs = {"repo_type": repo_type, "allow_patterns": list(allow_patterns) if allow_patterns else None,
              "revision": revision or None}
    if progress:
        kwargs["tqdm_class"] = _tqdm_forwarder(progress)
    try:
        path = Path(snapshot_download(repo, **kwargs))
    except Exception as e:  # LocalEntryNotFoundError, connection errors, RepositoryNotFoundError...
        name = type(e).__name__
        if "NotFound" in name and "LocalEntry" not in name or "GatedRepo" in name:
            raise MinigptError(f"{repo_type} {repo} cannot be downloaded ({name}: {str(e).splitlines()[0][:160]})",
                               "check the id and your access to it (HF token for gated repos)") from None
        files = (allow_patterns or ()) if repo_type == "dataset" else ()  # a model's patterns are ours, not the user's
        raise hub_unavailable(repo, repo_type, files, setting, reason="" if hub_offline() else f"{name}") from None
    if allow_patterns and not any(p.is_file() for p in path.rglob("*")):
        raise MinigptError(f"{repo_type} {repo} has no files matching {', '.join(allow_patterns)}",
                           f"check {setting.rsplit('.', 1)[0]}.files")
    return path


def is_hub_id(source: str) -> bool:
    """org/name that is not a local path, URL, GGUF file or embedded model."""
    s = source.strip()
    return (s.count("/") == 1 and not s.startswith((".", "/", "~", "embedded:", "builtin:")) and not is_url(s)
            and not s.lower().endswith(".gguf") and not Path(s).expanduser().exists())


def model_snapshot(repo: str, progress=None) -> Path:
    """Fetch a hub model's config, tokenizer and weights (one weight format) into the HF cache,
    where `from_pretrained(repo)` then finds them; offline, check that they are there."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:  # already in the HF cache: no network needed
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        if hub_offline():
            raise hub_unavailable(repo, "model", setting="model.source") from None
    try:
        files = list_repo_files(repo)
    except Exception as e:
        raise hub_unavailable(repo, "model", setting="model.source", reason=type(e).__name__) from None
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
    return hub_snapshot(repo, "model", ["*.json", weights, "*.model", "*.txt", "*.tiktoken", "*.py"],
                        "model.source", progress)
