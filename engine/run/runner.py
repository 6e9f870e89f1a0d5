"""The detached runner's entry point: `python -m engine.run.runner SESSION [--redo-from STAGE]`.

It runs (or resumes) one session's pipeline under the session's lock. Under
`torchrun --nproc_per_node N -m engine.run.runner SESSION` every rank joins the process group
and runs the same pipeline (SPMD); rank 0 holds the lock and writes the session, the other
ranks write nothing. Spawning, stopping and liveness are torch-free and live in
`engine.run.launch`.
"""

from __future__ import annotations

import os
import signal
import sys

from engine.errors import MinigptError


def main(argv: list[str] | None = None) -> int:
    import argparse

    # until the pipeline installs its handlers (after importing torch: seconds), a hangup
    # must not kill us either; the own process session already shields us from the terminal's.
    # Nor may a SIGTERM from `minigpt stop`: the stop request it comes with (stop.request) is
    # kept (--keep-stop) and honoured at the first safe point, with the session's state written.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # torchrun ends its ranks with SIGTERM: leave it be
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from engine.run import pipeline
    from engine.run.session import open_session

    ap = argparse.ArgumentParser(prog="python -m engine.run.runner")
    ap.add_argument("session")
    ap.add_argument("--redo-from", default=None, help="redo this stage and the ones after it")
    ap.add_argument("--keep-stop", action="store_true",
                    help="honour a stop request already in the session (the launcher cleared older ones)")
    args = ap.parse_args(argv)
    rank = _init_distributed()
    try:
        if rank:  # a rank > 0 computes what rank 0 computes and writes nothing
            from engine import atomic

            atomic.set_writer(False)
        s = open_session(args.session)
        pipeline.run(s, handle_signals=not rank, redo_from=args.redo_from, keep_stop=args.keep_stop)
    except MinigptError as e:  # the launcher shows this line to its user (launch.wait_started)
        _report(e.line())
        return 2
    except OSError as e:  # a full disk (atomic.DiskFull reads as one line), a read-only folder
        _report(e.line() if hasattr(e, "line") else f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))
        return 1
    except Exception as e:  # under torchrun: a collective cut short by another rank's death is one line
        from engine.distributed import peer_lost

        line = peer_lost(e, int(os.environ.get("WORLD_SIZE", "1")))
        if line is None:
            raise
        _report(line)
        return 1
    finally:
        if rank is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _report(line: str) -> None:
    """One error line in runner.log, tagged with this pid so that its launcher finds its own."""
    print(f"runner {os.getpid()}: error: {line}", file=sys.stderr, flush=True)


def _init_distributed() -> int | None:
    """Under `torchrun --nproc_per_node N -m engine.run.runner SESSION`: join the process group.

    Returns this process's rank, or None when not distributed. Every rank runs the whole
    pipeline (gloo on CPU, NCCL on CUDA: one GPU per local rank); rank 0 holds the lock and
    writes every file. Multi-node: torchrun's rendezvous (--nnodes, --rdzv-backend c10d,
    --rdzv-endpoint HOST:PORT) on a session folder every node sees (a shared file system).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # ranks wait at a barrier while rank 0 writes a model or a checkpoint: minutes, not hours
    dist.init_process_group(backend, timeout=timedelta(minutes=60))
    return dist.get_rank()


if __name__ == "__main__":
    sys.exit(main())
