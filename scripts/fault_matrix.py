"""The fault matrix and the load test of docs/results/reliability.md, on a tiny model.

    .venv/bin/python scripts/fault_matrix.py [--trials 3] [--seed 0] [--out FILE]

Fault matrix: for each stage of the run (baseline, teacher correction, calibrate, prune
including its model write, finetune by distillation, evaluate, the unpruned control), `--trials`
runs are killed with SIGKILL at a random point inside the stage, then resumed with
`python -m engine.run.runner SESSION`. The random point is a
random event the stage emits in the reference run (prune: the first trial always at "the
model's temp folder exists", i.e. mid-write) plus a random delay of 0-30 ms; the runner is frozen (SIGSTOP)
first, and the kill counts only if the stage had not ended by then (else the trial is
drawn again). Every resumed run is compared with one uninterrupted run of the same config:
every metric in results.json exactly (timings excluded), the training loss of every step,
and the sha256 of model/model.safetensors. Export (`minigpt export SESSION --format gguf
--quant q8_0`, a command of its own on a finished session) is killed the same way, at a random
moment of the reference export's duration (the first trial while its temp file exists), then
run again: the GGUF file's sha256 must equal the uninterrupted export's, and no temp is left.

Load test: 3 sessions that share model, corpus and calibration (so they also race for one
calibration-cache entry) but prune 20/30/50%, started at once, each with its own runner,
against the same three run one at a time: results identical, and no session's events
name another's runner or session.

Tiny model: a random Llama built from a config (tests/tiny.py; Llama so that it exports to GGUF);
corpus: tests/ft_case.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

FAMILY = "llama"
_TIMING = ("seconds", "per_s")


def make_config(work: Path, ratio: float = 0.3):
    import ft_case

    return ft_case.config(work, FAMILY,
                          calibrate={"block_size": 32, "max_tokens": 2048, "batch_size": 2, "checkpoint_every": 4},
                          prune={"ratio": ratio},
                          finetune={"max_steps": 12, "eval_every": 4, "checkpoint_every": 3, "loss": "kd",
                                    "teacher_steps": 6, "control": True},
                          evaluate={"block_size": 32, "max_tokens": 1024, "batch_size": 2})


def env(cache: Path) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MINIGPT_CALIBRATION_CACHE=str(cache), HF_HUB_OFFLINE="1")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def start(sess, cache: Path) -> subprocess.Popen:
    log = open(sess.path / "runner.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "engine.run.runner", str(sess.path)], cwd=ROOT, env=env(cache),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: os.nice(5))


def outcome(sess) -> dict:
    """What must be identical: metrics (timings excluded), per-step losses, the model's hash."""
    from engine.run.events import read_events

    res = json.loads((sess.path / "results.json").read_text())
    metrics = {m: {k: v for k, v in vals.items() if not any(t in k for t in _TIMING)}
               for m, vals in res.get("models", {}).items()}
    losses = {}
    for e in read_events(sess.events_path):
        if e["type"] == "train":  # teacher, finetune and control steps; one redone after a kill must match
            losses[f"{e.get('stage', 'finetune')}:{e['step']}"] = e["loss"]
    return {"metrics": metrics, "losses": losses, "model_sha256": sha256(sess.model_dir / "model.safetensors"),
            "teacher_sha256": sha256(sess.path / "teacher" / "model.safetensors"), "status": sess.status()}


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def reference(work: Path, name: str, cfg, cache: Path):
    import ft_case

    s = ft_case.session(work, name, cfg)
    p = start(s, cache)
    p.wait(timeout=900)
    return s, outcome(s)


def trigger_events(events: list[dict], stage: str) -> list[dict]:
    inside, out = False, []
    for e in events:
        if e["type"] == "stage_start" and e.get("stage") == stage:
            inside = True
        elif e["type"] == "stage_end" and e.get("stage") == stage:
            break
        if inside:
            out.append({k: e[k] for k in ("type", "stage", "name", "step", "done") if k in e})
    return out


def matches(e: dict, pattern: dict) -> bool:
    return all(e.get(k) == v for k, v in pattern.items())


def kill_inside(work: Path, name: str, cfg, stage: str, pattern: dict | str, delay: float, cache: Path) -> dict:
    """Run until `pattern` (an event, or "model-temp"), wait `delay`, freeze, kill if still in `stage`."""
    import ft_case

    s = ft_case.session(work, name, cfg)
    tail = ft_case.Tail(s)
    p = start(s, cache)
    hit = None
    t0 = time.monotonic()
    while hit is None:
        if p.poll() is not None:
            return {"killed": False, "why": "the run ended first", "session": s}
        if pattern == "model-temp":
            if any(q.name.startswith(".model.tmp") for q in s.path.iterdir()):
                hit = "model temp folder"
        else:
            for e in tail():
                if matches(e, pattern):
                    hit = pattern
                    break
        if time.monotonic() - t0 > 600:
            p.kill()
            return {"killed": False, "why": "timeout", "session": s}
        if hit is None:
            time.sleep(0.001)
    time.sleep(delay)
    os.kill(p.pid, signal.SIGSTOP)
    ended = any(e["type"] == "stage_end" and e.get("stage") == stage for e in tail())
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    if ended:
        return {"killed": False, "why": "stage ended before the kill", "session": s}
    temp = [q.name for q in s.path.iterdir() if ".tmp" in q.name]
    return {"killed": True, "at": hit, "session": s, "temps": temp,
            "status_after_kill": s.status()}


def fault_matrix(work: Path, trials: int, rng: random.Random, cache: Path) -> tuple[list[dict], dict]:
    from engine.run.events import read_events

    cfg = make_config(work)
    ref_s, ref = reference(work, "ref", cfg, cache / "ref")
    ref_events = read_events(ref_s.events_path)
    assert ref["status"] == "done", ref
    rows = []
    stages = [e["stage"] for e in ref_events if e["type"] == "stage_start"]
    for stage in dict.fromkeys(stages):
        pats = trigger_events(ref_events, stage)
        pats = [q for q in pats if q["type"] != "stage_end"] + (["model-temp"] * 3 if stage == "prune" else [])
        n = 0
        attempts = 0
        while n < trials and attempts < trials * 6:
            attempts += 1
            pat = "model-temp" if stage == "prune" and n == 0 else rng.choice(pats)  # one kill mid-write, always
            delay = rng.uniform(0, 0.03)
            name = f"{stage}-{n + 1}-a{attempts}"
            k = kill_inside(work, name, cfg, stage, pat, delay, cache / name)
            if not k["killed"]:
                continue
            s = k["session"]
            p = start(s, cache / name)  # resume: the runner's own entry point, as `minigpt resume` starts it
            p.wait(timeout=900)
            got = outcome(s)
            left = [q.name for q in s.path.iterdir() if ".tmp" in q.name]
            same = got == ref
            n += 1
            rows.append({"stage": stage, "trial": n, "at": k["at"] if isinstance(k["at"], str) else
                         " ".join(f"{a}={b}" for a, b in k["at"].items()), "delay_ms": round(delay * 1000, 1),
                         "after_kill": k["status_after_kill"], "temps_at_kill": k["temps"], "temps_after": left,
                         "resumed": got["status"], "identical": same,
                         "diff": "" if same else json.dumps({x: (got[x], ref[x]) for x in got if got[x] != ref[x]})[:300]})
            print(f"{stage} trial {n}: killed at {rows[-1]['at']} +{rows[-1]['delay_ms']} ms → "
                  f"{got['status']}, identical={same}", file=sys.stderr, flush=True)
    rows += export_matrix(work, ref_s, trials, rng)
    return rows, ref


def export_cmd(sess_path: Path) -> list[str]:
    return [sys.executable, "-m", "minigpt_tui.cli", "export", str(sess_path), "--format", "gguf", "--quant", "q8_0"]


def export_file(sess_path: Path) -> Path:
    return sess_path / "export" / f"{sess_path.name}-q8_0.gguf"


def export_temps(sess_path: Path) -> list[str]:
    d = sess_path / "export"
    return sorted(q.name for q in d.iterdir() if ".tmp" in q.name) if d.is_dir() else []


def run_export(sess_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(export_cmd(sess_path), cwd=ROOT, env=env(sess_path.parent), capture_output=True, text=True,
                          timeout=900)


def export_matrix(work: Path, ref_s, trials: int, rng: random.Random) -> list[dict]:
    """Kill `minigpt export` at random moments, run it again; the file must equal the uninterrupted export's."""
    def copy(name: str) -> Path:  # a copy of the finished reference session, under its own id "ref"
        dst = work / "exports" / name / ref_s.path.name
        shutil.copytree(ref_s.path, dst, ignore=shutil.ignore_patterns("export", "*checkpoints"))
        return dst

    ref_path = copy("ref")
    t0 = time.monotonic()
    r = run_export(ref_path)
    duration = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    want = sha256(export_file(ref_path))
    rows, n, attempts = [], 0, 0
    while n < trials and attempts < trials * 6:
        attempts += 1
        mid_write = n == 0  # the first trial always while the temp file exists
        delay = rng.uniform(0, 0.03) if mid_write else rng.uniform(0, duration)
        path = copy(f"export-{n + 1}-a{attempts}")
        p = subprocess.Popen(export_cmd(path), cwd=ROOT, env=env(path.parent), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.monotonic()
        while mid_write and not export_temps(path) and p.poll() is None and time.monotonic() - t0 < 600:
            time.sleep(0.001)
        time.sleep(delay)
        os.killpg(p.pid, signal.SIGSTOP)
        done = export_file(path).exists()
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if done:
            continue
        temps = export_temps(path)
        again = run_export(path)
        got = sha256(export_file(path))
        n += 1
        rows.append({"stage": "export", "trial": n, "at": ("temp file exists" if mid_write else
                                                          f"{delay:.2f} s of {duration:.2f} s"),
                     "delay_ms": round(delay * 1000, 1) if mid_write else 0.0,
                     "after_kill": "no file" + (" (temp left)" if temps else ""),
                     "temps_at_kill": temps, "temps_after": export_temps(path),
                     "resumed": "done" if again.returncode == 0 else f"exit {again.returncode}",
                     "identical": got == want and again.returncode == 0,
                     "diff": "" if got == want else f"sha256 {got} != {want}"})
        print(f"export trial {n}: killed at {rows[-1]['at']} → {rows[-1]['resumed']}, identical={rows[-1]['identical']}",
              file=sys.stderr, flush=True)
    return rows


def load_test(work: Path, cache: Path) -> dict:
    import ft_case
    from engine.run.events import read_events

    ratios = (0.2, 0.3, 0.5)
    seq = {}
    t0 = time.monotonic()
    for r in ratios:
        s, o = reference(work, f"seq-{r}", make_config(work, r), cache / "seq")
        seq[r] = o
    t_seq = time.monotonic() - t0
    sessions = {r: ft_case.session(work, f"par-{r}", make_config(work, r)) for r in ratios}
    t0 = time.monotonic()
    procs = {r: start(s, cache / "par") for r, s in sessions.items()}
    for p in procs.values():
        p.wait(timeout=1800)
    t_par = time.monotonic() - t0
    out = {"sequential_s": round(t_seq, 1), "parallel_s": round(t_par, 1), "cells": []}
    for r, s in sessions.items():
        o = outcome(s)
        ev = read_events(s.events_path)
        starts = [e for e in ev if e["type"] == "run_start"]
        others = [x for x in sessions.values() if x is not s]
        text = s.events_path.read_text()
        cross = [x.id for x in others if x.id in text or str(x.path) in text]
        cross += [f"pid {procs[q].pid}" for q in ratios if q != r and any(e.get("pid") == procs[q].pid for e in ev)]
        out["cells"].append({"ratio": r, "status": o["status"], "identical": o == seq[r],
                             "own_runner": [e.get("pid") for e in starts] == [procs[r].pid], "cross_talk": cross,
                             "ppl_pruned": o["metrics"].get("pruned", {}).get("ppl"),
                             "ppl_finetuned": o["metrics"].get("finetuned", {}).get("ppl")})
    return out


def report(rows: list[dict], ref: dict, load: dict | None) -> str:
    n_ok = sum(r["identical"] for r in rows)
    lines = [f"**{n_ok}/{len(rows)} identical** (metrics exact, every step's loss, model sha256 "
             f"`{(ref['model_sha256'] or '')[:16]}…`, corrected teacher sha256 `{(ref['teacher_sha256'] or '')[:16]}…`; "
             "export rows: the q8_0 GGUF file's sha256).", "",
             "| stage | trial | killed at (event or moment, + delay) | status after kill | temp left at kill | "
             "temp after resume | resumed | identical |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['trial']} | {r['at']} +{r['delay_ms']} ms | {r['after_kill']} | "
                     f"{', '.join(r['temps_at_kill']) or '–'} | {', '.join(r['temps_after']) or '–'} | {r['resumed']} | "
                     f"{'yes' if r['identical'] else 'NO ' + r['diff']} |")
    if load:
        lines += ["", "Load test: 3 sessions at once (one runner each, one shared calibration-cache entry), "
                      f"{load['parallel_s']} s, against the same three one at a time, {load['sequential_s']} s:", "",
                  "| prune ratio | status | identical to sequential | events name only its own runner | cross-talk | "
                  "ppl pruned | ppl fine-tuned |", "|---|---|---|---|---|---|---|"]
        for c in load["cells"]:
            lines.append(f"| {c['ratio']} | {c['status']} | {'yes' if c['identical'] else 'NO'} | "
                         f"{'yes' if c['own_runner'] else 'NO'} | {', '.join(c['cross_talk']) or 'none'} | "
                         f"{c['ppl_pruned']:.4f} | {c['ppl_finetuned']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-load", action="store_true")
    ap.add_argument("--keep", type=Path, default=None)
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="minigpt-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    rows, ref = fault_matrix(work, args.trials, rng, work / "cache")
    load = None if args.no_load else load_test(work, work / "cache-load")
    text = report(rows, ref, load)
    if args.out:
        args.out.write_text(text)
    print(text)
    ok = all(r["identical"] for r in rows) and (load is None or all(c["identical"] and not c["cross_talk"]
                                                                      and c["own_runner"] for c in load["cells"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
