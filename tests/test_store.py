"""Session store, event log and config: the files a run leaves behind must stay readable."""

import json

import pytest

from engine import config as config_mod
from engine.run import session as session_mod
from engine.errors import MinigptError
from engine.run.events import EventReader, EventWriter, read_events


def test_config_roundtrip_and_overrides(tmp_path):
    cfg = config_mod.RunConfig()
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    assert config_mod.load(p) == cfg
    cfg2 = config_mod.apply_overrides(cfg, ["prune.ratio=0.5", "prune.rule=ratio", "data.source=x.jsonl"])
    assert (cfg2.prune.ratio, cfg2.prune.rule, cfg2.data.source) == (0.5, "ratio", "x.jsonl")
    with pytest.raises(MinigptError, match="wrong type"):
        config_mod.apply_overrides(cfg, ["prune.ratio=abc"])
    with pytest.raises(MinigptError, match="prune.mode"):
        config_mod.apply_overrides(cfg, ["prune.mode=cut"])


def test_events_tolerate_torn_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    w = EventWriter(path)
    w.emit("stage_start", stage="calibrate")
    w.close()
    with open(path, "a") as f:
        f.write('{"t": 1, "type": "progress", "do')  # a writer killed mid-line
    r = EventReader(path)
    assert [e["type"] for e in r.poll()] == ["stage_start"]
    w2 = EventWriter(path)  # a resumed writer starts on a fresh line
    w2.emit("stage_end", stage="calibrate")
    w2.close()
    assert [e["type"] for e in r.poll()] == ["stage_end"]
    assert r.bad_lines == 1
    assert [e["type"] for e in read_events(path)] == ["stage_start", "stage_end"]


def test_session_create_list_state(tmp_path):
    cfg = config_mod.RunConfig(name="demo")
    s = session_mod.create(cfg, tmp_path)
    s2 = session_mod.create(cfg, tmp_path)
    assert (s.id, s2.id) == ("demo", "demo-2")
    assert s.config() == cfg
    s.update_state(status="running", stage="calibrate")
    assert s.status() == "disconnected"  # nobody holds the runner lock
    with s.acquire():
        assert s.status() == "running"
        with pytest.raises(MinigptError, match="already being run"):
            with s.acquire():
                pass
    rows = [session_mod.summary(x) for x in session_mod.list_sessions(tmp_path)]
    assert {r["id"] for r in rows} == {"demo", "demo-2"}


def test_a_users_session_name_is_kept_whole_or_refused(tmp_path):
    """A name of NAME_MAX characters is the folder; a longer one was cut silently (two names
    differing after the cut became `x` and `x-2`): now it is a one-line error and no folder."""
    whole = "licenses-t128-mix-50-s20"
    assert len(whole) == session_mod.NAME_MAX
    assert session_mod.create(config_mod.RunConfig(), tmp_path, name=whole).id == whole
    assert session_mod.create(config_mod.RunConfig(name="My Run_v2"), tmp_path).id == "my-run-v2"
    for kw in ({"name": whole + "-kd"}, {}):
        cfg = config_mod.RunConfig(name="" if kw else "docstrings-t128-mlp-50-control")
        with pytest.raises(MinigptError) as ei:
            session_mod.create(cfg, tmp_path, **kw)
        assert "characters as a folder name" in ei.value.problem and "--name" in ei.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == [whole, "my-run-v2"]


def test_corrupt_state_is_reported_not_lost(tmp_path):
    s = session_mod.create(config_mod.RunConfig(name="x"), tmp_path)
    (s.path / "state.json").write_text("{not json")
    with pytest.raises(MinigptError, match="corrupt"):
        s.state()
    assert session_mod.summary(s)["status"] == "corrupt"
    assert (s.path / "state.json").read_text() == "{not json"  # nothing overwritten


def test_data_splits_are_document_disjoint_and_seeded():
    from engine.data.domain import split_documents

    docs = [f"document {i} " + "word " * (10 + i % 7) for i in range(60)]
    cfg = config_mod.DataConfig()
    a, b = split_documents(docs, cfg), split_documents(docs, cfg)
    assert a == b
    sets = [set(a[k]) for k in ("calibrate", "finetune", "evaluate")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, sets)) == 60
    share = sum(map(len, a["evaluate"])) / sum(map(len, docs))
    assert 0.15 < share < 0.25
    cfg.seed = 1
    assert split_documents(docs, cfg) != a


def test_corpus_fingerprint_names_the_documents_and_their_order():
    """`builtin:licenses` reads whatever is installed: the fingerprint is how two installs' figures
    are told apart. Same documents, same digest; an edit, a reorder or a moved boundary, another."""
    from engine.data.domain import texts_sha256

    docs = ["MIT License\nPermission is hereby granted", "Apache License 2.0", "BSD 3-Clause"]
    assert texts_sha256(docs) == texts_sha256(list(docs))
    assert len({texts_sha256(docs), texts_sha256(docs[::-1]), texts_sha256(docs[:2]),
                texts_sha256([docs[0] + docs[1], docs[2]]), texts_sha256([docs[0], docs[1] + " ", docs[2]])}) == 5


def test_template_joins_columns(tmp_path):
    from engine.data.domain import load_documents

    f = tmp_path / "pairs.csv"
    f.write_text("en,ch\nhello,你好\nbye,再見\n")
    cfg = config_mod.DataConfig(source=str(f), template="{en}\n{ch}")
    assert load_documents(cfg) == ["hello\n你好", "bye\n再見"]
    with pytest.raises(MinigptError, match="'zh'"):
        load_documents(config_mod.DataConfig(source=str(f), template="{en} {zh}"))


def test_builtin_corpora_are_real_and_distinct():
    from engine.data.corpora import load_builtin

    lic, docs = load_builtin("licenses"), load_builtin("stdlib-docs")
    assert len(lic) >= 5 and len(docs) >= 100
    assert sum("permission" in d.lower() or "warranty" in d.lower() for d in lic) > len(lic) / 2
    assert sum("return" in d.lower() for d in docs) > len(docs) / 2
    assert not set(lic) & set(docs)


def test_the_licence_corpus_does_not_depend_on_the_order_distributions_are_listed(monkeypatch):
    """site-packages is listed in the filesystem's order; the corpus (which near-copy is kept,
    and so the seeded split) must not follow it."""
    import importlib.metadata as md

    from engine.data import corpora

    listed = list(md.distributions())
    first = corpora.licenses()
    monkeypatch.setattr(corpora.md, "distributions", lambda: iter(listed[::-1]))
    assert corpora.licenses() == first


def test_licence_near_copies_are_kept_once(tmp_path):
    from engine.data import corpora

    words = [f"w{i}" for i in range(300)]
    base = " ".join(words)
    other = " ".join(f"v{i}" for i in range(300))
    files = {
        "a": f"Copyright 2020 A\n{base}",
        "b": f"Copyright 2021 B\n{base}",  # the same text but for its copyright line
        "c": " ".join(words[:200] + [f"x{i}" for i in range(100)]),  # two thirds of a's windows: a near-copy
        "d": " ".join(words[:100] + [f"y{i}" for i in range(200)]),  # a third: its own text
        "e": other,
    }
    paths = []
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    kept = corpora._read_unique(paths, min_chars=10)
    assert kept == [files["a"], files["d"], files["e"]]


def test_redoing_a_stage_forgets_what_it_and_later_stages_wrote():
    from engine.run.pipeline import _forget_results

    res = {"calibration": {"block_size": 8}, "prune": {"widths": [4]}, "vocab": {"rows_after": 3},
           "finetune": {"steps": 2},
           "models": {"base": {"ppl": 9.0, "params": 10, "calibration_tokens": 64, "vocab_bpb": 1.0},
                      "pruned": {"ppl": 12.0}, "finetuned": {"ppl": 10.0}}}
    _forget_results(res, ("finetune", "evaluate"))
    assert "finetune" not in res and "finetuned" not in res["models"] and res["models"]["pruned"] == {"ppl": 12.0}
    _forget_results(res, ("prune", "finetune", "evaluate"))
    assert "prune" not in res and "vocab" not in res and "pruned" not in res["models"]
    assert res["models"]["base"] == {"ppl": 9.0, "calibration_tokens": 64}  # the baseline stays
    _forget_results(res, ("calibrate",))
    assert "calibration" not in res and res["models"]["base"] == {"ppl": 9.0}
