"""Presets: every domain's loading path on local files of the paper's formats, the paper's
question-set form, URL/hub downloads, and the one-line errors when the network is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import config
from engine.data import domain as data
from engine.data import download
from engine import presets
from engine.errors import MinigptError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Own caches: nothing fetched before (by a user or another test) can hide a download."""
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))


def _offline(monkeypatch, tmp_path) -> None:
    """HF_HUB_OFFLINE=1, also for libraries imported (and their settings read) before this test."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def _data(preset: str, **keys) -> config.DataConfig:
    return config.from_dict({"data": {"preset": preset, **keys}}).data


def _docs(preset: str, **keys) -> list[str]:
    return data.load_documents(_data(preset, **keys))


# ---- the presets themselves ----------------------------------------------------------------------
@pytest.mark.process
def test_preset_lists_cover_the_paper_and_load_without_torch():
    code = ("import sys, engine.presets as p; assert 'torch' not in sys.modules, 'torch imported';"
            "print(len(p.MODELS), len(p.DOMAINS), len(p.MCQ_SETS), len(p.paper_thresholds()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["5", "8", "4", "18"]
    assert {m.source for m in presets.MODELS} == {"embedded:smollm2", "embedded:gemma3-270m", "microsoft/phi-1_5",
                                                  "facebook/opt-1.3b", "princeton-nlp/Sheared-LLaMA-1.3B"}
    assert {d.name for d in presets.DOMAINS if d.paper} == {"us-law", "medical", "en-tw", "skyrim", "economics",
                                                            "general"}
    assert [m.questions for m in presets.MCQ_SETS] == [95, 100, 100, 200]
    grid = presets.paper_thresholds()
    assert len({tuple(sorted(t.items())) for t in grid}) == 18
    assert {t["embedding"] for t in grid} == {-1.0, 0.0}
    assert {t["linear"] for t in grid} == {t["activation"] for t in grid} == {1e-5, 1e-3, 1e-1}
    for m in presets.MCQ_SETS:
        assert m.url.startswith("https://raw.githubusercontent.com/tval2/contextual-pruning/")
        assert m.url.endswith("/question_datasets/" + m.file)


def test_preset_fills_only_what_the_config_leaves_out():
    cfg = config.from_dict({"model": {"preset": "phi-1.5"}, "data": {"preset": "skyrim"}})
    assert cfg.model.source == "microsoft/phi-1_5"
    assert (cfg.data.delimiter, cfg.data.column) == ("\t", "#7")
    assert cfg.data.source.endswith("/jd7h/sentiment-lexicon-skyrim/master/data/skyrim_dialogue.csv")
    assert cfg.evaluate.mcq_files == [presets.mcq("skyrim").url]
    # an explicit key wins (a local copy), and the expanded config round-trips unchanged
    own = config.from_dict({"data": {"preset": "skyrim", "source": "/data/skyrim.tsv", "skip_header": True}})
    assert own.data.source == "/data/skyrim.tsv" and own.data.column == "#7" and own.data.skip_header
    assert config.from_dict(own.to_dict()) == own
    # switching presets with an override drops what the old one filled in
    switched = config.apply_overrides(cfg, ["data.preset=economics"])
    assert (switched.data.column, switched.data.delimiter) == ("Text", "")
    assert switched.evaluate.mcq_files == [presets.mcq("economics").url]
    with pytest.raises(MinigptError, match="unknown domain preset 'law'.*us-law"):
        config.from_dict({"data": {"preset": "law"}})


# ---- loading paths on local files of each format -------------------------------------------------
SKYRIM_ROWS = [
    ["000a1", "Lydia", "", "Combat", "", "1", "I am sworn to carry your burdens.", "", ""],
    ["000a2", "Guard", "", "Idle", "", "2", 'I used to be an adventurer like you. Then I took an "arrow" in the knee.',
     "", ""],
    ["000a3", "Nazeem", "", "Hello", "", "3", "Do you get to the Cloud District very often?", "", ""],
]


def test_skyrim_tab_separated_dump_column_7(tmp_path):
    path = tmp_path / "skyrim_dialogue.csv"  # tab-separated despite .csv, like the original
    path.write_text("".join("\t".join(r) + "\n" for r in SKYRIM_ROWS), encoding="utf-8")
    docs = _docs("skyrim", source=str(path))
    assert docs == [r[6] for r in SKYRIM_ROWS]  # quotes kept as text: QUOTE_NONE for tab dumps
    assert _docs("skyrim", source=str(path), skip_header=True) == [r[6] for r in SKYRIM_ROWS[1:]]
    with pytest.raises(MinigptError, match="no row of skyrim_dialogue.csv has 12 columns"):
        _docs("skyrim", source=str(path), column="#12")


def test_translation_pairs_joined_by_template_from_a_hub_download_folder(tmp_path):
    # the layout `hf download --repo-type dataset ... --local-dir PATH` leaves: a card + data files
    folder = tmp_path / "coct"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# COCT\n")
    pairs = [{"en": f"Sentence {i} in English.", "ch": f"第{i}句中文。"} for i in range(6)]
    (folder / "data" / "train-00000-of-00001.jsonl").write_text("\n".join(json.dumps(p, ensure_ascii=False)
                                                                          for p in pairs), encoding="utf-8")
    docs = _docs("en-tw", source=str(folder))
    assert docs == [f"{p['en']}\n{p['ch']}" for p in pairs]


def test_legal_jsonl_files_picked_from_a_script_repo_folder(tmp_path):
    folder = tmp_path / "legal_lama"
    folder.mkdir()
    (folder / "README.md").write_text("# LegalLAMA\n")
    (folder / "legal_lama.py").write_text("# a loading script the datasets library no longer runs\n")
    subsets = {"us_terms": 3, "us_crimes": 2, "contract_sections": 2, "ecthr_terms": 4}
    for name, n in subsets.items():
        rows = [{"text": f"{name} <mask> clause {i}.", "label": "x", "category": name} for i in range(n)]
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs = _docs("us-law", source=str(folder))
    assert len(docs) == 7 and not any("ecthr" in d for d in docs)  # only the paper's three subsets


def test_medical_text_column_csv(tmp_path):
    path = tmp_path / "medquad.csv"
    path.write_text('text\n"### Instruction: What is glaucoma?\n### Response: A group of eye diseases."\n'
                    '"### Instruction: What causes it?\n### Response: Pressure in the eye."\n', encoding="utf-8")
    assert _docs("medical", source=str(path)) == [
        "### Instruction: What is glaucoma?\n### Response: A group of eye diseases.",
        "### Instruction: What causes it?\n### Response: Pressure in the eye."]


def test_economics_csv_text_column_multiline_and_blank_rows(tmp_path):
    path = tmp_path / "economics_text_dataset_8500.csv"
    path.write_text('URL,Text,Extra\nhttp://a,"Supply meets demand.\nPrices adjust.",1\nhttp://b,,2\n'
                    'http://c,"Inflation, in short, erodes savings.",3\n', encoding="utf-8")
    assert _docs("economics", source=str(path)) == ["Supply meets demand.\nPrices adjust.",
                                                    "Inflation, in short, erodes savings."]


def test_wikitext_test_split_only_from_a_hub_folder(tmp_path):
    import datasets

    folder = tmp_path / "wikitext"
    sub = folder / "wikitext-2-raw-v1"
    sub.mkdir(parents=True)
    (folder / "README.md").write_text("# wikitext\n")
    datasets.Dataset.from_dict({"text": [" = Valkyria = \n", "", " The game began in 2010 .\n"]}).to_parquet(
        str(sub / "test-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"text": [" train line \n"]}).to_parquet(str(sub / "train-00000-of-00001.parquet"))
    docs = _docs("general", source=str(folder))
    assert docs == [" = Valkyria = \n", " The game began in 2010 .\n"]


def test_paper_question_json_loads_with_its_context(tmp_path):
    from engine.evaluate import mcq

    path = tmp_path / "basic_economics_dataset.json"
    path.write_text(json.dumps({"context": "Economics Test:", "questions": {
        "Economics may best be defined as a": {"choices": ["study of supply.", "study of scarcity.",
                                                           "description.", "branch of sociology."], "answer": 1},
        "A basic requirement for survival is a(n)": {"choices": ["need.", "want.", "cost.", "paradox."],
                                                     "answer": 0}}}))
    s = mcq.load(str(path))
    assert s.context == "Economics Test:" and len(s.items) == 2
    assert s.items[0].answer == 1 and s.items[0].choices[1] == "study of scarcity."


# ---- downloads -------------------------------------------------------------------------------------
def _closed_port_url(name: str) -> str:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"  # nothing listens: connection refused


def test_url_source_is_downloaded_once_into_the_cache_with_progress(tmp_path, monkeypatch):
    from test_download import Server

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    body = "\n".join("\t".join(r) for r in SKYRIM_ROWS).encode()
    seen = []
    with Server(body, name="skyrim_dialogue.csv") as srv:  # a real HTTP server on a local socket
        cfg = _data("skyrim", source=srv.url)
        docs = data.load_documents(cfg, progress=lambda done, total, rate=0.0: seen.append((done, total)))
        assert docs == [r[6] for r in SKYRIM_ROWS]
        assert len(srv.log) == 1 and seen[-1] == (len(body), len(body))
        cached = download.cache_path(cfg.source)
        assert cached.read_bytes() == body and str(cached).startswith(str(tmp_path / "cache"))
        assert data.load_documents(cfg) == docs and len(srv.log) == 1  # second use: from the cache


def test_question_set_url_downloads_and_loads(tmp_path, monkeypatch):
    from engine.evaluate import mcq
    from test_download import Server

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    body = json.dumps({"context": "Skyrim sentence completion", "questions": {
        "Let me guess, someone stole": {"choices": ["your sweetroll?", "the moon.", "a horse.", "Ulfric."],
                                        "answer": 0}}}).encode()
    with Server(body) as srv:
        s = mcq.load(srv.url)
    assert s.context == "Skyrim sentence completion" and len(s.items) == 1


def test_url_download_failure_says_what_to_fetch_and_where(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF", 0.01)
    cfg = _data("economics", source=_closed_port_url("economics_text_dataset_8500.csv"))
    with pytest.raises(MinigptError) as e:
        data.load_documents(cfg)
    line = e.value.line()
    assert "\n" not in line and "cannot download " + cfg.source in line and "ConnectionError" in line
    assert f"curl -L -o {download.cache_path(cfg.source)}" in line and "set data.source = PATH" in line
    assert not download.cache_path(cfg.source).exists()  # no half file left behind
    from engine.evaluate import mcq

    with pytest.raises(MinigptError, match="set evaluate.mcq_files = PATH"):
        mcq.load(_closed_port_url("basic_economics_dataset.json"))


@pytest.mark.parametrize("preset,command", [
    ("us-law", "hf download --repo-type dataset lexlms/legal_lama --include us_terms.jsonl --include "
               "us_crimes.jsonl --include contract_sections.jsonl --local-dir PATH"),
    ("en-tw", "hf download --repo-type dataset zetavg/coct-en-zh-tw-translations-twp-300k --local-dir PATH"),
])
def test_hub_preset_offline_is_one_line_naming_the_download(monkeypatch, tmp_path, preset, command):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(MinigptError) as e:
        _docs(preset)
    line = e.value.line()
    assert "\n" not in line and "is not available offline" in line
    assert f"`{command}`" in line and line.endswith("set data.source = PATH")


def test_grid_prefetch_of_a_hub_model_offline_is_one_line(monkeypatch, tmp_path):
    from engine.run import grid
    from engine.run import gridrun

    _offline(monkeypatch, tmp_path)
    spec = grid.spec_from_dict({"models": ["opt-1.3b"], "domains": ["licenses"], "methods": ["mask"],
                                "thresholds": [{"activation": 0.1}]}, folder=tmp_path / "g")
    with pytest.raises(MinigptError) as e:
        gridrun.prefetch(spec)
    assert e.value.line() == ("model facebook/opt-1.3b is not available offline — download it with "
                              "`hf download facebook/opt-1.3b --local-dir PATH` and set model.source = PATH")
