"""Bad input: one line naming the problem and the fix, exit code 2, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny

pytestmark = pytest.mark.process  # every test runs the `minigpt` CLI as a subprocess

ROOT = Path(__file__).resolve().parent.parent


def minigpt(*args, cwd, env=None):
    e = {**os.environ, "MINIGPT_SESSIONS": str(cwd / "sessions"), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "minigpt_tui.cli", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=300)


def write_cfg(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1, r.stderr
    assert err[0].startswith("error: ") and "Traceback" not in r.stderr
    assert " — " in err[0], "the message must say the fix"
    for n in needles:
        assert n in err[0], err[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.save("llama", tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture()
def corpus(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"body": tiny.TEXT[i * 50:(i + 1) * 50 + 400]}) for i in range(20)))
    return docs


def base_toml(model, data, extra=""):
    return (f'[model]\nsource = "{model}"\n[data]\nsource = "{data}"\ncolumn = "body"\n'
            f'[calibrate]\nblock_size = 32\nmax_tokens = 512\n[evaluate]\nblock_size = 32\nmax_tokens = 256\n{extra}')


def test_unknown_model_path(tmp_path, corpus):
    cfg = write_cfg(tmp_path / "c.toml", base_toml("./no/such/model", corpus))
    assert_one_line_error(minigpt("run", str(cfg), "--foreground", cwd=tmp_path), "no/such/model", "not found")


def test_unknown_hub_id_offline(tmp_path, corpus):
    cfg = write_cfg(tmp_path / "c.toml", base_toml("nobody-xyz/not-a-model", corpus))
    assert_one_line_error(minigpt("run", str(cfg), "--foreground", cwd=tmp_path), "nobody-xyz/not-a-model")


def test_unsupported_architecture(tmp_path, corpus):
    from transformers import BloomConfig, BloomForCausalLM

    d = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=320, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(d)
    tiny.tokenizer().save_pretrained(d)
    cfg = write_cfg(tmp_path / "c.toml", base_toml(d, corpus))
    assert_one_line_error(minigpt("run", str(cfg), "--foreground", cwd=tmp_path), "'bloom'", "llama")


def test_missing_text_column(tmp_path, tiny_dir, corpus):
    cfg = write_cfg(tmp_path / "c.toml", base_toml(tiny_dir, corpus).replace('column = "body"', 'column = "text"'))
    assert_one_line_error(minigpt("run", str(cfg), "--foreground", cwd=tmp_path), "'text'", "body")


def test_empty_corpus(tmp_path, tiny_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"body": "   "}) + "\n")
    cfg = write_cfg(tmp_path / "c.toml", base_toml(tiny_dir, empty))
    assert_one_line_error(minigpt("run", str(cfg), "--foreground", cwd=tmp_path), "empty")


def test_threshold_that_empties_a_layer(tmp_path, tiny_dir, corpus):
    extra = '[prune]\nrule = "threshold"\nactivation_threshold = 1e9\n'
    cfg = write_cfg(tmp_path / "c.toml", base_toml(tiny_dir, corpus, extra))
    r = minigpt("run", str(cfg), "--foreground", cwd=tmp_path)
    assert_one_line_error(r, "layer 0", "allow_layer_collapse")
    # the session keeps what it had: statistics from the completed calibrate stage
    sess = next((tmp_path / "sessions").iterdir())
    assert (sess / "stats" / "calibration.safetensors").exists()
    state = json.loads((sess / "state.json").read_text())
    assert state["status"] == "failed" and "calibrate" in state["completed_stages"]


def test_corrupt_config(tmp_path):
    cfg = write_cfg(tmp_path / "c.toml", "[model\nsource = 1")
    assert_one_line_error(minigpt("run", str(cfg), cwd=tmp_path), "not valid TOML")


def test_unknown_config_key(tmp_path):
    cfg = write_cfg(tmp_path / "c.toml", "[prune]\nratoi = 0.3\n")
    assert_one_line_error(minigpt("run", str(cfg), cwd=tmp_path), "prune.ratoi", "ratio")


def test_corrupt_session(tmp_path):
    s = tmp_path / "sessions" / "broken"
    s.mkdir(parents=True)
    (s / "config.toml").write_text("[model\n")
    assert_one_line_error(minigpt("resume", "broken", cwd=tmp_path), "broken", "corrupt")


@pytest.mark.parametrize("args, needle", [(("check", "a.toml", "b.toml"), "unexpected extra argument"),
                                          (("check",), "Missing argument"),
                                          (("sessoins",), "No such command"),
                                          (("run", "a.toml", "--nprco", "2"), "No such option")])
def test_a_usage_error_is_one_line_naming_the_help(tmp_path, args, needle):
    """Typos on the command line get one line and the --help to read, not click's boxed panel."""
    r = minigpt(*args, cwd=tmp_path)
    assert_one_line_error(r, needle, "--help`")


def test_foreground_with_several_processes_is_refused_before_a_session_exists(tmp_path, tiny_dir, corpus):
    cfg = write_cfg(tmp_path / "c.toml", base_toml(tiny_dir, corpus))
    assert_one_line_error(minigpt("run", str(cfg), "--foreground", "--nproc", "2", cwd=tmp_path), "torchrun")
    assert not (tmp_path / "sessions").exists() or not any((tmp_path / "sessions").iterdir())
