"""The bad-input table of docs/results/reliability.md: every case, its command, its exit
status and its one-line message, measured by running the real `minigpt` CLI.

    .venv/bin/python scripts/reliability_cases.py [--out FILE] [--keep DIR]

Builds a workspace in a temp folder: a tiny random GPT-2 saved from a config
(tests/tiny.py), a seeded jsonl corpus (tests/ft_case.py), and one small TOML per case.
Nothing is downloaded (HF_HUB_OFFLINE=1). Almost every case fails before a model loads
(config checks and preflight), so the whole table takes about a minute; the two cases
that reach the detached runner load the tiny model. Read-only cases use a read-only bind
mount when run as root, else chmod. Download cases (B88-B93) fetch from an HTTP server this
script runs on a local socket (a 404, a server that always answers 503, a refused
connection, a checksum mismatch).

A case passes when the command exits non-zero (2: config/CLI, 1: found by the run) with
exactly one `error:` line that says a fix (" — "), and no traceback; informational cases
(exit 0) pass on their expected message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


@dataclass
class Case:
    id: str
    what: str
    args: list
    rc: int | None = None  # expected exit status (None: any non-zero)
    expect: str = ""  # a substring the message must hold
    setup: object = None  # callable(work) run before the command
    info: bool = False  # exit 0 with a message, not an error
    result: dict = field(default_factory=dict)


def toml_of(d: dict) -> str:
    import tomli_w

    return tomli_w.dumps(d)


def build(work: Path) -> dict:
    import ft_case
    import tiny

    model = tiny.save("gpt2", work / "model")
    data = ft_case.corpus(work / "data")
    base = {
        "seed": 3,
        "model": {"source": "model", "device": "cpu", "dtype": "float32"},
        "data": {"source": "data/corpus.jsonl"},
        "calibrate": {"block_size": 32, "max_tokens": 512, "batch_size": 2},
        "prune": {"mode": "structural", "rule": "ratio", "ratio": 0.3, "min_keep": 4},
        "finetune": {"enabled": False},
        "evaluate": {"block_size": 32, "max_tokens": 256, "batch_size": 4},
    }
    (work / "cfg").mkdir()
    (work / "cfg" / "small.toml").write_text(toml_of(base))
    return {"base": base, "model": model, "data": data}


def cfg(work: Path, name: str, **changes) -> str:
    """cfg/NAME.toml: the small config with `section__key=value` changes (None removes a key)."""
    import copy

    d = copy.deepcopy(json.loads((work / "base.json").read_text()))
    for k, v in changes.items():
        sec, key = k.split("__")
        d.setdefault(sec, {})
        if v is None:
            d[sec].pop(key, None)
        else:
            d[sec][key] = v
    path = work / "cfg" / f"{name}.toml"
    path.write_text(toml_of(d))
    return f"cfg/{name}.toml"


def raw(work: Path, name: str, text: str) -> str:
    path = work / "cfg" / name
    path.write_text(text)
    return f"cfg/{name}"


def session(work: Path, sid: str, root: str = "sessions", events: bool = True, status: str = "stopped") -> None:
    from engine import config as config_mod
    from engine.run import session as session_mod

    s = session_mod.create(config_mod.load(work / "cfg" / "small.toml"), work / root, name=sid)
    if events:
        w = s.writer()
        w.emit("run_start", pid=1, resumed=False, stages=list(session_mod.STAGES))
        w.emit("run_end", status=status)
        w.close()
    s.update_state(status=status)


@contextlib.contextmanager
def read_only(folder: Path):
    if os.geteuid() == 0 and subprocess.run(["mount", "--bind", str(folder), str(folder)]).returncode == 0:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    for p, m in modes.items():
        p.chmod(m & ~0o222)
    try:
        yield
    finally:
        for p, m in modes.items():
            p.chmod(m)


def serve(folder: Path) -> str:
    """An HTTP server on 127.0.0.1 for `folder`'s files; /busy/* always answers 503. Its base URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            p = folder / self.path.lstrip("/")
            code, body = (503, b"busy") if self.path.startswith("/busy/") else \
                (200, p.read_bytes()) if p.is_file() and ".." not in self.path else (404, b"not found")
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def closed_port() -> int:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def cases(work: Path) -> list[Case]:
    w = work
    d = w / "data"
    web = serve(d)
    import hashlib

    wrong = hashlib.sha256(b"not the corpus").hexdigest()
    (d / "garbage.txt").write_bytes(os.urandom(4096))
    (d / "garbage.jsonl").write_bytes(os.urandom(4096))
    (d / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me, na\u00efve\n".encode("latin-1") * 50)
    (d / "badline.jsonl").write_text('{"text": "one"}\n{"text": "two"\n')
    (d / "nocol.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    (d / "array.jsonl").write_text('["a", "b"]\n')
    (d / "wrong.csv").write_text("title,body\nx,y\n")
    (d / "fake.parquet").write_text("not parquet")
    (d / "empty.txt").write_text("")
    (d / "mixed").mkdir()
    (d / "mixed" / "a.txt").write_text("text")
    (d / "mixed" / "b.csv").write_text("text\nx\n")
    (d / "nofiles").mkdir()
    (d / "notjson.json").write_text("hello")
    (w / "notamodel").mkdir()
    (w / "notamodel" / "readme.md").write_text("hi")
    (w / "badjson").mkdir()
    (w / "badjson" / "config.json").write_text("{broken")
    (w / "unsupported").mkdir()
    (w / "unsupported" / "config.json").write_text('{"model_type": "bert"}')
    shutil.copy(w / "model" / "model.safetensors", w / "unsupported" / "model.safetensors")
    (w / "noweights").mkdir()
    shutil.copy(w / "model" / "config.json", w / "noweights" / "config.json")
    (w / "corrupt.gguf").write_bytes(os.urandom(1024))
    (w / "afile").write_text("x")
    (w / "ro").mkdir()
    session(w, "old", root="ro")
    session(w, "done", status="done")
    session(w, "stopped")
    session(w, "fresh", events=False, status="new")
    session(w, "nolog", status="stopped")
    (w / "sessions" / "nolog" / "events.jsonl").unlink()
    session(w, "badstate")
    (w / "sessions" / "badstate" / "state.json").write_text('{"status": "runn')
    session(w, "badcfg")
    (w / "sessions" / "badcfg" / "config.toml").write_text("name = [broken")
    (w / "sessions" / "stray").mkdir()
    (w / "sessions" / "stray" / "state.json").write_text("{}")
    grid_ok = ('[run.calibrate]\nblock_size = 32\nmax_tokens = 256\n[run.evaluate]\nblock_size = 32\n'
               'max_tokens = 256\n')
    dom = f'domains = [{{name = "c", source = "{d / "corpus.jsonl"}"}}]\n'
    C = Case
    small = "cfg/small.toml"
    return [
        # ---- the config file and --set
        C("B01", "missing config", ["run", "cfg/nonexistent.toml"], 2, "not found"),
        C("B02", "TOML syntax error", ["run", raw(w, "syntax.toml", "[prune\nratio = 0.3\n")], 2, "not valid TOML"),
        C("B03", "unknown key prune.ratoi", ["run", raw(w, "unknown.toml", "[prune]\nratoi = 0.3\n")], 2,
          "unknown config key prune.ratoi"),
        C("B04", "wrong type ratio = \"abc\"", ["run", cfg(w, "type", prune__ratio="abc")], 2, "wrong type"),
        C("B05", "ratio = 1.5", ["run", cfg(w, "r15", prune__ratio=1.5)], 2, "outside [0, 1)"),
        C("B06", "ratio = -0.1", ["run", cfg(w, "rneg", prune__ratio=-0.1)], 2, "outside [0, 1)"),
        C("B07", "unknown criterion", ["run", cfg(w, "crit", prune__criterion="bogus")], 2, "prune.criterion"),
        C("B08", "unknown allocation", ["run", cfg(w, "alloc", prune__allocation="bogus")], 2, "prune.allocation"),
        C("B09", "unknown compensation", ["run", cfg(w, "comp", prune__compensation="bogus")], 2,
          "prune.compensation"),
        C("B10", "unknown prune.mode", ["run", cfg(w, "mode", prune__mode="bogus")], 2, "prune.mode"),
        C("B11", "unknown prune.rule", ["run", cfg(w, "rule", prune__rule="bogus")], 2, "prune.rule"),
        C("B12", "calibrate.block_size = 0", ["run", cfg(w, "bs0", calibrate__block_size=0)], 2, "must be positive"),
        C("B13", "model.dtype unknown", ["run", cfg(w, "dtype", model__dtype="fp8")], 2, "model.dtype"),
        C("B14", "finetune.schedule unknown", ["run", cfg(w, "sched", finetune__schedule="step")], 2,
          "finetune.schedule"),
        C("B15", "data fractions sum above 1", ["run", cfg(w, "frac", data__calibrate_fraction=0.9)], 2,
          "data fractions"),
        C("B16", "finetune.lr = 0", ["run", cfg(w, "lr0", finetune__lr=0.0)], 2, "finetune.lr"),
        C("B17", "sequential with the threshold rule", ["run", cfg(w, "seq", prune__sequential=True,
                                                                   prune__rule="threshold")], 2, "sequential"),
        C("B18", "prune.min_keep = 0", ["run", cfg(w, "mk0", prune__min_keep=0)], 2, "min_keep"),
        C("B19", "calibrate.max_tokens below one block", ["run", cfg(w, "cal100", calibrate__block_size=256,
                                                                     calibrate__max_tokens=100)], 2,
          "set calibrate.max_tokens = 256"),
        C("B20", "evaluate.max_tokens below one block", ["run", cfg(w, "ev100", evaluate__block_size=256,
                                                                    evaluate__max_tokens=100)], 2,
          "evaluate.max_tokens = 100"),
        C("B21", "unknown model preset", ["run", cfg(w, "mpre", model__preset="gpt5")], 2, "unknown model preset"),
        C("B22", "unknown domain preset", ["run", cfg(w, "dpre", data__preset="law")], 2, "unknown domain preset"),
        C("B23", "bad evaluate.mcq_template", ["run", cfg(w, "tmpl", evaluate__mcq_template="Q: {q}")], 2,
          "mcq_template"),
        C("B24", "--set unknown section", ["run", small, "--set", "bogus.key=1"], 2, "unknown config section"),
        C("B25", "--set unknown key", ["run", small, "--set", "prune.bogus=1"], 2, "unknown config key prune.bogus"),
        C("B26", "--set without =", ["run", small, "--set", "prune.ratio"], 2, "has no '='"),
        C("B27", "--set path too deep", ["run", small, "--set", "prune.ratio.x=1"], 2, "unknown config section"),
        C("B28", "--set bad value", ["run", small, "--set", "prune.ratio=abc"], 2, "wrong type"),
        C("B29", "--set top-level unknown", ["run", small, "--set", "ratio=0.5"], 2, "unknown config key ratio"),
        C("B30", "--set a section to a scalar", ["run", small, "--set", "prune=1"], 2, "must be a table"),
        # ---- preflight: the model
        C("B31", "model path not found", ["run", small, "--set", "model.source=./no/such/model"], 2, "not found"),
        C("B32", "model folder without config.json", ["run", small, "--set", "model.source=notamodel"], 2,
          "no config.json"),
        C("B33", "model config.json not JSON", ["run", small, "--set", "model.source=badjson"], 2, "not valid JSON"),
        C("B34", "unsupported architecture", ["run", small, "--set", "model.source=unsupported"], 2,
          "'bert' is not supported"),
        C("B35", "model folder without weights", ["run", small, "--set", "model.source=noweights"], 2,
          "holds no weights"),
        C("B36", "corrupt .gguf (random bytes)", ["run", small, "--set", "model.source=corrupt.gguf"], 2,
          "not a GGUF file"),
        C("B37", ".gguf file missing", ["run", small, "--set", "model.source=missing.gguf"], 2, "not found"),
        C("B38", "hub id not in the cache, offline", ["run", small, "--set", "model.source=nonexistent-org/no-model"],
          2, "not available offline"),
        C("B39", "misspelt model name", ["run", small, "--set", "model.source=smolm2"], 2, "not a preset either"),
        C("B40", "unknown embedded model", ["run", small, "--set", "model.source=embedded:llama"], 2,
          "not an embedded model"),
        # ---- preflight: the data
        C("B41", "data file missing", ["run", small, "--set", "data.source=./data/missing.txt"], 2, "not found"),
        C("B42", "unknown built-in corpus", ["run", small, "--set", "data.source=builtin:wiki"], 2,
          "not a built-in corpus"),
        C("B43", "binary garbage .txt", ["run", small, "--set", "data.source=data/garbage.txt"], 2, "is binary"),
        C("B44", "binary garbage .jsonl", ["run", small, "--set", "data.source=data/garbage.jsonl"], 2, "is binary"),
        C("B45", "Latin-1 text", ["run", small, "--set", "data.source=data/latin1.txt"], 2, "not UTF-8"),
        C("B46", "jsonl with a broken line", ["run", small, "--set", "data.source=data/badline.jsonl"], 2,
          "line 2 of"),
        C("B47", "jsonl without the column", ["run", small, "--set", "data.source=data/nocol.jsonl"], 2,
          "no column 'text'"),
        C("B48", "jsonl of arrays", ["run", small, "--set", "data.source=data/array.jsonl"], 2, "not an object"),
        C("B49", "CSV with the wrong column", ["run", small, "--set", "data.source=data/wrong.csv"], 2,
          "header row"),
        C("B50", "parquet that is not parquet", ["run", small, "--set", "data.source=data/fake.parquet"], 2,
          "not a parquet file"),
        C("B51", ".json that is not JSON", ["run", small, "--set", "data.source=data/notjson.json"], 2, "not JSON"),
        C("B52", "folder of mixed file types", ["run", small, "--set", "data.source=data/mixed"], 2, "mixed"),
        C("B53", "folder without data files", ["run", small, "--set", "data.source=data/nofiles"], 2,
          "no data files"),
        C("B54", "template column missing", ["run", small, "--set", "data.template={en} {zh}"], 2, "no column 'en'"),
        C("B55", "MCQ file missing", ["run", small, "--set", "evaluate.mcq_files=[\"q/none.json\"]"], 2,
          "MCQ file q/none.json not found"),
        C("B56", "finetune.block_size above the context", ["run", small, "--set", "finetune.enabled=true",
                                                           "--set", "finetune.block_size=4096"], 2,
          "exceeds the model's context"),
        # ---- preflight: the sessions root
        C("B57", "read-only sessions root", ["run", small, "--root", "ro"], 2, "is not writable"),
        C("B58", "sessions root is a file", ["run", small, "--root", "afile"], 2, "not writable"),
        # ---- sessions
        C("B59", "resume a session that does not exist", ["resume", "does-not-exist"], 2, "no session"),
        C("B60", "resume /etc", ["resume", "/etc"], 2, "is not a minigpt session"),
        C("B61", "resume ../../etc", ["resume", "../../etc"], 2, "no session"),
        C("B62", "resume a folder with only state.json", ["resume", "stray"], 2, "config.toml is missing"),
        C("B63", "resume with corrupt state.json", ["resume", "badstate"], 2, "not valid JSON"),
        C("B64", "resume with a corrupt config.toml", ["resume", "badcfg"], 2, "is corrupt"),
        C("B65", "resume a read-only session", ["resume", "old", "--root", "ro"], 2, "is not writable"),
        C("B66", "stop a read-only session", ["stop", "old", "--root", "ro"], 0, "is not running", info=True),
        C("B67", "logs of a read-only session", ["logs", "old", "--root", "ro"], 0, "run stopped", info=True),
        C("B68", "resume a done session", ["resume", "done"], 0, "already done", info=True),
        C("B69", "stop a finished session", ["stop", "stopped"], 0, "not running (stopped)", info=True),
        C("B70", "logs of a session that does not exist", ["logs", "does-not-exist"], 2, "no session"),
        C("B71", "logs of a session never run", ["logs", "fresh"], 0, "no events yet", info=True),
        C("B72", "logs of a session whose events.jsonl is gone", ["logs", "nolog"], 1, "events.jsonl is missing"),
        C("B73", "prune a session that does not exist", ["prune", "does-not-exist"], 2, "no session"),
        C("B74", "eval with an invalid --set", ["eval", "stopped", "--set", "prune.ratio=2"], 2, "outside [0, 1)"),
        # ---- grid and sweep
        C("B75", "grid file missing", ["grid", "cfg/nonexistent.toml"], 2, "not found"),
        C("B76", "grid unknown key", ["grid", raw(w, "g-key.toml", "bogus = 1\n")], 2, "unknown grid key bogus"),
        C("B77", "grid with a misspelt model (18 cells)",
          ["grid", raw(w, "g-typo.toml", 'models = ["nosuchmodel"]\n' + dom + grid_ok), "--out", "grids/typo"], 2,
          "nosuchmodel"),
        C("B78", "grid unknown method", ["grid", raw(w, "g-meth.toml", 'methods = ["prune"]\n' + dom + grid_ok)], 2,
          "grid method"),
        C("B79", "grid bad thresholds", ["grid", raw(w, "g-thr.toml", 'thresholds = 3\n' + dom + grid_ok)], 2,
          "thresholds"),
        C("B80", "grid cell with a missing data file",
          ["grid", raw(w, "g-data.toml", f'models = ["{w / "model"}"]\ndomains = ["./data/nope.jsonl"]\n'
                                          'thresholds = [{activation = 0.1}]\n' + grid_ok), "--out", "grids/d"], 2,
          "not found"),
        C("B81", "sweep unknown criterion", ["sweep", small, "--criteria", "bogus", "--out", "sw"], 2,
          "sweep criteria"),
        C("B82", "sweep bad ratios", ["sweep", small, "--ratios", "abc", "--out", "sw"], 2, "bad --ratios"),
        C("B83", "sweep ratio 1.5", ["sweep", small, "--ratios", "1.5", "--out", "sw"], 2, "fractions"),
        C("B84", "sweep on a garbage corpus", ["sweep", small, "--calibrate-on", "data/garbage.txt", "--out", "sw"],
          2, "is binary"),
        C("B85", "check a config with three problems",
          ["check", small, "--set", "model.source=nomodel/x", "--set", "data.source=./nodata.txt",
           "--set", "evaluate.mcq_files=[\"./noq.json\"]"], 2, ""),
        # ---- found by the detached run (the tiny model loads)
        C("B86", "threshold that empties a layer", ["run", small, "--set", "prune.rule=threshold",
                                                    "--set", "prune.activation_threshold=1e9"], 1,
          "would leave layer 0"),
        C("B87", "empty data file", ["run", small, "--set", "data.source=data/empty.txt"], 1, "is empty"),
        # ---- downloads (a local HTTP server): found by the detached run, or by grid's prefetch
        C("B88", "data URL that is not there (404)", ["run", small, "--set", f"data.source={web}/nope.jsonl"], 1,
          "(HTTP 404)"),
        C("B89", "data URL whose server answers 503 (5 attempts, backoff 1+2+4+8 s)",
          ["run", small, "--set", f"data.source={web}/busy/corpus.jsonl"], 1, "after 5 attempts (HTTP 503)"),
        C("B90", "data URL, connection refused", ["run", small, "--set",
                                                  f"data.source=http://127.0.0.1:{closed_port()}/corpus.jsonl"], 1,
          "after 5 attempts (ConnectionError"),
        C("B91", "data URL with a sha256 pin it does not match",
          ["run", small, "--set", f"data.source={web}/corpus.jsonl#sha256={wrong}"], 1, "does not match its pin"),
        C("B92", "data URL with a malformed pin (preflight, before a session exists)",
          ["run", small, "--set", f"data.source={web}/corpus.jsonl#sha256=12"], 2, "bad pin"),
        C("B93", "grid whose MCQ URL is not there",
          ["grid", raw(w, "g-mcq.toml", f'models = ["{w / "model"}"]\n' + dom + 'thresholds = [{activation = 0.1}]\n'
                       + grid_ok + f'mcq_files = ["{web}/q.json"]\n'), "--out", "grids/m"], 2, "(HTTP 404)"),
    ]


def run_case(c: Case, work: Path, env: dict) -> None:
    t0 = time.monotonic()
    with (read_only(work / "ro") if "ro" in c.args else contextlib.nullcontext()):
        r = subprocess.run([sys.executable, "-m", "minigpt_tui.cli", *c.args], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    secs = time.monotonic() - t0
    out = r.stdout + r.stderr
    errs = [l for l in (r.stderr + "\n" + r.stdout).splitlines() if l.startswith("error: ")]
    tb = "Traceback" in out
    if c.info:
        msg = next((l for l in r.stdout.splitlines()[::-1] if c.expect in l), r.stdout.strip().splitlines()[-1:] or [""])
        msg = msg if isinstance(msg, str) else msg[0] if msg else ""
        ok = r.returncode == (c.rc or 0) and c.expect in out and not tb
    else:
        msg = " / ".join(errs) if errs else (r.stderr.strip().splitlines() or [""])[-1]
        ok = (r.returncode != 0 and (c.rc is None or r.returncode == c.rc) and not tb
              and (len(errs) == 1 or c.id == "B85") and all(" — " in e for e in errs) and c.expect in msg)
    c.result = {"rc": r.returncode, "tb": tb, "msg": msg, "ok": ok, "secs": round(secs, 2), "errors": len(errs)}


def table(cs: list[Case]) -> str:
    lines = ["| ID | case | command | rc | s | tb | message (exactly as printed) | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cs:
        r = c.result
        cmd = "minigpt " + " ".join(a if " " not in a and a else f"'{a}'" for a in c.args)
        msg = r["msg"].replace("|", "\\|")
        lines.append(f"| {c.id} | {c.what} | `{cmd}` | {r['rc']} | {r['secs']:.1f} | {'yes' if r['tb'] else 'no'} | "
                     f"{msg} | {'PASS' if r['ok'] else '**FAIL**'} |")
    n = sum(c.result["ok"] for c in cs)
    lines += ["", f"{n}/{len(cs)} cases pass (one `error:` line with a fix and the expected exit status, no "
                  "traceback; informational cases: exit 0 with their message)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None, help="write the table here (default: stdout)")
    ap.add_argument("--keep", type=Path, default=None, help="build the workspace here and keep it")
    ap.add_argument("--only", default="", help="comma list of case IDs to run (default: all)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="minigpt-cases-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)
    info = build(work)
    (work / "base.json").write_text(json.dumps(info["base"]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MINIGPT_SESSIONS": str(work / "sessions"), "OMP_NUM_THREADS": "1",
           "MINIGPT_CACHE": str(work / "cache"), "COLUMNS": "200", "NO_PROXY": "127.0.0.1,localhost",
           "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    cs = cases(work)
    if args.only:
        cs = [c for c in cs if c.id in args.only.split(",")]
    for c in cs:
        run_case(c, work, env)
        print(f"{c.id} rc={c.result['rc']} {c.result['secs']:5.1f}s {'ok ' if c.result['ok'] else 'BAD'} "
              f"{c.result['msg'][:150]}", file=sys.stderr, flush=True)
    text = table(cs)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(c.result["ok"] for c in cs) else 1


if __name__ == "__main__":
    sys.exit(main())
