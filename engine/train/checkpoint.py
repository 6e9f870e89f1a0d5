"""Training checkpoints: each one is complete or absent.

A checkpoint is a folder `step-00000123/` holding `state.pt` (model, optimiser, scheduler,
RNG states, data position: whatever the caller puts in) and `meta.json`. It is written
under a hidden temporary name, fsynced, then renamed into place, so a kill mid-write leaves
only a hidden folder that `latest()` ignores and the next save removes. The newest `keep`
are kept. Everything stored loads with `weights_only=True` (RNG states are turned into
tensors and lists), so resuming never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from engine import atomic
from engine.errors import MinigptError

PREFIX = "step-"
STATE_FILE = "state.pt"
META_FILE = "meta.json"


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


def save(root: str | os.PathLike, step: int, state: dict, meta: dict | None = None, keep: int = 2) -> Path:
    """Write a checkpoint atomically and drop all but the newest `keep` (and stale temp folders)."""
    import torch

    root = Path(root)

    def write(tmp: Path) -> None:
        torch.save(state, tmp / STATE_FILE)
        atomic.write_json(tmp / META_FILE, {"step": step, **(meta or {})})

    final = atomic.write_dir(root / _name(step), write)
    atomic.fsync(root)
    for p in root.iterdir():  # one runner per session (lock), so any other temp folder is a leftover
        if p.name.startswith((".tmp-", f".{PREFIX}")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for _, old in complete(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
