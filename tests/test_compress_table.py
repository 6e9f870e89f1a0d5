"""scripts/compress_table.py end to end on a tiny Llama: the teacher-corrected table runs its
teacher before calibration and names it, and a later table without the teacher runs its own
control instead of reusing the corrected one's (a control is only shared within a corpus and teacher)."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import ft_case
import tiny

pytestmark = pytest.mark.process
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _corpus(folder: Path, docs: int = 120, seed: int = 0) -> Path:
    """Seeded sentences over the tiny tokenizer's words: prose the generated MCQ can cut."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(docs):
            sents = [" ".join([rng.choice(ft_case.WORDS).capitalize()] + rng.choices(ft_case.WORDS, k=rng.randint(9, 14)))
                     + "." for _ in range(8)]
            f.write(json.dumps({"text": f"Document {i}. " + " ".join(sents)}) + "\n")
    return path


def _table(root: Path, out: Path, model: Path, corpus: Path, *extra: str) -> list[dict]:
    """Runs the script as a user does (its own interpreter, from the repository root)."""
    r = _run(root, out, model, corpus, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return list(csv.DictReader(open(next(out.glob("*.csv")))))


def _run(root: Path, out: Path, model: Path, corpus: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "compress_table.py"), "--root", str(root), "--out", str(out),
                        "--budgets", "0.8", "--corpus", str(corpus), "--steps", "2", "--only", "mlp",
                        "--model", str(model), *extra],
                       cwd=SCRIPTS.parent, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_teacher_corrected_table_and_its_own_control(tmp_path):
    from engine.run import session as session_mod

    model = tiny.save("llama", tmp_path / "model")
    corpus = _corpus(tmp_path / "data")
    root = tmp_path / "root"
    rows = _table(root, tmp_path / "out-t", model, corpus, "--teacher-steps", "2", "--kd-ce-weight", "0.5")
    names = [r["row"] for r in rows]
    assert names[:3] == ["(a) unpruned", "(a') corrected teacher (2 CE steps)",
                         "(b) corrected teacher + same recovery (CE)"]
    assert any(n.endswith(", KD") for n in names) and any(n.endswith(", CE") for n in names)
    assert all(float(r["bpb"]) > 0 for r in rows)
    kd = session_mod.open_session(root / "corpus-t2-mlp-80-kd")
    assert kd.config().finetune.loss == "kd" and kd.config().finetune.teacher_steps == 2
    assert "teacher" in kd.state()["completed_stages"]
    # the third copy: KD with a CE term, recovered from the same pruned model, its own row
    kc = session_mod.open_session(root / "corpus-t2-mlp-80-kc")
    assert kc.config().finetune.loss == "kd" and kc.config().finetune.kd_ce_weight == 0.5
    assert kc.results()["finetune"]["final_ce"] > 0 and kd.results()["finetune"].get("final_ce") in (None, 0)
    by = {r["row"]: r for r in rows}
    kd_row, kc_row = by["(c) MLP-only + vocab, KD"], by["(c) MLP-only + vocab, KD + 0.5 x CE"]
    assert kc_row["params"] == kd_row["params"] and kc_row["bpb"] != kd_row["bpb"]
    # the table names the corpus it measured (the base model's bits-per-byte protocol)
    proto = kd.results()["models"]["base"]["bpb_protocol"]
    table = (tmp_path / "out-t" / "corpus-t2-80-kc0.5.md").read_text()
    assert f"corpus sha256 {proto['corpus_sha256'][:16]}" in table
    # ... and how much of its held-out text the fine-tune split holds
    assert f"{proto['finetune_overlap']['share']:.0%} of the held-out 13-word windows" in table
    # the teacher moved: its held-out figures are not the unpruned model's
    assert rows[1]["bpb"] != rows[0]["bpb"]

    plain = _table(root, tmp_path / "out", model, corpus)
    assert [r["row"] for r in plain][:2] == ["(a) unpruned", "(b) unpruned + same recovery (CE)"]
    assert plain[1]["bpb"] != rows[2]["bpb"]  # its own control, not the corrected teacher's

    # a root holds one setting: the same table at another recovery lr is refused, not read back as its rows
    r = _run(root, tmp_path / "out-lr", model, corpus, "--teacher-steps", "2", "--lr", "1e-3")
    assert r.returncode == 2 and "finetune.lr differs" in r.stderr and "another --root" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "out-lr").exists()
    # in a root of its own it runs: every recovery at that lr, from the very same corrected teacher
    # (and the vocabulary cut to a row budget ranked with the model's prior, --vocab-rows)
    fast = _table(tmp_path / "root-lr", tmp_path / "out-lr", model, corpus, "--teacher-steps", "2", "--lr", "1e-3",
                  "--vocab-rows", "290")
    res = session_mod.open_session(tmp_path / "root-lr" / "corpus-t2-mlp-80-ce").results()
    assert res["teacher"]["lr"] == 2e-4 and res["finetune"]["lr"] == res["control"]["lr"] == 1e-3
    assert fast[1]["row"].startswith("(a') corrected teacher") and fast[1]["bpb"] == rows[1]["bpb"]
    assert fast[2]["bpb"] != rows[2]["bpb"]  # the control recovered at the other lr
    assert res["vocab"]["rule"] == "heldout" and res["vocab"]["rows_after"] == res["search"]["vocab_rows_cut"] <= 290
    first = session_mod.open_session(root / "corpus-t2-mlp-80-ce").results()
    assert first["vocab"]["rule"] == "seen" and first["vocab"]["rows_after"] != res["vocab"]["rows_after"]
    assert (tmp_path / "out-lr" / "corpus-t2-80-lr0.001-v290.md").is_file()


def test_session_names_fit_the_store_and_keep_the_control_prefix():
    """The store cuts names to 24 characters: a 25-character name ("stdlib-docs-t32-mlp-50-ce")
    came back as "...-50-c", so a re-run did not find it and the control was looked for in vain."""
    import importlib.util

    from engine.run import session as session_mod

    spec = importlib.util.spec_from_file_location("compress_table", SCRIPTS / "compress_table.py")
    ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ct)
    names = set()
    for corpus, teacher in (("licenses", 0), ("licenses", 32), ("stdlib-docs", 32), ("my_long_corpus_file", 96)):
        mlp = ct.session_name(corpus, teacher, "mlp", 0.5)
        mix = ct.session_name(corpus, teacher, "mix", 0.5, 2.0)
        for n in (mlp, mix):
            for copy in ("-ce", "-kd", "-kc"):
                assert session_mod.slug(n + copy) == n + copy  # the store keeps the name whole
        assert mix.startswith(mlp[: -len("-mlp-50")] + "-mix-50")  # one corpus-and-teacher prefix
        names |= {mlp, mix}
    assert len(names) == 8
    assert ct.session_name("licenses", 0, "mlp", 0.5) == "licenses-mlp-50"  # short names unchanged
