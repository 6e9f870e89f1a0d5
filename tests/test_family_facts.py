"""The adapter owns every family fact: no other engine module names a family or a model type.

Scans the code tokens (identifiers and string literals; comments and docstrings are
prose, and skipped) of every `engine/` module but `engine/models/adapters.py`:

* a string literal that *is* a family or model-type name ("gpt2", "llama"), or an
  identifier with one as a word (`GPT2Adapter`, `is_llama`);
* `model_type` itself, as identifier or string: dispatching on it is the adapter's job
  (`Adapter.architecture` gives it for messages);
* the config fields, module names and module classes that differ between families
  (width and context-length fields, bias switches, gate_proj / c_fc..., Conv1D).

The names come from the adapters' own registry, so a new adapter extends the check.
"""

from __future__ import annotations

import io
import re
import token
import tokenize
from pathlib import Path

import pytest

from engine.models import adapters

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"
ADAPTERS_FILE = ENGINE / "models" / "adapters.py"


def family_names() -> set[str]:
    names = set()
    for a in adapters.ADAPTERS:
        names.add(a.family.lower())
        names.update(t.lower() for t in a.model_types)
    names.discard("")
    return names


def family_fields() -> set[str]:
    """Config fields, module names and classes that differ between families (from the adapters)."""
    fields = {"model_type", "Conv1D", "nf", "do_layer_norm_before", "n_embd", "n_inner", "n_positions", "n_ctx",
              "ffn_dim", "max_position_embeddings", "mlp_bias"}
    for a in adapters.ADAPTERS:
        fields.add(a.width_key)
        fields.update(a.context_keys)
        fields.update(a.bias_switches.values())
        # module names; the paths (model.layers, transformer.h) are made of generic words: left out
        fields.update(a.in_names + (a.out_name,) + a.attn_names)
        fields.update((a.head_path, a.embed_path.rsplit(".", 1)[-1]))
    return fields


def _words(identifier: str) -> list[str]:
    """`GPT2Adapter` -> gpt2, adapter; `is_llama_like` -> is, llama, like; `qwen2` -> qwen2."""
    parts = []
    for chunk in identifier.split("_"):
        parts += re.findall(r"[A-Z]+\d*(?=[A-Z][a-z])|[A-Z]?[a-z]+\d*|[A-Z]+\d*|\d+", chunk)
    return [p.lower() for p in parts]


def code_tokens(source: str):
    """(kind, text, line) of identifiers and string literals; docstrings and comments skipped."""
    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    fstring_middle = getattr(token, "FSTRING_MIDDLE", None)
    skip = {tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
    significant = [t for t in toks if t.type not in skip]
    for i, t in enumerate(significant):
        if t.type == tokenize.NAME:
            yield "name", t.string, t.start[0]
        elif t.type == tokenize.STRING:
            before = significant[i - 1].type if i else tokenize.NEWLINE
            after = significant[i + 1].type if i + 1 < len(significant) else tokenize.ENDMARKER
            if before == tokenize.NEWLINE and after in (tokenize.NEWLINE, tokenize.ENDMARKER):
                continue  # a bare string statement: a docstring
            yield "string", _literal(t.string), t.start[0]
        elif fstring_middle is not None and t.type == fstring_middle:
            yield "string", t.string, t.start[0]


def _literal(text: str) -> str:
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):  # f-strings (before 3.12 they are one token)
        return text
    return value if isinstance(value, str) else text


def leaks(source: str, names: set[str], fields: set[str]) -> list[str]:
    found = []
    for kind, text, line in code_tokens(source):
        if kind == "name":
            hit = next((w for w in _words(text) if w in names), None) or (text if text in fields else None)
        else:
            s = text.strip()
            hit = s if s.lower() in names or s in fields else None
        if hit:
            found.append(f"line {line}: {kind} {text!r} ({hit})")
    return found


def engine_files() -> list[Path]:
    return sorted(p for p in ENGINE.rglob("*.py") if p != ADAPTERS_FILE)


@pytest.mark.parametrize("path", engine_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_family_fact_outside_the_adapters(path):
    found = leaks(path.read_text(encoding="utf-8"), family_names(), family_fields())
    assert not found, (f"{path.relative_to(ROOT)} knows family facts; move them behind an adapter method "
                       "in engine/models/adapters.py:\n  " + "\n  ".join(found))


def test_the_registry_names_the_families():
    names = family_names()
    assert {"llama", "mistral", "qwen2", "qwen3", "opt", "phi", "gpt2"} <= names


@pytest.mark.parametrize("snippet, expected", [
    ('if model.config.model_type == "gpt2":\n    pass\n', 2),  # the identifier and the string
    ('TYPES = ("llama",)\n', 1),
    ('class GPT2Thing:\n    pass\n', 1),
    ('from transformers.pytorch_utils import Conv1D\n', 1),
    ('n = getattr(cfg, "n_positions", 0)\n', 1),
    ('w = layer.mlp.down_proj.weight\n', 1),
    ('x = f"{a} {b}"\n', 0),
    ('"""A docstring about llama, gpt2 and Conv1D."""\n', 0),
    ('def f():\n    """gpt2"""\n    return 1\n', 0),
    ('# gpt2 in a comment\nx = 1\n', 0),
    ('msg = "supported: GPT-2 style (SmolLM2, OPT, Phi)"\n', 0),  # prose in a message
    ('optimizer = philosophy = None\n', 0),  # words that merely start like a family name
])
def test_the_scanner_finds_what_it_must_and_nothing_else(snippet, expected):
    assert len(leaks(snippet, family_names(), family_fields())) == expected


def test_the_adapters_module_itself_holds_the_facts():
    """Sanity: the scanner, pointed at the adapters, finds the facts they own."""
    found = leaks(ADAPTERS_FILE.read_text(encoding="utf-8"), family_names(), family_fields())
    assert any("gpt2" in f for f in found) and any("Conv1D" in f for f in found)
