"""Pivot one or more `minigpt sweep` tables (sweep.csv) into one row per setting, one column per ratio.

Each cell reads "ppl (×base) · MCQ acc" for one evaluation corpus. Rows from several sweeps
of the same model and corpus are merged (the settings are what tell them apart), so a
study run as several `minigpt sweep` invocations reads as one table.

Usage: .venv/bin/python scripts/sweep_table.py OUT1/sweep.csv [OUT2/sweep.csv ...]
       [--evaluate builtin:licenses] [--calibrate builtin:licenses] [--cross]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from engine.errors import MinigptError

def _yes(v: str) -> bool:
    """sweep.csv writes booleans as Python prints them."""
    return v in ("True", "true", "yes")


def _num(v: float, digits: int) -> str:
    return f"{v:.{digits}f}" if v < 1000 else f"{v:,.0f}"


SETTING = ("calibrate_on", "criterion", "allocation", "compensation", "sequential")


def fail(problem: str, fix: str) -> None:
    print(f"error: {MinigptError(problem, fix).line()}", file=sys.stderr)
    raise SystemExit(2)


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        try:
            with open(p, newline="") as f:
                got = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            fail(f"cannot read {p} ({e.__class__.__name__})", "give the sweep.csv files written by minigpt sweep")
        missing = [k for k in (*SETTING, "ratio") if got and k not in got[0]]
        if not got or missing:
            fail(f"{p} is not a sweep table" + (f" (no column {missing[0]})" if missing else " (no rows)"),
                 "give the sweep.csv files written by minigpt sweep")
        rows.extend(got)
    return rows


def pivot(rows: list[dict], evaluate: str, calibrate: str | None = None) -> str:
    ppl, xb, mcq = f"ppl[{evaluate}]", f"x_base[{evaluate}]", f"mcq_acc[{evaluate}]"
    rows = [r for r in rows if r.get(ppl) and (calibrate is None or r["calibrate_on"] == calibrate)]
    if not rows:
        fail(f"no sweep rows evaluated on {evaluate}" + (f" and calibrated on {calibrate}" if calibrate else ""),
             "pick a corpus the sweeps evaluated on with --evaluate (see the ppl[...] columns)")
    ratios = sorted({float(r["ratio"]) for r in rows})
    table: dict[tuple, dict[float, dict]] = {}
    for r in rows:
        table.setdefault(tuple(r[k] for k in SETTING), {})[float(r["ratio"])] = r
    head = ["calibrated on", "criterion", "allocation", "compensation", "sequential"] + \
           [f"{x:.0%} removed: ppl (×base) · MCQ" for x in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, by_ratio in table.items():
        cells = []
        for x in ratios:
            r = by_ratio.get(x)
            if r is None:
                cells.append("")
                continue
            cell = f"{_num(float(r[ppl]), 2)} ({_num(float(r[xb]), 3)}×)"
            if r.get(mcq):
                cell += f" · {float(r[mcq]):.2f}"
            cells.append(cell)
        seq = "yes" if _yes(setting[4]) else "no"
        lines.append("| " + " | ".join([setting[0].removeprefix("builtin:"), *setting[1:4], seq, *cells]) + " |")
    return "\n".join(lines)


def cross(rows: list[dict]) -> str:
    """Calibrated-on × evaluated-on perplexity, one block of rows per setting and ratio."""
    evals = sorted({k[4:-1] for r in rows for k, v in r.items() if k.startswith("ppl[") and v})
    calibs = sorted({r["calibrate_on"] for r in rows})
    head = ["setting", "removed", "calibrated on"] + [f"ppl on {e.removeprefix('builtin:')} (×base)" for e in evals]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in SETTING[1:]) + (float(r["ratio"]),), {})[r["calibrate_on"]] = r
    for key, by_calib in groups.items():
        name = "/".join(key[:3]) + ("/sequential" if _yes(key[3]) else "")
        for c in calibs:
            r = by_calib.get(c)
            if r is None:
                continue
            cells = [f"{_num(float(r[f'ppl[{e}]']), 2)} ({_num(float(r[f'x_base[{e}]']), 3)}×)" if r.get(f"ppl[{e}]") else ""
                     for e in evals]
            lines.append("| " + " | ".join([name, f"{key[4]:.0%}", c.removeprefix("builtin:"), *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--evaluate", default="builtin:licenses", help="evaluation corpus whose columns to show")
    ap.add_argument("--calibrate", default=None, help="only rows calibrated on this corpus")
    ap.add_argument("--cross", action="store_true", help="calibrated-on × evaluated-on table instead")
    args = ap.parse_args()
    rows = load(args.csv)
    print(cross(rows) if args.cross else pivot(rows, args.evaluate, args.calibrate))


if __name__ == "__main__":
    main()
