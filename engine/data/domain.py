"""Domain data: load documents, split them (seeded, by document), tokenize and pack.

The three splits are disjoint at the document level, so held-out perplexity never sees
a calibration or fine-tuning token, nor another copy of the same document.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from engine.config import DataConfig
from engine.errors import MinigptError

SPLITS = ("calibrate", "finetune", "evaluate")
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
             ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def load_documents(cfg: DataConfig, progress=None) -> list[str]:
    """`progress(done, total, rate)` reports downloads (URL sources, hub files)."""
    src = cfg.source.strip()
    if src.startswith("builtin:"):
        from engine.data.corpora import load_builtin

        docs = load_builtin(src.split(":", 1)[1])
    else:
        docs = _from_dataset(cfg, progress)
    docs = [d for d in docs if d and d.strip()]
    if cfg.max_documents:
        docs = docs[: cfg.max_documents]
    if not docs:
        raise MinigptError(f"corpus {src!r} is empty (no non-blank text)",
                           "check data.source, data.split and data.column")
    return docs


def _from_dataset(cfg: DataConfig, progress=None) -> list[str]:
    import datasets

    from engine.data import download

    datasets.disable_progress_bars()  # progress is ours to show (events / rich)
    if download.is_url(cfg.source):
        path = download.fetch(cfg.source, "data.source", progress)
    elif cfg.files and not cfg.source.startswith((".", "/", "~")) and not Path(cfg.source).expanduser().exists():
        path = download.hub_snapshot(cfg.source, "dataset", cfg.files, "data.source", progress)
    else:
        path = Path(cfg.source).expanduser()
    try:
        ds = _open(datasets, path, cfg)
    except MinigptError:
        raise
    except Exception as e:
        raise _dataset_error(cfg, e) from None
    return ds if isinstance(ds, list) else texts_from_rows(ds, cfg)


def _open(datasets, path: Path, cfg: DataConfig):
    """The rows of a saved dataset, a downloaded hub folder, local files or a hub id (or the
    texts themselves, for a positional column)."""
    if path.is_dir() and not cfg.files and _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        return ds[cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
    if path.is_dir() and not cfg.files and _is_hub_folder(path):
        return datasets.load_dataset(str(path), cfg.name or None, split=cfg.split)
    if path.exists():
        return _open_files(datasets, path, cfg)
    if cfg.source.startswith((".", "/", "~")):
        raise MinigptError(f"data path {cfg.source} not found", "check data.source")
    return datasets.load_dataset(cfg.source, cfg.name or None, split=cfg.split)


def _open_files(datasets, path: Path, cfg: DataConfig):
    files = _data_files(path, cfg.files)
    if not files:
        raise MinigptError(f"no data files in {path}", f"supported: {', '.join(sorted(_BUILDERS))}")
    if cfg.column.startswith("#") and not cfg.template:
        return _positional_column(files, cfg)
    kinds = {_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in kinds or len(kinds) != 1:
        raise MinigptError(f"cannot read {path}: mixed or unsupported file types",
                           f"use one of {', '.join(sorted(_BUILDERS))}")
    builder = kinds.pop()
    problems = check_files(files, cfg)
    if problems:  # name the real cause (binary, encoding, format, column) before datasets does not
        raise problems[0]
    kwargs = {}
    if builder == "text":
        kwargs["sample_by"] = "document"
    if builder == "csv" and (cfg.delimiter or files[0].suffix.lower() == ".tsv"):
        kwargs["delimiter"] = cfg.delimiter or "\t"
    return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)


SNIFF = 1 << 20  # bytes of each local file read up front to name what is wrong with it
_JSONL_LINES = 200


def _text_problem(path: Path, head: bytes) -> MinigptError | None:
    """Binary bytes or text that is not UTF-8, in the head of a text-format file."""
    nul = head.find(b"\0")
    if nul >= 0:
        return MinigptError(f"data file {path} is binary, not text (a NUL byte at offset {nul})",
                            f"give a UTF-8 text file of the kind its extension says ({path.suffix or 'no extension'}), "
                            "or point data.source at the right file")
    import codecs

    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        return MinigptError(f"data file {path} is not UTF-8 text (byte 0x{head[e.start]:02x} at offset {e.start})",
                            f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > {path.with_suffix('.utf8' + path.suffix)}")
    return None


def _fields(cfg: DataConfig) -> list[str]:
    """The columns the config reads: the template's fields, else data.column."""
    if cfg.template:
        import string

        return [f for _, f, _, _ in string.Formatter().parse(cfg.template) if f]
    return [] if cfg.column.startswith("#") else [cfg.column]


def check_files(files: list[Path], cfg: DataConfig) -> list[MinigptError]:
    """What is wrong with local data files, read from their first MiB without the datasets
    library: unreadable, binary, not UTF-8, not the format their extension says (JSON lines,
    CSV header, parquet magic), or lacking the configured column. Empty list: nothing seen."""
    out: list[MinigptError] = []
    need = _fields(cfg)
    for f in files:
        problem = _check_file(f, cfg, need)
        if problem is not None:
            out.append(problem)
    return out


def _check_file(f: Path, cfg: DataConfig, need: list) -> MinigptError | None:
    kind = _BUILDERS.get(f.suffix.lower())
    try:
        with open(f, "rb") as fh:
            head = fh.read(SNIFF)
            size = os.fstat(fh.fileno()).st_size
    except OSError as e:
        return MinigptError(f"data file {f} cannot be read ({e.strerror or e})",
                            "check its permissions (chmod a+r) or data.source")
    if kind == "parquet":
        if not head.startswith(b"PAR1"):
            return MinigptError(f"data file {f} is not a parquet file (no PAR1 magic bytes)",
                                "give a real .parquet file, or rename it to the format it holds")
        return None
    bad = _text_problem(f, head)
    if bad is not None:
        return bad
    text = head.decode("utf-8", errors="ignore")
    if kind == "json" and f.suffix.lower() == ".jsonl":
        return _check_jsonl(f, text, size <= SNIFF, need)
    if kind == "json" and text.lstrip()[:1] not in ("[", "{"):
        return MinigptError(f"data file {f} is not JSON (it starts with {text.lstrip()[:12]!r})",
                            "give a JSON array of objects, or JSON Lines in a .jsonl file")
    if kind == "csv" and need:
        return _check_csv_header(f, text, cfg, need)
    return None


def _check_jsonl(f: Path, text: str, complete: bool, need: list) -> MinigptError | None:
    import json

    lines = text.splitlines()
    if not complete and lines:
        lines = lines[:-1]  # the last line may be cut by the sniff
    for n, line in enumerate(lines[:_JSONL_LINES], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            return MinigptError(f"line {n} of {f} is not valid JSON ({str(e).split(':')[0]})",
                                "write one JSON object per line (JSON Lines), e.g. {\"text\": \"...\"}")
        if not isinstance(row, dict):
            return MinigptError(f"line {n} of {f} is a JSON {type(row).__name__}, not an object",
                                "write one JSON object per line, e.g. {\"text\": \"...\"}")
        missing = [c for c in need if c not in row]
        if missing:
            return MinigptError(f"line {n} of {f} has no column {missing[0]!r}",
                                f"set data.column to one of: {', '.join(map(str, row))} (or data.template)")
    return None


def _check_csv_header(f: Path, text: str, cfg: DataConfig, need: list) -> MinigptError | None:
    import csv
    import io

    delim = cfg.delimiter or ("\t" if f.suffix.lower() == ".tsv" else ",")
    header = next(csv.reader(io.StringIO(text.split("\n", 1)[0]), delimiter=delim), [])
    missing = [c for c in need if c not in header]
    if missing:
        return MinigptError(f"{f} has no column {missing[0]!r} in its header row",
                            f"set data.column to one of: {', '.join(header) or '(none)'} (or data.template, "
                            "or data.delimiter if the columns were not split)")
    return None


def _dataset_error(cfg: DataConfig, e: Exception) -> MinigptError:
    """datasets' many exception types, as one line that names the problem and the fix."""
    from engine.data import download

    first = str(e).splitlines()[0][:200] if str(e) else ""
    local = Path(cfg.source).expanduser().exists()
    if local:  # a local file: never suggest hub ids; say what datasets could not read
        cause = e.__cause__ or e.__context__
        why = f"{type(cause).__name__}: {str(cause).splitlines()[0][:160]}" if cause and str(cause) else first
        return MinigptError(f"cannot read data file {cfg.source} ({type(e).__name__}: {why})",
                            "check that it is UTF-8 text in the format its extension says (.txt, .jsonl: one JSON "
                            "object per line, .csv with a header row, .parquet)")
    if isinstance(e, ConnectionError):  # datasets: "Couldn't reach X on the Hub (OfflineModeIsEnabled)"
        return download.hub_unavailable(cfg.source, "dataset", cfg.files, "data.source", reason=first[:120])
    if isinstance(e, (FileNotFoundError, OSError)):
        return MinigptError(f"cannot load dataset {cfg.source!r}: {first}",
                            "check the hub id and network, or download it and give a local path")
    if isinstance(e, ValueError):
        return MinigptError(f"cannot load dataset {cfg.source!r}: {first}", "check data.name (subset) and data.split")
    return MinigptError(f"cannot load dataset {cfg.source!r}: {type(e).__name__}: {first}",
                        "check the hub id, subset and split, or give a local file")


def _is_saved_dataset(path: Path) -> bool:
    """A `save_to_disk` folder (the paper shipped its legal corpus as one)."""
    return (path / "state.json").exists() and (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _is_hub_folder(path: Path) -> bool:
    """A hub dataset repo downloaded as is (`hf download ... --local-dir`): README card + data files."""
    return (path / "README.md").exists() and any(p.suffix.lower() in (".parquet", ".arrow", ".jsonl", ".csv")
                                                 for p in path.rglob("*") if ".cache" not in p.parts)


def _data_files(path: Path, patterns: list) -> list[Path]:
    if not path.is_dir():
        return [path]
    if patterns:
        found = sorted({p for pat in patterns for p in path.glob(pat) if p.is_file()})
        if not found:
            raise MinigptError(f"no files matching {', '.join(patterns)} in {path}",
                               "check data.files (globs relative to data.source)")
        return found
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in _BUILDERS and ".cache" not in p.parts)


def _positional_column(files: list[Path], cfg: DataConfig) -> list[str]:
    """Column `#N` (1-based) of headerless delimited files, e.g. tab-separated dumps."""
    import csv
    import sys

    try:
        n = int(cfg.column[1:])
    except ValueError:
        n = 0
    if n < 1:
        raise MinigptError(f"data.column = {cfg.column!r} is not a column position", "write #1, #2, ... (1-based)")
    csv.field_size_limit(sys.maxsize)
    texts: list[str] = []
    for f in files:
        if f.suffix.lower() not in (".csv", ".tsv", ".txt"):
            raise MinigptError(f"a positional column ({cfg.column}) needs delimited text files, not {f.name}",
                               "name the column instead, e.g. data.column = \"text\"")
        delim = cfg.delimiter or ("\t" if f.suffix.lower() == ".tsv" else ",")
        quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
        with open(f, encoding="utf-8", errors="replace", newline="") as fh:
            rows = csv.reader(fh, delimiter=delim, quoting=quoting)
            if cfg.skip_header:
                next(rows, None)
            texts += [r[n - 1] for r in rows if len(r) >= n]
    if not texts:
        raise MinigptError(f"no row of {files[0].name} has {n} columns (delimiter {cfg.delimiter or 'by extension'!r})",
                           "check data.delimiter and data.column")
    return texts


def texts_from_rows(ds, cfg: DataConfig) -> list[str]:
    columns = list(ds.column_names)
    if cfg.template:
        import string

        needed = [f for _, f, _, _ in string.Formatter().parse(cfg.template) if f]
        missing = [f for f in needed if f not in columns]
        if missing:
            raise MinigptError(f"data.template uses column {missing[0]!r}, which the dataset lacks",
                               f"columns are: {', '.join(map(str, columns))}")
        return [cfg.template.format_map({k: ("" if row[k] is None else row[k]) for k in needed}) for row in ds]
    if cfg.column not in columns:
        raise MinigptError(f"column {cfg.column!r} is not in the dataset",
                           f"set data.column to one of: {', '.join(map(str, columns))} (or data.template)")
    return [str(t) for t in ds[cfg.column] if t is not None]


def texts_sha256(texts: list[str]) -> str:
    """A fingerprint of documents in order (each UTF-8, NUL-separated)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def split_documents(docs: list[str], cfg: DataConfig) -> dict[str, list[str]]:
    """Seeded, document-level split by character share (greedy: most-behind split first)."""
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    target = {"calibrate": cfg.calibrate_fraction, "finetune": cfg.finetune_fraction,
              "evaluate": cfg.evaluate_fraction}
    if len(docs) < 2:
        raise MinigptError(f"corpus has {len(docs)} document(s); held-out evaluation needs at least 2",
                           "add documents, or split your text into several files/rows")
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    chars = {s: 0 for s in SPLITS}
    total = 0
    # the two splits that must not be empty get the first documents
    for s in ("evaluate", "calibrate"):
        d = docs[order.pop(0)]
        out[s].append(d)
        chars[s] += len(d)
        total += len(d)
        if not order:
            break
    for i in order:
        d = docs[i]
        total += len(d)
        s = min((s for s in SPLITS if target[s] > 0), key=lambda s: chars[s] / total - target[s])
        out[s].append(d)
        chars[s] += len(d)
    return out


def tokenize(tokenizer, docs: list[str], max_tokens: int = 0):
    """Concatenate documents into one id stream, separated by EOS (or BOS)."""
    import torch

    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    ids: list[int] = []
    batch = 64
    for i in range(0, len(docs), batch):
        for row in tokenizer(docs[i:i + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            if sep is not None:
                ids.append(sep)
        if max_tokens and len(ids) >= max_tokens:
            break
    if max_tokens:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def blocks(ids, block_size: int):
    """Pack a stream into [n, block_size] non-overlapping blocks (the tail is dropped)."""
    n = ids.numel() // block_size
    return ids[: n * block_size].view(n, block_size)


@dataclass
class DomainData:
    """The tokenized splits of a corpus (document-disjoint)."""

    calibrate: object
    finetune: object
    evaluate: object
    eval_texts: list
    finetune_texts: list = None  # the finetune split's documents (the held-out vocabulary rule validates on some)
    corpus_sha256: str = ""  # of every document, in order: `builtin:licenses` reads what is installed, so
    # two machines' figures compare only where this (and the split settings) agree

    @classmethod
    def build(cls, cfg: DataConfig, tokenizer, max_calib: int = 0, max_eval: int = 0, max_finetune: int = 0,
              progress=None):
        docs = load_documents(cfg, progress)
        parts = split_documents(docs, cfg)
        return cls(calibrate=tokenize(tokenizer, parts["calibrate"], max_calib),
                   finetune=tokenize(tokenizer, parts["finetune"], max_finetune),
                   evaluate=tokenize(tokenizer, parts["evaluate"], max_eval),
                   eval_texts=parts["evaluate"], finetune_texts=parts["finetune"], corpus_sha256=texts_sha256(docs))
