"""Safe downloads (#17 item 8) against a real HTTP server on a local socket: retry with
backoff, resume of a partial file (HTTP Range), sha256 pins that leave no file behind on a
mismatch, the cached copy used offline, and a pin for every preset URL."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine import presets
from engine.data import download
from engine.errors import MinigptError

PAPER_FILE = Path(__file__).parent / "data" / "paper_mcq" / "basic_economics_dataset.json"  # MIT, tval2 (LICENSE)


class Server:
    """A local HTTP server for one file. `fail_first` requests answer `fail_status`; `drop_first`
    requests send the full Content-Length but only `drop_at` bytes, then close; `ranges`
    says whether it honours `Range: bytes=N-`. Every request is logged (Range header, status)."""

    def __init__(self, body: bytes, fail_first: int = 0, fail_status: int = 503, drop_first: int = 0,
                 drop_at: int = 0, ranges: bool = True, name: str = "file.json"):
        self.body, self.fail_first, self.fail_status = body, fail_first, fail_status
        self.drop_first, self.drop_at, self.ranges = drop_first, drop_at, ranges
        self.log: list[tuple[str | None, int]] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                n = len(srv.log)
                rng = self.headers.get("Range")
                if self.path != "/" + name:
                    return self._send(404, b"not found", rng)
                if n < srv.fail_first:
                    return self._send(srv.fail_status, b"busy", rng)
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if srv.ranges and m:
                    start = int(m[1])
                    if start >= len(srv.body):
                        return self._send(416, b"", rng)
                data = srv.body[start:]
                srv.log.append((rng, 206 if start else 200))
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(srv.body) - 1}/{len(srv.body)}")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                if n < srv.fail_first + srv.drop_first:
                    self.wfile.write(data[:srv.drop_at])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def _send(self, code, payload, rng):
                srv.log.append((rng, code))
                self.send_response(code)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)


def _body(n: int = 300_000) -> bytes:
    return bytes((i * 7 + i // 256) % 256 for i in range(n))


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _leftovers(url: str) -> list[str]:
    folder = download.cache_path(url).parent
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.is_dir() else []


def test_plain_download_is_cached_and_used_offline():
    body = _body()
    with Server(body) as srv:
        seen = []
        path = download.fetch(srv.url, pin=_sha(body), progress=lambda d, t, r: seen.append((d, t)))
        url = srv.url
    assert path.read_bytes() == body and path == download.cache_path(url)
    assert seen[-1] == (len(body), len(body)) and len(seen) > 2  # progress as bytes arrive
    assert _leftovers(url) == [path.name]
    # the server is gone: the cached copy (its pin checked) is what fetch returns
    assert download.fetch(url, pin=_sha(body), retries=0) == path


def test_failed_requests_are_retried_with_backoff():
    body = _body(50_000)
    with Server(body, fail_first=3, fail_status=503) as srv:
        t0 = time.perf_counter()
        path = download.fetch(srv.url, pin=_sha(body), retries=4, backoff=0.05)
        waited = time.perf_counter() - t0
        log = list(srv.log)
    assert path.read_bytes() == body
    assert [code for _, code in log] == [503, 503, 503, 200]
    assert waited >= 0.05 + 0.1 + 0.2  # backoff doubles: 0.05, 0.1, 0.2 s before attempts 2-4


def test_retries_give_up_with_one_line_and_no_file():
    with Server(b"x", fail_first=99, fail_status=503) as srv:
        with pytest.raises(MinigptError) as e:
            download.fetch(srv.url, retries=2, backoff=0.01)
        assert len(srv.log) == 3
        url = srv.url
    line = e.value.line()
    assert "\n" not in line and "after 3 attempts (HTTP 503)" in line and "curl -L -o" in line
    assert _leftovers(url) == []


def test_not_found_fails_at_once_without_retrying():
    with Server(b"x") as srv:
        with pytest.raises(MinigptError, match=r"HTTP 404"):
            download.fetch(srv.url.replace("file.json", "nope.json"), retries=3, backoff=0.01)
        assert len(srv.log) == 1


def test_a_dropped_connection_resumes_from_the_partial_file():
    body = _body()
    cut = 123_457
    with Server(body, drop_first=1, drop_at=cut) as srv:
        path = download.fetch(srv.url, pin=_sha(body), retries=2, backoff=0.01)
        log = list(srv.log)
    assert path.read_bytes() == body
    assert log[0] == (None, 200) and len(log) == 2
    # asked only for the rest: from what reached the disk (the last short chunk may be lost with the socket)
    start = int(re.fullmatch(r"bytes=(\d+)-", log[1][0])[1])
    assert 0 < start <= cut and log[1][1] == 206


def test_a_partial_file_left_by_a_failed_run_is_resumed_by_the_next():
    body = _body()
    cut = 100_000
    with Server(body, drop_first=1, drop_at=cut) as srv:
        with pytest.raises(MinigptError) as e:
            download.fetch(srv.url, pin=_sha(body), retries=0)
        part = download.partial_path(download.cache_path(srv.url))
        kept = part.stat().st_size
        assert 0 < kept <= cut and part.read_bytes() == body[:kept]
        assert "kept, the next try resumes" in e.value.line()
        path = download.fetch(srv.url, pin=_sha(body), retries=0)
        log = list(srv.log)
    assert path.read_bytes() == body and not part.exists()
    assert log[-1] == (f"bytes={kept}-", 206)


def test_a_server_that_ignores_range_restarts_the_file_cleanly():
    body = _body()
    with Server(body, drop_first=1, drop_at=77_777, ranges=False) as srv:
        path = download.fetch(srv.url, pin=_sha(body), retries=1, backoff=0.01)
        log = list(srv.log)
    assert path.read_bytes() == body  # not the first 77,777 bytes twice
    assert re.fullmatch(r"bytes=\d+-", log[1][0]) and log[1][1] == 200  # asked for the rest, got it all


def test_sha256_mismatch_is_one_line_and_leaves_no_file():
    body = _body(40_000)
    with Server(body) as srv:
        with pytest.raises(MinigptError) as e:
            download.fetch(srv.url, pin=_sha(body + b"!"), retries=3, backoff=0.01)
        assert len(srv.log) == 1  # a whole transfer that does not match is not retried
        url = srv.url
    line = e.value.line()
    assert "\n" not in line and "does not match its pin" in line and "no file kept" in line
    assert _leftovers(url) == []  # neither the file, nor its partial, nor an atomic temp


def test_pin_in_a_url_fragment_and_a_stale_cached_copy():
    old, new = _body(10_000), _body(12_000)
    with Server(new) as srv:
        dest = download.cache_path(srv.url)
        dest.parent.mkdir(parents=True)
        dest.write_bytes(old)  # cached before the pin: fetched again
        path = download.fetch(srv.url + "#sha256=" + hashlib.sha256(new).hexdigest(), retries=0)
        assert path == dest and path.read_bytes() == new
        with pytest.raises(MinigptError, match="bad pin"):
            download.fetch(srv.url, pin="sha256:1234")


def test_every_preset_url_has_a_pin():
    urls = [m.url for m in presets.MCQ_SETS] + [d.source for d in presets.DOMAINS if d.needs == "url"]
    assert len(urls) == 6
    for url in urls:
        pin = presets.pin(url)
        assert re.fullmatch(r"sha256:[0-9a-f]{64}|git-sha1:[0-9a-f]{40}", pin), url
    assert all(presets.pin(m.url).startswith("sha256:") for m in presets.MCQ_SETS)


def test_the_real_pinned_file_passes_and_one_changed_byte_fails():
    """A served copy of the paper's economics question set (its bytes at PAPER_COMMIT) passes
    the preset pin; the same file with one byte changed is refused and nothing is kept."""
    real = PAPER_FILE.read_bytes()
    url = presets.mcq("economics").url
    assert presets.pin(url) == _sha(real)
    assert download.file_digest(PAPER_FILE, "git-sha1") == "0b51ba420ffa8b53bae318dbe4defdb088d00fd3"  # git's id
    with Server(real) as srv:
        pin = presets.pin(url)  # the preset's own pin, checked on the copy served here
        path = download.fetch(srv.url, pin=pin, retries=0)
        assert path.read_bytes() == real
        path.unlink()
        bad = bytearray(real)
        bad[len(bad) // 2] ^= 1
        srv.body = bytes(bad)
        with pytest.raises(MinigptError, match="does not match its pin"):
            download.fetch(srv.url, pin=pin, retries=0)
        assert _leftovers(srv.url) == []
    assert download.presets.pin(srv.url) == ""  # an unpinned URL is fetched as it comes


def test_a_full_disk_while_downloading_is_one_line_and_the_partial_is_resumed(tmp_path, monkeypatch):
    """A real 256 KiB tmpfs as the cache, a 600 KB file: DiskFull names the partial, the bytes
    still to come and what is free; with room again, the next fetch resumes the partial."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:120]}): needs root in a container that allows it")
    body = _body(600_000)
    try:
        monkeypatch.setenv("MINIGPT_CACHE", str(disk))
        with Server(body) as srv:
            with pytest.raises(download.atomic.DiskFull) as e:
                download.fetch(srv.url, pin=_sha(body), retries=2, backoff=0.01)
            assert len(srv.log) == 1  # a full disk is not retried
            part = download.partial_path(download.cache_path(srv.url))
            kept = part.stat().st_size
            line = e.value.line()
            assert "\n" not in line and line.startswith(f"disk full writing {part}: it needs at least ")
            assert f"({len(body) - kept:,} bytes)" in line and 0 < kept < len(body)
            subprocess.run(["mount", "-o", "remount,size=2m", str(disk)], check=True)  # room again
            path = download.fetch(srv.url, pin=_sha(body), retries=0)
            assert path.read_bytes() == body and srv.log[-1] == (f"bytes={kept}-", 206)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
