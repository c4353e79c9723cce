"""Planted truth for the cleaning steps: corpora with known exact duplicates, near duplicates (edits, reorders,
boilerplate wrappers), hard negatives (heavier edits, Jaccard below the threshold) and contamination, and the
precision / recall of a cleaning run against them. Used by the tests and by `bench/dedup.py`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .text import jaccard, normalize_words, word_shingles

BOILERPLATE = ("This page is part of the documentation mirror. Copyright the authors; all rights reserved. "
               "Report errors to the maintainers. Last updated automatically.")


def random_documents(n: int, seed: int = 0, vocab_size: int = 3000, words: tuple[int, int] = (150, 400)
                     ) -> list[str]:
    """`n` distinct documents of Zipf-distributed pseudo-words in paragraphs (no two share much by chance)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(vocab_size)]
    weights = [1.0 / (i + 1) for i in range(vocab_size)]
    docs = []
    for _ in range(n):
        body = rng.choices(vocab, weights, k=rng.randint(*words))
        paragraphs = [" ".join(body[i:i + 40]) + "." for i in range(0, len(body), 40)]
        docs.append("\n\n".join(p.capitalize() for p in paragraphs))
    return docs


def _edit(text: str, rate: float, rng: random.Random) -> str:
    """Replace, delete or insert words at `rate` per word (spread over the document)."""
    out = []
    tokens = text.split(" ")
    for w in tokens:
        r = rng.random()
        if r < rate / 3:
            continue  # delete
        if r < 2 * rate / 3:
            out.append(rng.choice(tokens))  # replace
            continue
        out.append(w)
        if r < rate:
            out.append(rng.choice(tokens))  # insert
    return " ".join(out)


def _reorder(text: str, rng: random.Random) -> str:
    """Swap two paragraphs (or, with one paragraph, move its second half to the front)."""
    paras = text.split("\n\n")
    if len(paras) >= 2:
        i, j = rng.sample(range(len(paras)), 2)
        paras[i], paras[j] = paras[j], paras[i]
        return "\n\n".join(paras)
    w = text.split(" ")
    return " ".join(w[len(w) // 2:] + w[:len(w) // 2])


def _disguise(text: str) -> str:
    """Equal after normalisation: case, spacing and punctuation changed."""
    return "  " + text.upper().replace(" ", "  ").replace(".", " !") + "\n"


def shingle_set(text: str, k: int = 5) -> set[str]:
    return set(word_shingles(normalize_words(text), k))


@dataclass
class PlantedCorpus:
    """`documents` in order; `duplicate[i]`: document i is (by exact Jaccard of its shingles with its original, at
    `threshold`) a duplicate of an earlier one; `kind[i]`: `original`, `exact`, `edit`, `reorder`, `wrap` or
    `hard_negative`; `similarity[i]`: that exact Jaccard (1.0 for originals)."""

    documents: list[str]
    duplicate: list[bool]
    kind: list[str]
    similarity: list[float]
    threshold: float
    counts: dict[str, int] = field(default_factory=dict)


def plant_duplicates(originals: list[str], seed: int = 0, threshold: float = 0.8, shingle_size: int = 5,
                     copies: int = 1, edit_rate: float = 0.01, hard_rate: float = 0.12) -> PlantedCorpus:
    """Every original, then `copies` derived documents per original: an exact (disguised) copy, an edited one
    (`edit_rate` of the words), a reordered one, one wrapped in boilerplate, and a hard negative (`hard_rate` of
    the words edited), shuffled after the originals. The truth is the exact Jaccard of each copy with its original."""
    rng = random.Random(seed)
    derived = []
    for i, text in enumerate(originals):
        for _ in range(copies):
            derived += [(i, "exact", _disguise(text)), (i, "edit", _edit(text, edit_rate, rng)),
                        (i, "reorder", _reorder(text, rng)), (i, "wrap", f"{BOILERPLATE}\n\n{text}\n\n{BOILERPLATE}"),
                        (i, "hard_negative", _edit(text, hard_rate, rng))]
    rng.shuffle(derived)
    docs, dup, kind, sim = list(originals), [False] * len(originals), ["original"] * len(originals), \
        [1.0] * len(originals)
    sets = [shingle_set(t, shingle_size) for t in originals]
    counts: dict[str, int] = {}
    for i, k, text in derived:
        j = jaccard(sets[i], shingle_set(text, shingle_size))
        docs.append(text)
        kind.append(k)
        sim.append(j)
        dup.append(j >= threshold)
        counts[k] = counts.get(k, 0) + 1
    return PlantedCorpus(docs, dup, kind, sim, threshold, counts)


def precision_recall(removed: list[bool], truth: list[bool]) -> tuple[float, float]:
    """Precision (removed that are true duplicates) and recall (true duplicates removed)."""
    tp = sum(r and t for r, t in zip(removed, truth))
    n_removed, n_true = sum(removed), sum(truth)
    return (tp / n_removed if n_removed else 1.0), (tp / n_true if n_true else 1.0)


def plant_contamination(train: list[str], held_out: list[str], n: int = 13, seed: int = 0, every: int = 4
                        ) -> tuple[list[str], list[bool]]:
    """Copies of `train` where every `every`-th document gets a span of `n`..`n + 7` consecutive words of a
    held-out document pasted in (contaminated) and the one after it a span of `n - 1` words (not contaminated
    by the definition); returns the documents and the truth."""
    rng = random.Random(seed)
    out, truth = [], []
    for i, text in enumerate(train):
        src = normalize_words(held_out[rng.randrange(len(held_out))])
        if i % every == 0 or i % every == 1:
            length = rng.randint(n, n + 7) if i % every == 0 else n - 1
            start = rng.randrange(max(1, len(src) - length))
            span = " ".join(src[start:start + length])
            words = text.split(" ")
            at = rng.randrange(len(words) + 1)
            text = " ".join(words[:at] + [span] + words[at:])
            truth.append(i % every == 0)
        else:
            truth.append(False)
        out.append(text)
    return out, truth
