"""Shared by the benchmark scripts: the model under test, domain tokens, interleaved timing.

Timings alternate between the contenders round by round (A B A B ...), so a neighbour's
burst of load on this shared machine hits both sides; each ratio is the median of the
per-round ratios, with the spread across rounds printed beside it.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def load_model(tiny: bool, threads: int = 0):
    """(model, tokenizer, name): SmolLM2-135M-Instruct fp32 on CPU, or a tiny random llama.

    threads > 0 sets torch's thread count (on a loaded machine, 2-thread ops wait for a
    free core at every parallel region; 1 thread measures compute without that artefact).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    if tiny:
        import tiny as tiny_mod

        return tiny_mod.model("llama"), tiny_mod.tokenizer(), "tiny-llama (random, smoke run)"
    from engine.models import load as models
    from engine.config import ModelConfig

    model, tok, _ = models.load(ModelConfig(device="cpu", dtype="float32"))
    torch.set_grad_enabled(False)
    return model, tok, "SmolLM2-135M-Instruct fp32"


def domain(tokenizer, source: str = "builtin:licenses", seed: int = 0):
    """The corpus's document-disjoint splits (engine.data.domain), tokenized without caps."""
    from engine.config import DataConfig
    from engine.data.domain import DomainData

    return DomainData.build(DataConfig(source=source, seed=seed), tokenizer)


def interleaved(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, alternating contenders within every round."""
    times = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median and range of the per-round ratios num/den (time ratios)."""
    r = [a / b for a, b in zip(times[num], times[den])]
    return statistics.median(r), min(r), max(r)


def machine() -> str:
    import os

    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} at start"
