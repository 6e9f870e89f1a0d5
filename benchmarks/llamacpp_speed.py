"""A pruned session's GGUF files against the base model's, in llama.cpp, side by side in one run.

For each quantisation (default f16, q8_0, q4_k_m) it exports the session's model
(`engine.run.export`) and the unpruned base (`engine.models.gguf.export`, the same writer),
then measures in llama.cpp (llama-cpp-python, 2 threads):

* file sizes;
* held-out perplexity through llama.cpp, next to the engine's (fp32 PyTorch) on the same
  tokens: the session's held-out split under each model's own tokenizer, non-overlapping
  blocks, each block's first token unscored (as `engine.evaluate.perplexity`);
* prompt tokens/s (one 512-token prompt) and generation tokens/s (64 greedy tokens after a
  64-token prompt), base and pruned interleaved round by round; each ratio is the median
  of the per-round ratios.

    .venv/bin/python benchmarks/llamacpp_speed.py sessions/gguf-smollm2 [--quants f16,q8_0,q4_k_m,q4_k_m+im]

`QUANT+im` quantises both models with an importance matrix (`minigpt export --imatrix N`)
measured on N tokens of the session's calibration split, never on the held-out tokens.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def held_out(cfg, tok):
    from engine.data import domain

    d = domain.DomainData.build(cfg.data, tok, max_eval=cfg.evaluate.max_tokens)
    return d.evaluate.flatten()


def engine_ppl(model, ids, block):
    from engine.evaluate import perplexity

    with torch.no_grad():
        return perplexity.perplexity(model, ids, block)["ppl"]


def cpp_ppl(llm, ids, block):
    nll, n = 0.0, 0
    ids = ids.tolist()
    for s in range(0, len(ids) - block + 1, block):
        b = ids[s:s + block]
        llm.reset()
        llm.eval(b)
        logits = np.array(llm.scores[:block], dtype=np.float64)
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        nll -= float(logp[np.arange(block - 1), b[1:]].sum())
        n += block - 1
    return math.exp(nll / n)


def prompt_speed(llm, ids):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    return len(ids) / (time.perf_counter() - t)


def gen_speed(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    t = time.perf_counter()
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    return n / (time.perf_counter() - t)


def main():
    import llama_cpp
    from transformers import AutoTokenizer

    from engine.config import ModelConfig
    from engine.models import gguf, load as loader
    from engine.models.export import load_model
    from engine.run import export as export_mod
    from engine.run.session import open_session

    ap = argparse.ArgumentParser()
    ap.add_argument("session")
    ap.add_argument("--quants", default="f16,q8_0,q4_k_m,f16+pad",
                    help="comma list; QUANT+pad adds the --pad-uniform twin at QUANT")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--imatrix", type=int, default=4096,
                    help="QUANT+im rows: an importance matrix from this many calibration tokens, for both models")
    ap.add_argument("--out", default="", help="folder for the GGUF files (default: SESSION/export)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    s = open_session(Path(a.session))
    cfg = s.config()
    out = Path(a.out) if a.out else s.path / "export"
    block = cfg.evaluate.block_size

    pruned, ptok = load_model(s.model_dir).eval(), AutoTokenizer.from_pretrained(s.model_dir)
    base, btok, _ = loader.load(ModelConfig(source=cfg.model.source, device="cpu", dtype="float32"))
    base.eval()
    ids = {"pruned": held_out(cfg, ptok), "base": held_out(cfg, btok)}
    ids = {k: v[: (v.numel() // block) * block] for k, v in ids.items()}
    eng = {"pruned": engine_ppl(pruned, ids["pruned"], block), "base": engine_ppl(base, ids["base"], block)}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("pruned", pruned), ("base", base))}
    print(f"session {s.id}: pruned {params['pruned']:,} params vs base {params['base']:,} "
          f"({100 * (1 - params['pruned'] / params['base']):.1f}% removed); held-out {ids['pruned'].numel()} "
          f"tokens (pruned tokenizer) / {ids['base'].numel()} (base), blocks of {block}")
    print(f"engine fp32 ppl: pruned {eng['pruned']:.3f}, base {eng['base']:.3f}")

    rows = []
    prompt_ids = {k: v[:512].tolist() for k, v in ids.items()}
    gen_ids = {k: v[:64].tolist() for k, v in ids.items()}
    for q in [x.strip() for x in a.quants.split(",") if x.strip()]:
        quant, pad = q.split("+")[0], q.endswith("+pad")  # f16+pad: the --pad-uniform twin
        im = a.imatrix if q.endswith("+im") else 0  # q4_k_m+im: both quantised with an importance matrix
        tag = "-uniform" if pad else "-im" if im else ""
        files = {"pruned": export_mod.export(s, "gguf", quant, pad_uniform=pad, imatrix_tokens=im,
                                             out=out / f"{s.id}-{quant}{tag}.gguf").path,
                 "base": gguf.export(base, btok, out / f"base-{quant}{'-im' if im else ''}.gguf", quant,
                                     imatrix=export_mod.importance(cfg, base, btok, im) if im else None).path}
        ppl, llms = {}, {}
        for k, f in files.items():
            llm = llama_cpp.Llama(str(f), logits_all=True, n_ctx=block, n_threads=2, n_batch=512, verbose=False)
            ppl[k] = cpp_ppl(llm, ids[k], block)
            llm.close()
            llms[k] = llama_cpp.Llama(str(f), n_ctx=1024, n_threads=2, n_batch=512, verbose=False)
        pr, gr, sp = [], [], {"pruned": ([], []), "base": ([], [])}
        for _ in range(a.rounds):
            for k in ("base", "pruned"):
                sp[k][0].append(prompt_speed(llms[k], prompt_ids[k]))
                sp[k][1].append(gen_speed(llms[k], gen_ids[k], 64))
            pr.append(sp["pruned"][0][-1] / sp["base"][0][-1])
            gr.append(sp["pruned"][1][-1] / sp["base"][1][-1])
        for m in llms.values():
            m.close()
        rows.append(dict(q=q, size=files["pruned"].stat().st_size, base_size=files["base"].stat().st_size,
                         ppl=ppl["pruned"], ppl_base=ppl["base"],
                         pp=statistics.median(sp["pruned"][0]), pp_base=statistics.median(sp["base"][0]),
                         tg=statistics.median(sp["pruned"][1]), tg_base=statistics.median(sp["base"][1]),
                         pr=statistics.median(pr), pr_spread=(min(pr), max(pr)),
                         gr=statistics.median(gr), gr_spread=(min(gr), max(gr))))
        r = rows[-1]
        print(f"[{q}] pruned {r['size'] / 2**20:.1f} MiB vs base {r['base_size'] / 2**20:.1f} MiB; "
              f"ppl llama.cpp {r['ppl']:.3f} vs engine {eng['pruned']:.3f} ({100 * (r['ppl'] / eng['pruned'] - 1):+.2f}%); "
              f"base llama.cpp {r['ppl_base']:.3f}; prompt {r['pp']:.0f} vs {r['pp_base']:.0f} t/s = {r['pr']:.2f}× "
              f"({r['pr_spread'][0]:.2f}–{r['pr_spread'][1]:.2f}); gen {r['tg']:.1f} vs {r['tg_base']:.1f} t/s = "
              f"{r['gr']:.2f}× ({r['gr_spread'][0]:.2f}–{r['gr_spread'][1]:.2f})", flush=True)

    f16_base = next((r["base_size"] for r in rows if r["q"] == "f16"), None)
    print()
    print("| quant | file (pruned) | file (base) | held-out ppl, llama.cpp | engine fp32, same tokens | Δ | "
          "prompt t/s pruned / base | ratio | generation t/s pruned / base | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f" ({100 * r['size'] / f16_base:.0f}% of base f16)" if f16_base else ""
        print(f"| {r['q']} | {r['size'] / 2**20:.1f} MiB{rel} | {r['base_size'] / 2**20:.1f} MiB | {r['ppl']:.3f} | "
              f"{eng['pruned']:.3f} | {100 * (r['ppl'] / eng['pruned'] - 1):+.2f}% | {r['pp']:.0f} / {r['pp_base']:.0f} | "
              f"**{r['pr']:.2f}×** | {r['tg']:.1f} / {r['tg_base']:.1f} | **{r['gr']:.2f}×** |")


if __name__ == "__main__":
    main()
