"""The distributed algorithms on a tiny model, for test_distributed.py.

`measure(dist)` runs calibration, sensitivity allocation, held-out perplexity, bits per
byte, MCQ scoring and 5 recovery steps (CE under DDP, CE and KD under FSDP2) and returns
what it measured. The test calls it in its own process (`Dist(solo=True)`) and runs this
file under `torchrun --nproc_per_node 2` (gloo), where rank 0 saves the result to argv[1].
"""

from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny  # noqa: E402

STEPS = 5


def finetune_config(**kw):
    from engine.config import FinetuneConfig

    base = dict(enabled=True, lr=3e-3, batch_size=4, grad_accum=2, block_size=16, max_steps=STEPS, warmup_steps=1,
                weight_decay=0.01, eval_every=0, checkpoint_every=0, target_ppl_ratio=0.0)
    return FinetuneConfig(**{**base, **kw})


def _train(model, blocks, cfg, dist, strategy, teacher=None, shard_teacher=False):
    from engine.train import finetune

    torch.manual_seed(0)
    ft = finetune.Finetuner(model, blocks, cfg, seed=3, dist=dist, strategy=strategy, teacher=teacher,
                            shard_teacher=shard_teacher)
    steps = [ft.train_step() for _ in range(STEPS)]
    final = ft.finished_model()
    return {"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps],
            "kl": [s.get("kl") for s in steps],
            "weights": {k: v.detach().clone() for k, v in final.state_dict().items()}}


def measure(dist) -> dict:
    from engine.evaluate import mcq, perplexity
    from engine.models import adapters
    from engine.prune import calibrate, sensitivity

    torch.set_num_threads(1)
    model = tiny.model("llama")
    blocks = tiny.ids(n=10, L=16, seed=5)  # 5 batches of 2: ranks get 3 and 2
    out = {}
    stats = calibrate.calibrate(model, blocks, 2, gram=True, dist=dist)
    out["stats"], out["n_tokens"] = stats.t, stats.n_tokens
    out["token_counts"] = calibrate.token_counts(blocks, 320, dist=dist)
    sens = sensitivity.measure(model, stats, blocks, "wanda", "lstsq", 0.01, 0.3, batch_size=2, dist=dist)
    widths = [m.width for m in adapters.for_model(model).mlps()]
    out["sensitivity"] = sens
    out["allocation"] = sensitivity.allocate(sens, widths, 0.4, 0.3, 4, 0.8)
    held = tiny.ids(n=1, L=200, seed=7).flatten()
    out["ppl"] = perplexity.perplexity(model, held, 16, 0, 2, dist=dist)["ppl"]
    out["ppl_stride"] = perplexity.perplexity(model, held, 16, 8, 2, dist=dist)["ppl"]
    texts = [tiny.TEXT[i:i + 160] for i in range(0, 1600, 160)]
    out["bpb"] = perplexity.bits_per_byte(model, tiny.tokenizer(), texts, 16, 0, 2, dist=dist)["bpb"]
    import random

    rng, words = random.Random(0), tiny.TEXT.replace(",", "").replace(";", "").replace(".", "").split()[:40]
    prose = " ".join(" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(16))
    qs = mcq.generate([prose], 7, seed=1)
    res = mcq.score(model, tiny.tokenizer(), qs, batch_size=2, dist=dist)
    out["mcq"] = {"acc": res["acc"], "lls": [it["lls"] for it in res["items"]]}

    train = tiny.ids(n=24, L=16, seed=9)
    out["ddp"] = _train(copy.deepcopy(model), train, finetune_config(), dist, "ddp")
    out["fsdp"] = _train(copy.deepcopy(model), train, finetune_config(), dist, "fsdp")
    teacher = tiny.model("llama", seed=1)
    out["fsdp_kd"] = _train(copy.deepcopy(model), train, finetune_config(loss="kd"), dist, "fsdp",
                            teacher=teacher, shard_teacher=True)
    return out


if __name__ == "__main__":
    import torch.distributed as tdist

    from engine.distributed import Dist

    tdist.init_process_group("gloo")
    dist = Dist()
    result = measure(dist)
    if dist.main:
        torch.save(result, sys.argv[1])
    tdist.destroy_process_group()
