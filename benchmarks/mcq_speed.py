"""MCQ scoring speed: `engine.evaluate.mcq.score` items/s ÷ lm-evaluation-harness's, same model and items.

Items: sentence-completion questions generated (seeded) from the held-out split of a
built-in domain. Contenders, timed round-robin on the same in-memory model:

* lm-eval end to end: `simple_evaluate` on a local task built from the items' JSONL
  (0-shot; task building included, model loading excluded);
* lm-eval core: `HFLM.loglikelihood` on exactly our (prompt, " " + choice) requests;
* ours: `mcq.score` with lm-eval's metrics (acc, acc_norm), and with every rule
  (acc, acc_norm, acc_bytes, the paper's lowest-perplexity rule).

The per-choice log-likelihoods of ours and lm-eval's core are compared (max |diff|). With
--fewshot k the requests carry k solved examples, so prompts share long prefixes.
Then the accuracy of the model on generated questions of each --domains corpus is
printed with binomial standard errors (chance = 1/choices).

--format letters asks the same questions in MMLU's format (the choices listed in the prompt,
answered by one letter), where every request repeats a long prompt for a one-token answer.

Usage: .venv/bin/python benchmarks/mcq_speed.py [--tiny] [--threads N] [--items 100] [--fewshot 0] [--format letters]
       [--domains builtin:licenses,builtin:stdlib-docs] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _common import domain, interleaved, load_model, machine

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model: a quick smoke run")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--fewshot", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4, help="our batch: questions")
    ap.add_argument("--lmeval-batch", type=int, default=16, help="lm-eval's batch: requests (choices)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--domains", default="builtin:licenses,builtin:stdlib-docs",
                    help="speed on the first; accuracy on each")
    ap.add_argument("--skip-lmeval", action="store_true", help="accuracy only")
    ap.add_argument("--format", choices=["completion", "letters"], default="completion",
                    help="letters: the same questions in MMLU's prompt format (choices listed as A-D "
                         "in the prompt, answered by one letter)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from engine.evaluate import mcq

    model, tok, name = load_model(args.tiny, args.threads)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    sets = {src: mcq.generate(domain(tok, src).eval_texts, args.items, seed=0, name=f"generated:{src}")
            for src in domains}
    if args.format == "letters":
        sets = {src: as_letters(s) for src, s in sets.items()}
    print(f"model: {name}; {machine()}")

    if not args.skip_lmeval:
        speed(model, tok, sets[domains[0]], args)

    print(f"\naccuracy on generated sentence-completion questions (seed 0, {args.fewshot}-shot; chance = 1/choices)")
    print(f"{'domain':24} {'items':>5} {'choices':>7} " + " ".join(f"{r:>15}" for r in mcq.RULES))
    for src, s in sets.items():
        res = mcq.score(model, tok, s, fewshot=args.fewshot, batch_size=args.batch)
        cells = " ".join(f"{res[r]:.3f} ± {res['stderr'][r]:.3f}".rjust(15) for r in mcq.RULES)
        print(f"{src:24} {res['n']:5d} {res['protocol']['choices']!s:>7} {cells}")


def as_letters(s):
    """MMLU's lm-eval prompt ("{question}\\nA. ..\\nB. ..\\nAnswer:", choices " A".." D") for the same items."""
    from engine.evaluate import mcq

    letters = "ABCDEFGHIJ"
    items = [mcq.Item(it.question + " ...\n" + "".join(f"{letters[k]}. {c}\n" for k, c in enumerate(it.choices))
                      + "Answer:", tuple(letters[:len(it.choices)]), it.answer) for it in s.items]
    return mcq.MCQSet(s.name + " (letters)", items, kind="completion", source=s.source, meta=s.meta)


def speed(model, tok, s, args) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from engine.evaluate import mcq

    tmp = Path(tempfile.mkdtemp(prefix="mcq_speed_"))
    data = tmp / "items.jsonl"
    data.write_text("".join(json.dumps({"question": it.question, "choices": list(it.choices), "answer": it.answer})
                            + "\n" for it in s.items), encoding="utf-8")
    (tmp / "mg_bench.yaml").write_text(TASK.format(name="mg_bench", data=data))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.lmeval_batch, device="cpu")
    tm = TaskManager(include_path=str(tmp))
    requests = [Instance(request_type="loglikelihood", doc={}, idx=j,
                         arguments=(mcq.prompt(s, i, args.fewshot), " " + c))
                for i, it in enumerate(s.items) for j, c in enumerate(it.choices)]
    out = {}

    def run_lm_core():
        out["core"] = lm.loglikelihood(requests, disable_tqdm=True)

    def run_lm_e2e():
        out["e2e"] = simple_evaluate(model=lm, tasks=["mg_bench"], task_manager=tm, num_fewshot=0,
                                     verbosity="ERROR")

    def run_ours():
        out["ours"] = mcq.score(model, tok, s, fewshot=args.fewshot, rules=("acc", "acc_norm"), batch_size=args.batch)

    def run_ours_all():
        out["ours_all"] = mcq.score(model, tok, s, fewshot=args.fewshot, batch_size=args.batch)

    contenders = {"lm-eval loglikelihood": run_lm_core, "ours (acc, acc_norm)": run_ours,
                  "ours (all 4 rules)": run_ours_all}
    if args.fewshot == 0:
        contenders = {"lm-eval simple_evaluate": run_lm_e2e, **contenders}
    times = interleaved(contenders, args.rounds)
    n = len(s.items)
    ours_lls = [ll for rec in out["ours"]["items"] for ll in rec["lls"]]
    diff = max(abs(a - b[0]) for a, b in zip(ours_lls, out["core"]))
    n_req = len(requests)
    print(f"\nMCQ speed: {n} items ({n_req} choices) from {s.name}, {args.fewshot}-shot; our batch {args.batch} "
          f"questions, lm-eval batch {args.lmeval_batch} requests; {args.rounds} round(s)")
    print(f"max |log-likelihood ours - lm-eval| over {n_req} choices: {diff:.2e}")
    if "e2e" in out:
        r = out["e2e"]["results"]["mg_bench"]
        print(f"acc: ours {out['ours']['acc']:.4f}, lm-eval {r['acc,none']:.4f}; "
              f"acc_norm: ours {out['ours']['acc_norm']:.4f}, lm-eval {r['acc_norm,none']:.4f}")
    print(f"{'contender':26} {'min s':>8} {'items/s':>8}")
    for k, v in times.items():
        print(f"{k:26} {min(v):8.2f} {n / min(v):8.2f}")
    for ours in ("ours (acc, acc_norm)", "ours (all 4 rules)"):
        for ref in ("lm-eval simple_evaluate", "lm-eval loglikelihood"):
            if ref in times:
                rs = sorted(b / a for a, b in zip(times[ours], times[ref]))
                print(f"RATIO {ours} items/s ÷ {ref}: {rs[len(rs) // 2]:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
