"""Recovery throughput on GPUs: CE and KD tokens/s, model FLOP utilisation and peak memory.

SmolLM2's architectures (135M and 1.7B: Llama-family, GQA, tied embeddings, vocab 49,152),
randomly initialised and fed synthetic tokens: the GPU machine cannot reach the hub, and
throughput does not depend on the weights' values. Every step is the engine's own
`engine.train.finetune.Finetuner.train_step` (bf16 autocast on CUDA over fp32 master weights,
fused AdamW, clipping); KD runs the frozen teacher (a second copy, bf16) forward on every
micro-batch and the chunked KL of `engine.train.distill`.

Under torchrun (`--nproc N` in gpu_scale.sh) every rank runs this script: the student is
DDP, then FSDP2 (`fully_shard`, bf16 parameters, fp32 reduction), with the same global batch.

Model FLOPs per token: CE 6·N (forward and backward of the student), KD 6·N + 2·N_teacher
(the teacher's forward), N = parameters doing matmuls (all but the input-embedding lookup;
a tied LM head counts once, as the matmul it is); attention's sequence term is left out, as
usual for MFU. Peak: 989 TFLOP/s (H200 SXM dense bf16; `--peak-tflops`). On CPU
(`--dry-run`) the same code runs on a tiny model of the same shape family and MFU is not
printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SMOLLM2 = {
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                 rms_norm_eps=1e-5, rope_theta=100000.0),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=8192, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                 rms_norm_eps=1e-5, rope_theta=130000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True),
}
H200_BF16_DENSE_PEAK_TFLOPS = 989.0


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps: the same code path, no GPU")
    ap.add_argument("--models", default=None, help="comma list of 135m, 1.7b (default both; dry run: tiny)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per block (default 2048; dry run 32)")
    ap.add_argument("--batch", type=int, default=None, help="global blocks per micro-batch (default 8; dry run 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimiser steps per loss (default 10; dry run 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; dry run 1)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_PEAK_TFLOPS)
    ap.add_argument("--json", default="", help="also write the rows here (rank 0)")
    a = ap.parse_args(argv)
    for k, big, small in (("seq", 2048, 32), ("batch", 8, 2), ("steps", 10, 2), ("warmup", 2, 1)):
        if getattr(a, k) is None:
            setattr(a, k, small if a.dry_run else big)
    a.models = (a.models or ("tiny" if a.dry_run else "135m,1.7b")).split(",")
    bad = [m for m in a.models if m not in SMOLLM2]
    if bad:
        ap.error(f"unknown model {bad[0]!r}: use {', '.join(SMOLLM2)}")
    return a


def build(name: str, device, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with device:
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2[name]))
    return model.to(torch.float32)


def matmul_params(model) -> int:
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    n = sum(p.numel() for p in model.parameters())  # a tied head is one tensor: counted once already
    return n - emb.numel() + (head.numel() if head is emb else 0)


def main(argv=None) -> int:
    a = parse(argv)
    import torch
    import torch.distributed as tdist

    from engine.config import FinetuneConfig
    from engine.distributed import Dist
    from engine.train.finetune import Finetuner

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not a.dry_run
    if world > 1:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("nccl" if cuda else "gloo")
    dist = Dist()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda and not a.dry_run:
        print("no CUDA GPU here: run with --dry-run for the CPU smoke path", file=sys.stderr)
        return 2
    say = print if dist.main else (lambda *x, **k: None)
    if a.batch % dist.world:
        say(f"--batch {a.batch} does not split over {dist.world} processes: use a multiple", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(device) if cuda else "CPU (dry run)"
    say(f"gpu_scale: {gpu} x {dist.world}, torch {torch.__version__}, {a.batch}x{a.seq} tokens per step (global)")
    strategies = ["ddp", "fsdp"] if dist.on else ["single"]
    rows = []
    for name in a.models:
        for strategy in strategies:
            for loss in ("ce", "kd"):
                row = run_one(a, name, strategy, loss, device, dist, Finetuner, FinetuneConfig)
                rows.append(row)
                mfu = f"  MFU {row['mfu']:6.1%} ({row['tflops']:.0f} TFLOP/s)" if row.get("mfu") is not None else ""
                say(f"{name:>5} {strategy:<6} {loss.upper():<2} {row['tokens_per_s']:>12,.0f} tok/s "
                    f"({row['tokens_per_s_per_gpu']:,.0f} per GPU)  {row['step_s']:7.3f} s/step  "
                    f"peak {row['peak_mem_gib']:6.2f} GiB{mfu}", flush=True)
    if a.json and dist.main:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    if world > 1:
        tdist.destroy_process_group()
    return 0


def run_one(a, name, strategy, loss, device, dist, Finetuner, FinetuneConfig) -> dict:
    import gc

    import torch

    student = build(name, device)
    teacher = None
    if loss == "kd":
        teacher = build(name, device, seed=1)
        if device.type == "cuda":
            teacher = teacher.to(torch.bfloat16)
        teacher.requires_grad_(False)
    n_mm = matmul_params(student)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, SMOLLM2[name]["vocab_size"], (a.batch * (a.steps + a.warmup), a.seq), generator=g)
    cfg = FinetuneConfig(enabled=True, lr=1e-4, batch_size=a.batch, block_size=a.seq, max_steps=a.steps + a.warmup,
                         warmup_steps=0, loss=loss, eval_every=0, checkpoint_every=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ft = Finetuner(student, blocks, cfg, seed=0, dist=dist, teacher=teacher,
                   strategy="ddp" if strategy == "single" else strategy)
    for _ in range(a.warmup):
        ft.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        ft.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / a.steps
    tps = ft.tokens_per_step / step_s
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    peak = max(dist.gather(peak))  # the busiest rank
    flops_per_token = 6 * n_mm + (2 * n_mm if loss == "kd" else 0)
    row = {"model": name, "strategy": strategy, "loss": loss, "world": dist.world, "params_matmul": n_mm,
           "tokens_per_step": ft.tokens_per_step, "step_s": round(step_s, 4), "tokens_per_s": round(tps, 1),
           "tokens_per_s_per_gpu": round(tps / dist.world, 1), "peak_mem_gib": round(peak, 3), "mfu": None}
    if device.type == "cuda":
        achieved = flops_per_token * tps / dist.world
        row.update(mfu=round(achieved / (a.peak_tflops * 1e12), 4), tflops=round(achieved / 1e12, 1))
    del ft, student, teacher
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


if __name__ == "__main__":
    sys.exit(main())
