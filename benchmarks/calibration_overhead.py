"""Calibration overhead: `engine.prune.calibrate.calibrate` time ÷ a plain `model(...)` loop on the same tokens.

Target: <= 1.10x. Both sides run the same blocks in the same batches under no_grad with
use_cache=False; the only difference is the statistics hooks. Printed: the ratio with all
hooks (MLP neurons + every linear's input/output, the default) and with MLP hooks only.

On a loaded machine every parallel elementwise op waits for a free core (~10 ms per op
with 2 threads), so the hooks' many small reductions look far costlier than they are;
--threads 1 measures the compute overhead without that scheduling artefact.

Usage: .venv/bin/python benchmarks/calibration_overhead.py [--tiny] [--tokens 4096] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse

from _common import domain, interleaved, load_model, machine, ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model: a quick smoke run")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()

    import torch

    from engine.prune.calibrate import calibrate
    from engine.data.domain import blocks

    model, tok, name = load_model(args.tiny, args.threads)
    block = min(args.block, 128) if args.tiny else args.block
    ids = domain(tok).calibrate
    x = blocks(ids[: args.tokens], block)
    n_tok = x.numel()
    batches = [x[i:i + args.batch] for i in range(0, x.shape[0], args.batch)]

    def plain():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b, use_cache=False)

    # a warm-up of each path, untimed
    plain()
    calibrate(model, x[: args.batch], args.batch)
    times = interleaved({
        "plain forward": plain,
        "calibrate (all hooks)": lambda: calibrate(model, x, args.batch),
        "calibrate (MLP hooks only)": lambda: calibrate(model, x, args.batch, linears=False),
    }, args.rounds)

    hooks_s, cal_s = hook_time(model, x, args.batch)

    print(f"model: {name}; {n_tok} tokens in {x.shape[0]} blocks of {block}, batch {args.batch}; "
          f"{args.rounds} interleaved rounds; {machine()}")
    print(f"{'path':30} {'min s':>8} {'tok/s':>8}")
    for k, v in times.items():
        print(f"{k:30} {min(v):8.2f} {n_tok / min(v):8.0f}")
    for k in ("calibrate (all hooks)", "calibrate (MLP hooks only)"):
        med, lo, hi = ratio(times, k, "plain forward")
        mins = min(times[k]) / min(times["plain forward"])
        print(f"RATIO {k} ÷ plain forward: {med:.3f}x median of rounds ({lo:.3f}-{hi:.3f}), "
              f"{mins:.3f}x fastest ÷ fastest; target <= 1.10x")
    print(f"time inside the hooks (all hooks, one extra pass): {hooks_s:.2f} s of {cal_s:.2f} s "
          f"= {hooks_s / min(times['plain forward']):.3f} of the fastest plain forward")


def hook_time(model, x, batch) -> tuple[float, float]:
    """Seconds spent inside the statistics hooks during one calibration, and its total time.

    A profile, not the benchmark: the hook factories are wrapped with timers for this pass.
    """
    import time

    from engine.prune import calibrate as cal

    spent = [0.0]

    def timed(factory):
        def make(self, key):
            hook = factory(self, key)

            def wrapper(*a):
                t = time.perf_counter()
                hook(*a)
                spent[0] += time.perf_counter() - t
            return wrapper
        return make

    saved = cal.Calibrator._mlp_hook, cal.Calibrator._linear_hook
    cal.Calibrator._mlp_hook, cal.Calibrator._linear_hook = timed(saved[0]), timed(saved[1])
    try:
        t0 = time.perf_counter()
        cal.calibrate(model, x, batch)
        total = time.perf_counter() - t0
    finally:
        cal.Calibrator._mlp_hook, cal.Calibrator._linear_hook = saved
    return spent[0], total


if __name__ == "__main__":
    main()
