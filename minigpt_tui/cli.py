"""The `minigpt` command. No torch at import time: `minigpt --help` must be instant.

Engine work happens in `engine` (imported lazily per command). A user-fixable problem
is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=False, invoke_without_command=True,
                  help="minigpt: contextual pruning workbench. With no command, opens the app.")

RootOpt = typer.Option(None, "--root", help="sessions folder (default: $MINIGPT_SESSIONS or ./sessions)")
SetOpt = typer.Option([], "--set", "-s", help="override a config key: section.key=value (repeatable)")


def _root(root: Optional[Path]) -> Path:
    from engine.run.session import default_root

    return Path(root) if root else default_root()


@app.callback()
def _main(ctx: typer.Context, root: Optional[Path] = RootOpt):
    if ctx.invoked_subcommand is None:
        from minigpt_tui.app import run_app

        run_app(root=Path(root) if root else None)  # None: $MINIGPT_SESSIONS, else the last root used


def _follow(session, stop_on_end: bool = True, since_offset: int = 0, shown: list | None = None) -> str:
    """Tail a session's events with the rich display until its run ends or the runner dies.
    Error events shown are appended to `shown` (the caller prints an error once, not twice)."""
    from engine.run.events import EventReader

    from .display import Display

    disp = Display()
    reader = EventReader(session.events_path, offset=since_offset)
    status = None
    seen_start = since_offset == 0
    quiet_since = time.monotonic()
    try:
        while True:
            events = reader.poll()
            for e in events:
                seen_start = seen_start or e["type"] == "run_start"
                if e["type"] == "run_start":  # a resumed session: an earlier run's end is not the end
                    status = None
                disp(e)
                if e["type"] == "error" and shown is not None:
                    shown.append(e.get("message"))
                if e["type"] == "run_end":
                    status = e.get("status")
            if status and stop_on_end:
                return status
            if events:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 3 and not session.runner_alive():
                from engine.run.launch import starting

                st = session.status()
                if st != "starting" or not starting(session):
                    disp.close()
                    if st == "disconnected":
                        from engine.run.death import record_death

                        died = record_death(session)  # the death record, in the log for every reader
                        reader.poll()  # (our own line: not shown twice)
                        why = died["message"] if died else "its runner died without ending the run"
                        typer.echo(f"session {session.id} is disconnected: {why} "
                                   f"— resume it with: minigpt resume {session.id}", err=True)
                    return st
            time.sleep(0.25)
    except KeyboardInterrupt:
        disp.close()
        typer.echo(f"detached; the run goes on. Follow it again with: minigpt logs {session.id} -f")
        return "detached"
    finally:
        disp.close()


NprocOpt = typer.Option(1, "--nproc", "-n", help="processes (one per GPU): > 1 runs detached under torchrun "
                                                 "(gloo on CPU, NCCL on CUDA)")


def _check_launch(foreground: bool, nproc: int) -> None:
    """The launch options, checked before a session folder is created or a model loads."""
    if nproc < 1:
        typer.echo(f"error: --nproc {nproc} is not a number of processes — use --nproc 1 or more (one per GPU)",
                   err=True)
        raise typer.Exit(2)
    if foreground and nproc > 1:
        typer.echo("error: --nproc > 1 runs under torchrun, detached — drop --foreground "
                   "(or run: torchrun --nproc_per_node N -m engine.run.runner SESSION)", err=True)
        raise typer.Exit(2)


def _start(session, foreground: bool, follow: bool, redo_from: str | None = None, nproc: int = 1) -> None:
    _check_launch(foreground, nproc)
    if foreground:
        from engine.run import pipeline

        from .display import Display

        disp = Display()
        try:
            pipeline.run(session, display=disp, handle_signals=True, redo_from=redo_from)
        finally:
            disp.close()
        return
    from engine.run import launch

    offset = session.events_path.stat().st_size if session.events_path.exists() else 0
    pid = launch.launch_detached(session.path, redo_from=redo_from, nproc=nproc)
    ok, refusal = launch.wait_started(session, pid)  # a concurrent resume may have won the lock
    if not ok:
        typer.echo(f"error: {refusal}", err=True)
        raise typer.Exit(1)
    typer.echo(f"session {session.id} running detached (pid {pid}); Ctrl-C detaches, `minigpt stop {session.id}` stops")
    if follow:
        shown: list = []
        status = _follow(session, since_offset=offset, shown=shown)
        if status == "failed":
            err = session.state().get("error") or "see " + str(session.path / "runner.log")
            if err not in shown:  # the follower showed the error event already: once is enough
                typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1)
        if status == "disconnected":
            raise typer.Exit(1)


@app.command()
def run(config: Path = typer.Argument(..., help="run config (TOML)"),
        root: Optional[Path] = RootOpt, overrides: list[str] = SetOpt,
        name: Optional[str] = typer.Option(None, help="session folder name"),
        foreground: bool = typer.Option(False, "--foreground", "-F", help="run in this process (no detach)"),
        follow: bool = typer.Option(True, "--follow/--no-follow", help="show live progress after launching"),
        nproc: int = NprocOpt):
    """Create a session from CONFIG and run calibrate → prune → (finetune) → evaluate."""
    from engine import config as config_mod
    from engine.run import session as session_mod

    cfg = config_mod.apply_overrides(config_mod.load(config), overrides)
    _check_launch(foreground, nproc)
    _preflight([cfg], _root(root))  # every problem at once, before a session exists or a model loads
    s = session_mod.create(cfg, _root(root), name=name)
    typer.echo(f"session {s.id} → {s.path}")
    _start(s, foreground, follow, nproc=nproc)


def _preflight(cfgs: list, root: Optional[Path], quiet_ok: bool = True) -> int:
    """Run engine.run.preflight on the configs; print findings; exit 2 if any is an error."""
    from engine.run import preflight

    findings = preflight.check_all(cfgs, root)
    for f in findings:
        typer.echo(f.line(), err=True)
    if preflight.errors(findings):
        raise typer.Exit(2)
    return len(findings)


@app.command()
def check(config: Path = typer.Argument(..., help="run config (TOML), or a grid file with --grid"),
          root: Optional[Path] = RootOpt, overrides: list[str] = SetOpt,
          is_grid: bool = typer.Option(False, "--grid", help="CONFIG is a grid file: check every cell")):
    """Check a config before running it: model source, data files and columns, token budgets,
    preset and grid names, the sessions root (writable, free space). Exit 2 on any error."""
    from engine import config as config_mod

    if is_grid:
        from engine.run import grid as grid_mod

        cfgs = [c.cfg for c in grid_mod.load_spec(config, overrides).cells]
    else:
        cfgs = [config_mod.apply_overrides(config_mod.load(config), overrides)]
    n = _preflight(cfgs, _root(root))
    typer.echo(f"{config}: ok ({len(cfgs)} config{'s' if len(cfgs) != 1 else ''}"
               + (f", {n} warning{'s' if n != 1 else ''})" if n else ")"))


def _open(ref: str, root):
    from engine.run.session import open_session

    return open_session(ref, _root(root))


def _stage_command(stage: str):
    def cmd(session: str = typer.Argument(..., help="session id or path"), root: Optional[Path] = RootOpt,
            overrides: list[str] = SetOpt,
            foreground: bool = typer.Option(True, "--foreground/--detach", help="run here or detached")):
        from engine import atomic
        from engine import config as config_mod

        s = _open(session, root)
        s.check_writable()
        if overrides:
            cfg = config_mod.apply_overrides(s.config(), overrides)
            atomic.write_text(s.path / "config.toml", cfg.to_toml())
        _start(s, foreground, True, redo_from=stage)

    cmd.__doc__ = {"calibrate": "Recalibrate a session, then redo the stages after it.",
                   "prune": "Prune again from the saved statistics (no recalibration), then fine-tune/evaluate.",
                   "evaluate": "Evaluate the session's current model on held-out text again."}[stage]
    return cmd


app.command("calibrate")(_stage_command("calibrate"))
app.command("prune")(_stage_command("prune"))
app.command("eval")(_stage_command("evaluate"))


@app.command()
def resume(session: str = typer.Argument(...), root: Optional[Path] = RootOpt,
           foreground: bool = typer.Option(False, "--foreground", "-F"),
           follow: bool = typer.Option(True, "--follow/--no-follow"), nproc: int = NprocOpt):
    """Continue a stopped or failed session from its last completed stage or checkpoint."""
    s = _open(session, root)
    if s.status() == "done":
        typer.echo(f"session {s.id} is already done")
        return
    s.check_writable()
    _start(s, foreground, follow, nproc=nproc)


@app.command()
def stop(session: str = typer.Argument(...), root: Optional[Path] = RootOpt,
         wait: bool = typer.Option(True, "--wait/--no-wait")):
    """Stop a running session gracefully (it checkpoints first)."""
    from engine.run import launch

    s = _open(session, root)
    was_starting = not s.runner_alive()
    if not launch.request_stop(s.path):
        typer.echo(f"session {s.id} is not running ({s.status()})")
        return
    typer.echo(f"stop requested for {s.id}" + (" (still starting: it stops at its first safe point)"
                                                if was_starting else ""))
    while wait and (s.runner_alive() or launch.starting(s)):
        time.sleep(0.5)
    if wait:
        typer.echo(f"session {s.id}: {s.status()}")


@app.command()
def logs(session: str = typer.Argument(...), root: Optional[Path] = RootOpt,
         follow: bool = typer.Option(False, "--follow", "-f", help="keep following new events")):
    """Print a session's events as readable lines."""
    from engine.run.events import read_events

    from .display import Display, plain_console

    s = _open(session, root)
    if follow:
        if _follow(s, stop_on_end=True) == "disconnected":
            raise typer.Exit(1)
        return
    disp = Display(console=plain_console(), plain=True)
    events = read_events(s.events_path)
    for e in events:
        disp(e)
    if not events:
        status = s.status()
        if status == "new":
            typer.echo(f"session {s.id} has no events yet (it has not been run: minigpt resume {s.id})")
            return
        what = "is missing" if not s.events_path.exists() else "holds no complete event"
        typer.echo(f"error: session {s.id} ({status}) has no events: {s.events_path} {what} — its results are in "
                   f"{s.path / 'results.json'}; a resume starts a new log", err=True)
        raise typer.Exit(1)


@app.command()
def sessions(root: Optional[Path] = RootOpt):
    """List sessions."""
    from rich.console import Console
    from rich.table import Table

    from engine.run import session as session_mod

    from .display import sessions_table

    where = _root(root).resolve()
    rows = [session_mod.summary(s) for s in session_mod.list_sessions(_root(root))]
    for r in rows:  # a runner found dead gets its death record (engine.run.death) on the way
        if r.get("status") == "disconnected":
            from engine.run.death import record_death

            record_death(session_mod.Session(Path(r["path"])))
    console = Console()
    console.print(sessions_table(rows, where) if rows else f"no sessions under {where}", soft_wrap=False)


@app.command()
def status(session: str = typer.Argument(..., help="session id or path"), root: Optional[Path] = RootOpt,
           as_json: bool = typer.Option(False, "--json", help="one JSON object (for scripts)")):
    """One-shot snapshot of a session: status, stage, progress, disk use, metrics, death record."""
    import json

    from engine.run.death import record_death

    from .data import fmt_bytes, snapshot

    s = _open(session, root)
    record_death(s)
    snap = snapshot(s)
    if as_json:
        typer.echo(json.dumps(snap, indent=1, default=str))
        return
    typer.echo(f"{snap['id']}: {snap['status']}" + (f" ({snap['stage']})" if snap.get("stage") else "")
               + f" · {fmt_bytes(snap['disk_bytes']['total'])} · {snap['path']}")
    if snap.get("runner_died"):
        typer.echo(f"  {snap['runner_died']['message']} — resume it with: minigpt resume {snap['id']}")
    for k, v in snap["metrics"].items():
        typer.echo(f"  {k} = {v}")


@app.command()
def attach(session: str = typer.Argument(...), root: Optional[Path] = RootOpt):
    """Open the app on a session's run monitor."""
    s = _open(session, root)
    from minigpt_tui.app import run_app

    run_app(root=s.path.parent, attach=s.id)


@app.command()
def grid(spec: Path = typer.Argument(..., help="grid file (TOML): models × domains × thresholds × methods"),
         overrides: list[str] = SetOpt,
         out: Optional[Path] = typer.Option(None, "--out", help="grid folder (default: grids/NAME)"),
         detach: bool = typer.Option(False, "--detach", help="run in the background; log in GRID/grid.log"),
         retry_failed: bool = typer.Option(True, "--retry-failed/--no-retry-failed"),
         table: bool = typer.Option(False, "--table", help="only rewrite and print the results table"),
         max_parallel: int = typer.Option(0, "--max-parallel", min=0, metavar="N",
                                          help="run cells in their own runner processes, at most N at once "
                                               "(default: one after another in this process)")):
    """Run a grid of sessions (the paper's experiment in one command): resumable, one session per cell,
    shared calibration; writes grid.json, results.md and results.csv in the grid folder."""
    from engine.run import grid as grid_mod
    from engine.run import gridrun

    from .display import Display

    g = grid_mod.load_spec(spec, overrides, out)
    if table:
        grid_mod.refresh(g)
        typer.echo((g.folder / grid_mod.RESULTS_MD).read_text())
        return
    _preflight([c.cfg for c in g.cells], g.folder / grid_mod.SESSIONS)  # a typo fails in a second, not per cell
    if detach:
        pid = gridrun.launch_detached(spec, g.folder, overrides, max_parallel)
        typer.echo(f"grid {g.name}: {len(g.cells)} cells running detached (pid {pid}); log {g.folder / grid_mod.LOG_FILE}")
        return
    res = gridrun.run_grid(g, display_factory=Display, echo=typer.echo, retry_failed=retry_failed,
                           max_parallel=max_parallel)
    typer.echo(f"grid {res['status']}: {res['done']}/{res['cells']} cells done, {res['failed']} failed; "
               f"table: {g.folder / grid_mod.RESULTS_MD}")
    if res["status"] == "failed":
        raise typer.Exit(1)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@app.command()
def sweep(config: Path = typer.Argument(..., help="run config (TOML): model, corpus, calibrate/evaluate sizes"),
          criteria: str = typer.Option("paper", help="comma list: paper,rms,random,magnitude,wanda,fluctuation,obs"),
          allocations: str = typer.Option("per_layer", help="comma list: per_layer,global,sensitivity"),
          compensations: str = typer.Option("none", help="comma list: none,bias,lstsq"),
          ratios: str = typer.Option("0.1,0.3,0.5", help="comma list of MLP-neuron fractions to remove"),
          sequential: str = typer.Option("false", help="comma list: false,true"),
          calibrate_on: str = typer.Option("", help="comma list of corpora to calibrate on (default: data.source)"),
          evaluate_on: str = typer.Option("", help="comma list of corpora to evaluate on (default: data.source)"),
          out: Path = typer.Option(Path("sweeps/latest"), "--out", help="folder for sweep.csv and sweep.md"),
          stats: Optional[Path] = typer.Option(None, "--stats", help="calibration cache folder (default: the "
                                                                       "one runs and grids share, under $MINIGPT_CACHE)"),
          overrides: list[str] = SetOpt):
    """Prune one model many ways without fine-tuning; table of params, held-out ppl and MCQ accuracy.

    One process, one cell at a time (one model load, shared calibrations): no --max-parallel."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from engine import config as config_mod
    from engine.run import sweep as sweep_mod
    from engine.errors import MinigptError

    cfg = config_mod.apply_overrides(config_mod.load(config), overrides)
    try:
        ratio_list = [float(r) for r in _csv(ratios)]
        seq_list = [{"true": True, "false": False}[v.lower()] for v in _csv(sequential)]
    except (ValueError, KeyError):
        raise MinigptError(f"bad --ratios {ratios!r} or --sequential {sequential!r}",
                           "use e.g. --ratios 0.1,0.3,0.5 --sequential false,true") from None
    grid = sweep_mod.Grid(criteria=_csv(criteria), allocations=_csv(allocations), compensations=_csv(compensations),
                          ratios=ratio_list, sequential=seq_list, calibrate_on=_csv(calibrate_on),
                          evaluate_on=_csv(evaluate_on)).check()
    import dataclasses

    corpora = list(dict.fromkeys([*grid.calibrate_on, *grid.evaluate_on])) or [cfg.data.source]
    _preflight([dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=c)) for c in corpora], None)
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        cells = bar.add_task("cells", total=len(sweep_mod.cells(grid, grid.calibrate_on or [cfg.data.source])))
        phase = bar.add_task("", total=None)

        def on(e: dict) -> None:
            if e["kind"] == "cell":
                bar.update(cells, completed=e["index"], description=f"cells · {e['cell']}")
            else:
                bar.update(phase, description=e["phase"], completed=e.get("done", 0), total=e.get("total"))

        sweep_mod.run(cfg, grid, out, progress=on, log=lambda m: bar.console.print(m, markup=False), stats_dir=stats)
    console.print(f"wrote {out / 'sweep.csv'} and {out / 'sweep.md'}")


@app.command("export")
def export_cmd(session: str = typer.Argument(..., help="session id or path"), root: Optional[Path] = RootOpt,
               fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama, LM Studio)"),
               quant: str = typer.Option("f16", "--quant", help="f32, f16, q8_0, q4_k_m, q5_k_m, q6_k, q4_0 ..."),
               pad_uniform: bool = typer.Option(False, "--pad-uniform", help="pad every MLP and attention to the "
                                                "widest with zeros (exact): a plain llama file every runtime loads"),
               out: Optional[Path] = typer.Option(None, "--out", help="file to write (default: SESSION/export/...)"),
               imatrix: int = typer.Option(0, "--imatrix", help="quantise with an importance matrix from this many "
                                           "tokens of the session's calibration split (0: none)"),
               progress: bool = typer.Option(False, "--progress", help="a line per block written (the workbench "
                                                                      "reads them)")):
    """Export a session's model as one GGUF file for llama.cpp (quantised by llama.cpp's own quantizer)."""
    from engine.run import export as export_mod

    s = _open(session, root)
    export_mod.check(s, fmt, quant, imatrix)  # bad input fails here, before any model is loaded
    res = export_mod.export(s, fmt, quant, pad_uniform=pad_uniform, out=out, imatrix_tokens=imatrix,
                            log=lambda m: typer.echo(m, err=True),
                            progress=lambda done, total: typer.echo(f"  blocks {done}/{total}", err=True)
                            if progress or done == total else None)
    types = ", ".join(f"{k} {v[0]}" for k, v in sorted(res.types.items()))
    typer.echo(f"wrote {res.path} ({res.bytes / 2**20:.1f} MiB, {res.bytes:,} bytes): {res.arch}, {res.blocks} blocks, "
               f"{res.quant}, {res.bits_per_weight:.2f} bits/weight ({types})")


def main() -> None:
    from engine.errors import MinigptError

    from typer.exceptions import TyperException  # usage errors (typer runs its own copy of click)

    try:
        rv = app(standalone_mode=False)  # usage errors come here as exceptions: one line, not click's box
    except TyperException as e:
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "minigpt"
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"error: {message} — see `{where} --help`", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except MinigptError as e:
        typer.echo(f"error: {e.line()}", err=True)
        sys.exit(2)
    except OSError as e:  # a full disk (engine.atomic.DiskFull), a read-only or vanished folder: one line
        if hasattr(e, "line"):
            typer.echo(f"error: {e.line()}", err=True)
        else:
            where = f" ({e.filename})" if e.filename else ""
            typer.echo(f"error: {e.strerror or e}{where} — check that the folder exists and is writable, "
                       "or pass --root DIR", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
