"""Training checkpoints: each one is complete or absent.

A checkpoint is a folder `step-00000123/` holding `state.pt` (model, optimiser, scheduler,
RNG states, data position: whatever the caller puts in) and `meta.json`. It is written
under a hidden temporary name, fsynced, then renamed into place, so a kill mid-write leaves
only a hidden folder that `latest()` ignores and the next save removes. The newest `keep`
are kept. Everything stored loads with `weights_only=True` (RNG states are turned into
tensors and lists), so resuming never unpickles arbitrary objects.

Under FSDP the weights and optimiser moments are sharded: `save(..., sharded=...)` has every
rank write its shards with torch.distributed.checkpoint into `dcp/` inside rank 0's temp
folder, then rank 0 adds `state.pt` and `meta.json` and renames the folder into place, so a
sharded checkpoint is complete or absent too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

from engine import atomic
from engine.errors import MinigptError

PREFIX = "step-"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
SHARDED_DIR = "dcp"  # FSDP: torch.distributed.checkpoint's files, one per rank plus .metadata


def _name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and (p / META_FILE).is_file() and (p / STATE_FILE).is_file():
            try:
                out.append((int(p.name[len(PREFIX):]), p))
            except ValueError:
                continue
    return sorted(out)


def latest(root: str | os.PathLike) -> Path | None:
    found = complete(root)
    return found[-1][1] if found else None


def save(root: str | os.PathLike, step: int, state: dict, meta: dict | None = None, keep: int = 2,
         sharded: dict | None = None, dist=None) -> Path:
    """Write a checkpoint atomically and drop all but the newest `keep` (and stale temp folders).

    Every rank calls it under torchrun; rank 0 alone writes `state` and `meta` (the other
    ranks' writes are no-ops, `atomic.set_writer`). `sharded` (FSDP: DTensor state dicts) is
    written by every rank through torch.distributed.checkpoint, a collective; `dist` is then
    the process group's `engine.distributed.Dist`."""
    import torch

    root = Path(root)
    final = root / _name(step)
    if sharded is None:
        def write(tmp: Path) -> None:
            torch.save(state, tmp / STATE_FILE)
            atomic.write_json(tmp / META_FILE, {"step": step, **(meta or {})})

        atomic.write_dir(final, write)
    else:
        import torch.distributed.checkpoint as dcp

        tmp = Path(dist.bcast(str(atomic.temp_path(final)) if dist.main else None))  # rank 0's temp folder
        if dist.main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / SHARDED_DIR).mkdir(parents=True)
        dist.barrier()
        with warnings.catch_warnings():  # one process: DCP says it assumes so, at every save
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(sharded, checkpoint_id=str(tmp / SHARDED_DIR), no_dist=not dist.on)  # each rank its shards
        dist.barrier()
        if dist.main:
            torch.save(state, tmp / STATE_FILE)
            atomic.write_json(tmp / META_FILE, {"step": step, **(meta or {})})
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    atomic.fsync(p)
            atomic.replace_dir(tmp, final)
        dist.barrier()  # the checkpoint is in place before any rank goes on
    if not atomic.writer():
        return final
    atomic.fsync(root)
    for p in root.iterdir():  # one runner per session (lock), so any other temp folder is a leftover
        if p.name.startswith((".tmp-", f".{PREFIX}")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for _, old in complete(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def sharded_dir(folder: str | os.PathLike) -> Path | None:
    """The torch.distributed.checkpoint folder of an FSDP checkpoint, None for a whole one."""
    p = Path(folder) / SHARDED_DIR
    return p if p.is_dir() else None


def load(folder: str | os.PathLike, map_location="cpu") -> tuple[dict, dict]:
    import torch

    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
        state = torch.load(folder / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated by a full disk, or edited by hand
        raise MinigptError(f"checkpoint {folder} is unreadable ({type(e).__name__}: {e})",
                           f"delete {folder} to resume from the one before it") from None
    return state, meta


def clear(root: str | os.PathLike) -> None:
    if atomic.writer():
        shutil.rmtree(root, ignore_errors=True)


# ---- RNG states ---------------------------------------------------------------------
def rng_state() -> dict:
    """torch (CPU and every CUDA device), Python `random` and NumPy states, as tensors/lists."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"torch": torch.get_rng_state(),
           "python": {"version": version, "internal": list(internal), "gauss": gauss},
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
