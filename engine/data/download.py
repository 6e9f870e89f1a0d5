"""Fetching what presets name: files by URL and dataset/model repos from the Hugging Face hub.

URL downloads land once in the minigpt cache (`<cache>/downloads/<host>/<path>`) and are
read from there ever after, so a grid re-run or an offline machine never fetches twice.
Each is checked against its pin (the preset table's sha256, or `#sha256=HEX` on a URL): a
mismatch is one line and leaves no file. The transfer is pooch's HTTP downloader (requests);
pooch retries from zero and cannot resume, so the retry loop (exponential backoff) and the
resume are here: the bytes so far are kept in `.<name>.part` beside the cached file and the
next attempt, or the next run, asks for the rest with `Range: bytes=N-`. The partial file is
the one write outside `engine.atomic` (it must survive a failure); the finished file goes in
through `atomic.write_with`.
Every failure is one `MinigptError` that says what to download and where to put it:
machines without network (GPU boxes behind a firewall, CI) are the common case, not an
edge. Torch-free.

`progress(done, total, rate)` callbacks match `Reporter.progress_fn`, so downloads show
up as events in a run and as a rich bar in the CLI.
"""

from __future__ import annotations

import hashlib
import contextlib
import os
import re
import shlex
import time
from pathlib import Path
from urllib.parse import urlparse

from engine import atomic, presets
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


# ---- URLs: pinned, retried, resumed --------------------------------------------------------------
RETRIES = 4  # attempts after the first
BACKOFF = 1.0  # seconds before the first retry; doubled each time, at most BACKOFF_MAX
BACKOFF_MAX = 30.0
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_PIN_ALGOS = ("sha256", "git-sha1")


class _Transient(Exception):
    """A failure worth another attempt: the transfer ended short, or the server's range was wrong."""


def partial_path(dest: Path) -> Path:
    """Where a download in progress keeps its bytes, beside the cached file: kept across failed
    attempts and processes, so the next attempt resumes it with an HTTP Range request."""
    return dest.parent / f".{dest.name}.part"


def split_pin(url: str) -> tuple[str, str]:
    """`https://host/f.csv#sha256=HEX` -> (`https://host/f.csv`, `sha256:HEX`): a pin in a config."""
    base, _, frag = url.partition("#")
    m = re.fullmatch(r"(sha256|git-sha1)[=:]([0-9a-fA-F]+)", frag.strip())
    return (base, f"{m[1]}:{m[2].lower()}") if m else (url, "")


def check_pin(url: str, setting: str = "data.source") -> None:
    """Raise the one-line error for a malformed `#sha256=` pin now, before any download."""
    base, pin = split_pin(url)
    if pin:
        _norm_pin(pin, base, setting)


def _norm_pin(pin: str, url: str = "", setting: str = "data.source") -> str:
    pin = (pin or "").strip().lower()
    if not pin:
        return ""
    algo, _, hexd = pin.rpartition(":")
    algo = algo or "sha256"
    if algo not in _PIN_ALGOS or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", hexd):
        raise MinigptError(f"bad pin {pin!r}" + (f" for {url}" if url else ""),
                           f"write {setting} = URL#sha256=<64 hex digits> (or git-sha1:<40 hex digits>)")
    return f"{algo}:{hexd}"


def file_digest(path: Path, algo: str = "sha256") -> str:
    """sha256 of a file's bytes, or git-sha1: the id git gives the file as a blob."""
    h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def matches(path: Path, pin: str) -> bool:
    algo, _, hexd = pin.partition(":")
    return file_digest(path, algo) == hexd


class _Lock:
    """One downloader per cached file (flock, released if the process dies): a second waits,
    then finds the file there."""

    def __init__(self, path: Path, done: Path | None = None):
        self.path, self.done = path, done

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        # once the file is in place (or nothing is left to resume) the lock has no more use: a waiter
        # holding the old one finds the file or starts afresh. It stays with a partial it guards.
        partial = self.done and self.done.parent / f".{self.done.name}.part"
        if self.done is not None and (self.done.is_file() or not partial.exists()):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)


def fetch(url: str, setting: str = "data.source", progress=None, timeout: float = 60.0, pin: str = "",
          retries: int | None = None, backoff: float | None = None) -> Path:
    """The cached local copy of `url`, downloading it first if needed.

    The file is checked against `pin` (`sha256:HEX`, `git-sha1:HEX` or a bare sha256), by
    default the preset table's pin for the URL or a `#sha256=HEX` fragment on it. A cached
    copy is used without the network; a pinned one only if its bytes match (otherwise it is
    fetched again). Failures are retried `retries` times with exponential backoff, each retry
    resuming the partial file; a mismatch leaves no file behind."""
    url, frag_pin = split_pin(url.strip())
    pin = _norm_pin(pin or frag_pin or presets.pin(url), url, setting)
    dest = cache_path(url)
    if dest.is_file() and (not pin or matches(dest, pin)):
        return dest
    fix = (f"download it yourself with `curl -L -o {shlex.quote(str(dest))} {shlex.quote(url)}` "
           f"(that path is the cache, used from then on), or set {setting} = PATH to a local copy")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(dest.parent / f".{dest.name}.lock", done=dest):
        if dest.is_file():
            if not pin or matches(dest, pin):
                return dest
            dest.unlink()  # cached before the pin, or changed on disk: fetched again
        return _download(url, dest, pin, setting, fix, progress, timeout,
                         RETRIES if retries is None else retries, BACKOFF if backoff is None else backoff)


def _download(url: str, dest: Path, pin: str, setting: str, fix: str, progress, timeout: float, retries: int,
              backoff: float) -> Path:
    import requests

    part = partial_path(dest)
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), BACKOFF_MAX))
        resumed = part.stat().st_size if part.is_file() else 0
        expect: dict = {}
        try:
            _attempt(url, part, progress, timeout, expect)
        except _Transient as e:
            last = str(e)
            continue
        except requests.exceptions.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            if code == 416:  # the partial is no prefix of what the server has now: start again
                _discard(part)
            if code == 416 or code in _RETRY_STATUS:
                last = f"HTTP {code}"
                continue
            _discard(part)
            raise MinigptError(f"cannot download {url} (HTTP {code})", fix) from None
        except requests.exceptions.RequestException as e:
            last = _reason(e)
            continue
        except OSError as e:
            if atomic.is_disk_full(e):  # the partial stays: the next try resumes it
                have = part.stat().st_size if part.is_file() else 0
                total = expect.get("total")
                raise atomic.DiskFull(part, total - have if total and total > have else CHUNK,
                                      atomic.free_bytes(part.parent)) from None
            raise MinigptError(f"cannot write {part} ({str(e).splitlines()[0][:160]})",
                               "check that the cache folder ($MINIGPT_CACHE) is writable") from None
        if pin and not matches(part, pin):
            algo = pin.split(":", 1)[0]
            got = file_digest(part, algo)
            _discard(part)
            if resumed:  # its start came from an earlier attempt, perhaps of older bytes: once more, whole
                last = "checksum mismatch after resuming"
                continue
            raise MinigptError(f"{url} does not match its pin ({pin[:20]}…, got {algo}:{got[:12]}…); no file kept",
                               f"the file changed upstream or in transit: check the URL, or set {setting} = PATH "
                               "to a copy you trust")
        atomic.write_with(dest, lambda tmp: os.replace(part, tmp))  # fsync and rename into place
        return dest
    size = part.stat().st_size if part.is_file() else 0
    if not size:
        _discard(part)
    kept = f"; {atomic.human_bytes(size)} kept, the next try resumes" if size else ""
    raise MinigptError(f"cannot download {url} after {retries + 1} attempts ({last[:160]}){kept}", fix)


def _reason(e: BaseException) -> str:
    inner = e.args[0] if e.args else e
    while getattr(inner, "reason", None) is not None and inner is not inner.reason:
        inner = inner.reason
    text = str(inner).splitlines()[0] if str(inner) else type(e).__name__
    return f"{type(e).__name__}: {text}"[:160]


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _attempt(url: str, part: Path, progress, timeout: float, expect: dict) -> None:
    """One request with pooch's HTTP downloader, appending to `part` from its current size
    (`Range: bytes=N-`); a server that ignores the range sends it all and the partial restarts."""
    from pooch import HTTPDownloader

    start = part.stat().st_size if part.is_file() else 0
    with open(part, "ab") as f:
        sink = _Sink(f, start, progress, expect)

        def on_response(resp, *args, **kwargs):
            if resp.status_code == 206:
                m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
                if not m or int(m[1]) != start:
                    resp.close()
                    raise _Transient(f"the server answered the range from byte {start} with "
                                     f"{resp.headers.get('Content-Range')!r}")
                expect["total"] = int(m[2]) if m[2] != "*" else None
            elif resp.status_code == 200:
                if start:  # range ignored: the whole file comes again
                    f.truncate(0)
                    sink.done = 0
                n = resp.headers.get("Content-Length")
                expect["total"] = int(n) if n and n.isdigit() and not resp.headers.get("Content-Encoding") else None
            return resp

        headers = {"User-Agent": "minigpt", "Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        HTTPDownloader(chunk_size=CHUNK, timeout=timeout, headers=headers,
                       hooks={"response": on_response})(url, sink, None)
        f.flush()
        os.fsync(f.fileno())
    size = part.stat().st_size
    total = expect.get("total")
    if total is not None and size != total:
        raise _Transient(f"the transfer ended at byte {size:,} of {total:,}")
    if progress:
        progress(size, size, 0.0)


class _Sink:
    """The file object pooch writes to: counts bytes and reports progress."""

    def __init__(self, f, done: int, progress, expect: dict):
        self.f, self.done, self.progress, self.expect = f, done, progress, expect
        self.t0, self.base = time.perf_counter(), done

    def write(self, b: bytes) -> int:
        n = self.f.write(b)
        self.done += len(b)
        if self.progress:
            dt = time.perf_counter() - self.t0
            total = self.expect.get("total") or self.done
            self.progress(self.done, max(total, self.done), (self.done - self.base) / dt if dt > 0 else 0.0)
        return n

    def flush(self) -> None:
        self.f.flush()


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
