"""How much of the held-out text the training text already holds.

The splits are document-disjoint, which is not enough for a corpus of near-copies: licence
variants (Apache, MIT, BSD, each many times with other copyright lines; `builtin:licenses`
now drops them with these windows) share most of their word sequences across splits. After
recovery on such a corpus, held-out bits per byte measure recall of the fine-tune text as much
as the domain; recovery by cross-entropy on that very text then looks better than
distillation. This module puts a number on it: the share of the held-out text's word n-grams (13 words, the window of
GPT-3's contamination check) that also occur in the reference text.
"""

from __future__ import annotations

N = 13  # words per sequence
HIGH = 0.5  # a share from which a run warns (licences: 0.29-0.94 with near-copies, 0.08 without; docstrings 0.06)


def word_windows(text: str, n: int = N):
    """The text's n-word windows (whitespace-split words), in order."""
    words = text.split()
    return (tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def ngram_overlap(heldout: list[str], reference: list[str], n: int = N) -> dict:
    """`share`: of every n-word window of the held-out documents (counted where it occurs, so a
    repeated window counts each time), the fraction found anywhere in the reference documents;
    None when the held-out text has no window that long. Only the held-out windows are kept in
    memory; the reference is streamed."""
    positions: dict[tuple, int] = {}
    for doc in heldout:
        for g in word_windows(doc, n):
            positions[g] = positions.get(g, 0) + 1
    total = sum(positions.values())
    found: set[tuple] = set()
    for doc in reference:
        for g in word_windows(doc, n):
            if g in positions:
                found.add(g)
        if len(found) == len(positions):
            break
    hit = sum(positions[g] for g in found)
    return {"n": n, "windows": total, "share": round(hit / total, 4) if total else None}
