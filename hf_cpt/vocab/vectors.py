"""External word vectors for OFA: reading word2vec/fastText text files, building them offline, and mapping them
onto subwords.

OFA needs a word space where old-language and new-language (or general and domain) words are comparable. Without
downloadable aligned vectors you can build one here:

- `build_word_vectors(texts)`: PPMI + truncated SVD on a co-occurrence matrix (Levy & Goldberg, 2014) of the
  domain and general corpora together, so domain and general words share one space. Seconds on CPU, no extra
  dependency beyond scipy.
- `vectors_from_dictionary(vectors, pairs)`: for a new language, place each target-language word at the mean of
  the vectors of its translations (a bilingual lexicon: `source<TAB>target` lines via `read_pairs`, or a dictd
  FreeDict file such as Debian's `dict-freedict-eng-deu` via `read_freedict`), which aligns the new words with
  the old space by construction.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_WORD = re.compile(r"\w+(?:[-'.]\w+)*", re.UNICODE)


@dataclass
class WordVectors:
    """Words and their vectors (`matrix[i]` is `words[i]`'s)."""

    words: list[str]
    matrix: np.ndarray

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2 or self.matrix.shape[0] != len(self.words):
            raise ValueError(f"`matrix` must be [{len(self.words)}, dim], got {tuple(self.matrix.shape)}")
        if not self.words:
            raise ValueError("word vectors are empty")

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @classmethod
    def from_dict(cls, vectors: dict[str, Any]) -> WordVectors:
        words = list(vectors)
        if not words:
            raise ValueError("word vectors are empty")
        return cls(words, np.stack([np.asarray(vectors[w], dtype=np.float32) for w in words]))

    @classmethod
    def load(cls, path: str | os.PathLike, max_words: int | None = None) -> WordVectors:
        """word2vec/fastText text format: optional `count dim` header line, then `word v1 v2 ...` per line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"`word_vectors` file {str(path)!r} does not exist")
        words, rows, dim = [], [], None
        with path.open(encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f):
                parts = line.rstrip("\n").rstrip().split(" ")
                if n == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue
                if len(parts) < 2:
                    continue
                dim = dim or len(parts) - 1
                if len(parts) - 1 != dim:
                    raise ValueError(f"`word_vectors` {str(path)!r} line {n + 1}: {len(parts) - 1} values, "
                                     f"expected {dim}")
                words.append(parts[0])
                rows.append(np.asarray(parts[1:], dtype=np.float32))
                if max_words and len(words) >= max_words:
                    break
        if not words:
            raise ValueError(f"`word_vectors` file {str(path)!r} holds no vectors")
        return cls(words, np.stack(rows))

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(f"{len(self.words)} {self.dim}\n")
            for w, v in zip(self.words, self.matrix):
                f.write(w + " " + " ".join(f"{x:.5g}" for x in v) + "\n")
        tmp.replace(path)


def build_word_vectors(texts: Iterable[str], dim: int = 100, window: int = 5, min_count: int = 3,
                       max_words: int = 50_000, seed: int = 0) -> WordVectors:
    """Static word vectors from raw text: PPMI of windowed co-occurrences (context counts smoothed by ^0.75),
    factorised by truncated SVD; vector = U sqrt(S)."""
    from ..import_utils import require

    require("scipy", "building word vectors for OFA")
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import svds

    docs = [_WORD.findall(t) for t in texts if t]
    counts = Counter(w for d in docs for w in d)
    vocab = [w for w, c in counts.most_common(max_words) if c >= min_count]
    if len(vocab) < 2:
        raise ValueError("the corpus has fewer than 2 words seen `min_count` times: give more text")
    index = {w: i for i, w in enumerate(vocab)}
    rows, cols = [], []
    for d in docs:
        ids = np.array([index.get(w, -1) for w in d], dtype=np.int64)
        for off in range(1, window + 1):
            a, b = ids[:-off], ids[off:]
            keep = (a >= 0) & (b >= 0)
            rows += [a[keep], b[keep]]
            cols += [b[keep], a[keep]]
    r, c = np.concatenate(rows), np.concatenate(cols)
    n = len(vocab)
    cooc = coo_matrix((np.ones_like(r, dtype=np.float64), (r, c)), shape=(n, n)).tocsr()
    cooc.sum_duplicates()
    total = cooc.sum()
    row_p = np.asarray(cooc.sum(1)).ravel() / total
    ctx = np.asarray(cooc.sum(0)).ravel() ** 0.75
    ctx_p = ctx / ctx.sum()
    coo = cooc.tocoo()
    pmi = np.log(coo.data / total) - np.log(row_p[coo.row]) - np.log(ctx_p[coo.col])
    keep = pmi > 0
    ppmi = coo_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n)).tocsr()
    k = min(dim, n - 1)
    rng = np.random.default_rng(seed)
    u, s, _ = svds(ppmi, k=k, v0=rng.standard_normal(n))
    vecs = u * np.sqrt(s)[None, :]
    return WordVectors(vocab, vecs.astype(np.float32))


def read_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """A bilingual lexicon as `source<TAB>target` lines (comments `#`); multi-word entries are kept whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`dictionary` file {str(path)!r} does not exist")
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].strip() and parts[1].strip():
            pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise ValueError(f"`dictionary` file {str(path)!r} has no `source<TAB>target` lines")
    return pairs


_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _DICTD_B64.index(c)
    return n


def read_freedict(index_path: str | os.PathLike, max_pairs: int | None = None) -> list[tuple[str, str]]:
    """Single-word translation pairs from a dictd-format FreeDict lexicon (e.g. Debian's `dict-freedict-eng-deu`:
    `/usr/share/dictd/freedict-eng-deu.index` next to its `.dict.dz`). Takes each headword's first definition line,
    drops grammar and domain annotations (`<masc>`, `[comp.]`) and keeps one-word translations."""
    import gzip

    index = Path(index_path)
    if not index.is_file():
        raise FileNotFoundError(f"`dictionary`: dictd index {str(index)!r} does not exist")
    data_path = next((p for p in (index.with_suffix(".dict.dz"), index.with_suffix(".dict")) if p.is_file()), None)
    if data_path is None:
        raise FileNotFoundError(f"`dictionary`: no .dict.dz or .dict file next to {str(index)!r}")
    data = gzip.open(data_path).read() if data_path.suffix == ".dz" else data_path.read_bytes()
    pairs: list[tuple[str, str]] = []
    for line in index.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00") or not _WORD.fullmatch(parts[0]):
            continue
        start, size = _dictd_number(parts[1]), _dictd_number(parts[2])
        body = data[start:start + size].decode("utf-8", errors="replace").split("\n")
        if len(body) < 2:
            continue
        defs = re.sub(r"<[^>]*>|\[[^\]]*\]|\([^)]*\)", "", body[1])
        for t in re.split(r"[,;]", defs):
            t = t.strip()
            if t and " " not in t and _WORD.fullmatch(t):
                pairs.append((parts[0], t))
        if max_pairs and len(pairs) >= max_pairs:
            break
    if not pairs:
        raise ValueError(f"`dictionary`: no translation pairs found in {str(index)!r}")
    return pairs


def vectors_from_dictionary(vectors: WordVectors, pairs: Sequence[tuple[str, str]],
                            keep_source: bool = True) -> WordVectors:
    """Target-language words placed at the mean of their translations' vectors (translations without a vector are
    skipped); with `keep_source` the source words are kept too, so both languages share the space."""
    index = {w: i for i, w in enumerate(vectors.words)}
    acc: dict[str, list[int]] = {}
    for src, tgt in pairs:
        if src in index:
            acc.setdefault(tgt, []).append(index[src])
    if not acc:
        raise ValueError("no dictionary source word has a vector: check the pair direction (source<TAB>target)")
    words = list(vectors.words) if keep_source else []
    rows = [vectors.matrix] if keep_source else []
    new = [w for w in acc if not (keep_source and w in index)]
    words += new
    rows.append(np.stack([vectors.matrix[acc[w]].mean(0) for w in new]) if new else
                np.zeros((0, vectors.dim), np.float32))
    return WordVectors(words, np.concatenate(rows).astype(np.float32))


def subword_vectors(tokenizer: Any, vectors: WordVectors, token_ids: Sequence[int],
                    max_words: int | None = None) -> torch.Tensor:
    """Each token's vector in the word space: the mean of the vectors of the words whose tokenization (with and
    without a leading space) contains it. Tokens no word covers get a zero row. Returns [len(token_ids), dim]."""
    words = vectors.words[:max_words] if max_words else vectors.words
    variants = list(words) + [" " + w for w in words]
    enc = tokenizer(variants, add_special_tokens=False)["input_ids"]
    want = {t: i for i, t in enumerate(token_ids)}
    rows, owners = [], []
    n = len(words)
    for j, ids in enumerate(enc):
        w = j % n
        for t in set(ids):
            if t in want:
                rows.append(want[t])
                owners.append(w)
    out = torch.zeros(len(token_ids), vectors.dim, dtype=torch.float64)
    if not rows:
        return out
    # a token can meet the same word twice (both variants): count each (token, word) pair once
    pairs = torch.unique(torch.tensor([rows, owners], dtype=torch.long), dim=1)
    mat = torch.from_numpy(vectors.matrix).double()
    out.index_add_(0, pairs[0], mat[pairs[1]])
    counts = torch.zeros(len(token_ids), dtype=torch.float64).index_add_(0, pairs[0], torch.ones(pairs.shape[1],
                                                                                               dtype=torch.float64))
    return out / counts.clamp(min=1)[:, None]
