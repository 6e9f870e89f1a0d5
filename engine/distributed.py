"""torch.distributed for the SPMD run: every rank runs the same code, rank 0 alone writes.

`Dist` is a thin view of the process group torchrun started (`engine.run.runner` joins it;
gloo on CPU, NCCL on CUDA), or a no-op in a single process, so that every algorithm takes
one explicit `dist` argument and runs unchanged with or without it:

- `shard(seq)` is this rank's share of a work list (items rank, rank + world, ...);
- `all_sum(tensors)` adds tensors across ranks in place (calibration sums, Gram matrices,
  token counts, loss and token totals), `all_max(flag)` agrees on a flag (a stop request);
- `gather(obj)` / `bcast(obj)` move small Python objects (per-item MCQ records, rank 0's
  decisions, RNG states).

Nothing here is home-made transport: each method is one torch.distributed collective.
"""

from __future__ import annotations

import torch


class Dist:
    """This process's place in the process group (rank, world, collective device)."""

    def __init__(self, solo: bool = False):
        """`solo`: this process alone, even when a process group exists."""
        import torch.distributed as dist

        self.on = not solo and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self.backend = dist.get_backend() if self.on else None
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0 (or the only process): the one that writes the session."""
        return self.rank == 0

    def shard(self, seq) -> list:
        """This rank's share of `seq`: items rank, rank + world, rank + 2·world, ..."""
        return list(seq)[self.rank::self.world]

    def all_sum(self, tensors) -> None:
        """Sum each tensor across ranks, in place (moved to the collective device and back)."""
        if not self.on:
            return
        import torch.distributed as dist

        for t in tensors:
            if t.device == self.device:
                dist.all_reduce(t)
            else:
                buf = t.to(self.device)
                dist.all_reduce(buf)
                t.copy_(buf)

    def sum_floats(self, *values: float) -> list[float]:
        """Python numbers summed across ranks (in float64)."""
        if not self.on:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.all_sum([t])
        return t.tolist()

    def all_max(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a stop request seen by one rank)."""
        if not self.on:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, x: float) -> float:
        return self.sum_floats(x)[0] / self.world if self.on else x

    def bcast(self, obj=None):
        """Rank 0's `obj`, on every rank."""
        if not self.on:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.on:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.on:
            import torch.distributed as dist

            dist.barrier()


def peer_lost(e: BaseException, world: int) -> str | None:
    """The one-line account of a collective that failed because another rank died or hung (a
    kill -9, the OOM killer, a crash), or None for any other error."""
    import torch.distributed as dist

    text = str(e)
    if world <= 1 or not (isinstance(e, getattr(dist, "DistError", ())) or
                          (isinstance(e, RuntimeError) and ("gloo" in text or "NCCL" in text))):
        return None
    why = next((p for p in ("Connection reset by peer", "Connection closed by peer", "timed out", "Timeout")
                if p in text), type(e).__name__)
    return (f"another of the {world} torchrun processes died or stopped answering ({why}) — "
            "see runner.log for which; resume with: minigpt resume SESSION --nproc N (the last checkpoint holds)")


def current() -> Dist:
    """The process group as it is now (a no-op `Dist` outside torchrun)."""
    return Dist()
