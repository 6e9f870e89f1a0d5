"""What one grid cell costs on a GPU: calibrate / prune / evaluate / fine-tune throughput and memory.

The model is Phi-1.5-sized (hidden 2048, 24 layers, 32 heads, MLP 8192, vocab 51,200,
gelu_new, partial rotary 0.5, context 2048), randomly initialised, fed synthetic tokens:
the GPU machine cannot reach the hub, and throughput does not depend on the weights'
values. Every phase runs the engine's own code (`engine.prune.calibrate`, `engine.prune.mlp`,
`engine.evaluate.perplexity`, `engine.train.finetune.Finetuner`), and the dense model and its structurally
pruned copy are measured side by side in one run, so the speed-up ratio is measured, not
inferred.

Model FLOP utilisation (MFU) = achieved model FLOP/s / peak, with model FLOPs per token =
2·N (forward: calibration, evaluation) and 6·N (training), N = parameters doing
matmuls (every parameter but the input-embedding table, which is a lookup); attention's
sequence-length term is left out, as usual for MFU, so MFU slightly understates the
hardware's work at 2,048 tokens. Peak: 989 TFLOP/s, the H200 SXM's dense bf16 figure
(`--peak-tflops` to change it; a plain 8192³ bf16 matmul reaches about 790 on these
machines). On CPU (`--tiny`, a smoke run) MFU is not meaningful and is not printed.

    python benchmarks/gpu_grid.py            # on the GPU box (~2-4 min on one H200)
    python benchmarks/gpu_grid.py --tiny     # CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHI_1_5 = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, intermediate_size=8192,
               vocab_size=51200, hidden_act="gelu_new", partial_rotary_factor=0.5, max_position_embeddings=2048)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            vocab_size=512, hidden_act="gelu_new", partial_rotary_factor=0.5, max_position_embeddings=256)
H200_BF16_DENSE_PEAK_TFLOPS = 989.0


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke run of the same code path")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--seq", type=int, default=None, help="tokens per block (default 2048; tiny 64)")
    ap.add_argument("--batch", type=int, default=None, help="blocks per batch (default 4; tiny 2)")
    ap.add_argument("--calib-blocks", type=int, default=None, help="calibration blocks (default 64; tiny 4)")
    ap.add_argument("--eval-blocks", type=int, default=None, help="evaluation blocks (default 32; tiny 4)")
    ap.add_argument("--ft-steps", type=int, default=None, help="timed fine-tuning steps (default 10; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps/batches first (default 2; tiny 1)")
    ap.add_argument("--ratio", type=float, default=0.3, help="fraction of MLP neurons pruned (per layer)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_PEAK_TFLOPS)
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args(argv)
    small = a.tiny
    for k, big, tiny in (("seq", 2048, 64), ("batch", 4, 2), ("calib_blocks", 64, 4), ("eval_blocks", 32, 4),
                         ("ft_steps", 10, 2), ("warmup", 2, 1)):
        if getattr(a, k) is None:
            setattr(a, k, tiny if small else big)
    return a


class Meter:
    """Wall time (synchronised on CUDA) and peak memory of one phase."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        else:  # process-lifetime peak RSS: an upper bound for the phase
            self.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.seconds = time.perf_counter() - self.t0


def matmul_params(model) -> int:
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb)


def build(args, device, dtype):
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    spec = TINY if args.tiny else PHI_1_5
    cfg = PhiConfig(**spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = PhiForCausalLM(cfg)
    model.to(dtype).eval()
    rope = getattr(cfg, "partial_rotary_factor", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
        "partial_rotary_factor")
    assert rope == 0.5, "partial_rotary_factor did not reach the config"
    return model, spec


def run(args) -> dict:
    import torch

    from engine.prune import calibrate
    from engine.evaluate import perplexity as evaluate
    from engine.prune import mlp as prune
    from engine.models import size
    from engine.config import FinetuneConfig, PruneConfig
    from engine.train.finetune import Finetuner

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    else:
        device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
                 "peak_tflops": args.peak_tflops if device.type == "cuda" else None,
                 "seq": args.seq, "batch": args.batch, "phases": {}}
    with Meter(device) as m:
        model, spec = build(args, device, dtype)
    n_total = sum(p.numel() for p in model.parameters())
    n_dense = matmul_params(model)
    out.update(config=spec, params=n_total, matmul_params=n_dense, init_seconds=round(m.seconds, 2))
    g = torch.Generator().manual_seed(0)
    vocab = spec["vocab_size"]
    calib = torch.randint(0, vocab, (args.calib_blocks, args.seq), generator=g)
    held = torch.randint(0, vocab, (args.eval_blocks * args.seq,), generator=g)
    train = torch.randint(0, vocab, (max(args.batch * (args.ft_steps + args.warmup), args.batch), args.seq),
                          generator=g)
    peak = args.peak_tflops * 1e12

    def record(name, tokens, seconds, flops_per_token, mem, **extra):
        tps = tokens / seconds if seconds > 0 else float("nan")
        row = {"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tps, 1),
               "peak_mem_gib": round(mem, 2), **extra}
        if device.type == "cuda":
            row["tflops"] = round(flops_per_token * tps / 1e12, 1)
            row["mfu"] = round(flops_per_token * tps / peak, 4)
        out["phases"][name] = row
        mfu = f"  MFU {row['mfu']:.1%} ({row['tflops']} TFLOP/s)" if "mfu" in row else ""
        print(f"{name:<28} {tps:>12,.0f} tok/s  {seconds:8.2f} s  peak {mem:6.2f} GiB{mfu}", flush=True)

    def guarded(name, fn):
        try:
            fn()
        except Exception as e:  # one broken phase must not cost the rest of a GPU session
            out["phases"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name:<28} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)

    # ---- 1. calibration: forward with the statistics hooks, against a plain forward ----------------
    warm = calib[: args.batch * args.warmup]

    @torch.no_grad()
    def plain():
        for i in range(0, warm.shape[0], args.batch):
            model(input_ids=warm[i:i + args.batch].to(device), use_cache=False)
        with Meter(device) as mm:
            for i in range(0, calib.shape[0], args.batch):
                model(input_ids=calib[i:i + args.batch].to(device), use_cache=False)
        record("forward (no hooks)", calib.numel(), mm.seconds, 2 * n_dense, mm.peak_gib)

    stats_box = {}

    def calib_phase():
        calibrate.calibrate(model, warm, args.batch)
        with Meter(device) as mm:
            stats_box["stats"] = calibrate.calibrate(model, calib, args.batch)
        record("calibrate (paper hooks)", calib.numel(), mm.seconds, 2 * n_dense, mm.peak_gib)

    guarded("forward (no hooks)", plain)
    guarded("calibrate (paper hooks)", calib_phase)
    if "stats" not in stats_box:
        return out
    stats = stats_box["stats"]
    if "forward (no hooks)" in out["phases"] and "tokens_per_s" in out["phases"]["forward (no hooks)"]:
        f, c = out["phases"]["forward (no hooks)"], out["phases"]["calibrate (paper hooks)"]
        out["calibration_hook_overhead"] = round(c["seconds"] / f["seconds"] - 1, 4)
        print(f"{'  hook overhead':<28} {out['calibration_hook_overhead']:+.1%} (same blocks, same run)")

    # ---- 2. pruning: both methods from the same statistics ------------------------------------------
    pcfg = PruneConfig(mode="structural", rule="ratio", ratio=args.ratio, linear_threshold=-1.0)
    models = {"dense": model}

    def prune_structural():
        m2 = copy.deepcopy(model)
        with Meter(device) as mm:
            plan = prune.select(m2, stats, pcfg)
            prune.apply_structural(m2, plan)
        models["structural"] = m2
        out["phases"]["prune structural"] = {"seconds": round(mm.seconds, 3), "params_after": size.count_params(m2),
                                             "mlp_width_after": plan.widths_after[0]}
        print(f"{'prune structural':<28} {mm.seconds:8.2f} s  params {n_total:,} → {size.count_params(m2):,}")

    mask_box = {}

    def prune_mask():
        m3 = copy.deepcopy(model)
        with Meter(device) as mm:
            plan = prune.select(m3, stats, pcfg)
            masks = prune.merge_masks(prune.mlp_masks(m3, plan), prune.linear_masks(m3, stats, 1e-3))
            prune.apply_masks(m3, masks)
        models["mask"], mask_box["masks"] = m3, masks
        out["phases"]["prune mask"] = {"seconds": round(mm.seconds, 3), "nonzero_after": size.count_nonzero(m3)}
        print(f"{'prune mask':<28} {mm.seconds:8.2f} s  nonzero {size.count_nonzero(m3):,} of {n_total:,}")

    guarded("prune structural", prune_structural)
    guarded("prune mask", prune_mask)

    # ---- 3. evaluation (held-out perplexity windows) --------------------------------------------------
    for name in ("dense", "structural"):
        if name not in models:
            continue
        mdl = models[name]

        def ev(mdl=mdl, name=name):
            evaluate.perplexity(mdl, held[: args.batch * args.seq], args.seq, 0, args.batch)
            with Meter(device) as mm:
                res = evaluate.perplexity(mdl, held, args.seq, 0, args.batch)
            record(f"evaluate {name}", res["tokens"], mm.seconds, 2 * matmul_params(mdl), mm.peak_gib)

        guarded(f"evaluate {name}", ev)

    # ---- 4. fine-tuning (AdamW, fp32 master weights, bf16 autocast on CUDA) ---------------------------
    for name in ("mask", "structural"):
        if name not in models:
            continue

        def ft(name=name):
            mdl = models.pop(name)
            fcfg = FinetuneConfig(enabled=True, lr=5e-5, batch_size=args.batch, block_size=args.seq,
                                  max_steps=args.warmup + args.ft_steps, schedule="constant")
            n_mm = matmul_params(mdl)
            t = Finetuner(mdl, train, fcfg, seed=0, masks=mask_box.get("masks") if name == "mask" else None)
            for _ in range(args.warmup):
                t.train_step()
            with Meter(device) as mm:
                for _ in range(args.ft_steps):
                    loss = t.train_step()["loss"]
            record(f"fine-tune {name}", t.tokens_per_step * args.ft_steps, mm.seconds, 6 * n_mm, mm.peak_gib,
                   final_loss=round(loss, 4), finite=math.isfinite(loss))
            del t, mdl
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

        guarded(f"fine-tune {name}", ft)

    ph = out["phases"]
    for a, b, label in (("evaluate dense", "evaluate structural", "evaluate"),
                        ("fine-tune mask", "fine-tune structural", "fine-tune")):
        if "tokens_per_s" in ph.get(a, {}) and "tokens_per_s" in ph.get(b, {}):
            r = ph[b]["tokens_per_s"] / ph[a]["tokens_per_s"]
            out.setdefault("speedup_structural", {})[label] = round(r, 3)
            print(f"{'  structural / dense ' + label:<28} {r:.2f}x tokens/s (measured side by side)")
    return out


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    out = run(args)
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"total {out['total_seconds']} s on {out['device']}"
          + (f"; MFU against a {args.peak_tflops:g} TFLOP/s bf16 dense peak" if out.get("peak_tflops") else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    failed = [k for k, v in out["phases"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
