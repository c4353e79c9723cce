"""Near-duplicate detection: MinHash signatures of word shingles, an LSH band index, and a signature check.

MinHash (Broder, "On the resemblance and containment of documents", 1997): for a shingle set S and a random
hash h, P[min h(S_a) = min h(S_b)] = J(S_a, S_b), the Jaccard similarity; a signature of `num_perm` such minima
estimates J as the fraction of agreeing entries (standard error sqrt(J(1-J)/num_perm), 0.035 at J=0.8 with 128).
LSH banding (Indyk & Motwani 1998; Leskovec et al., "Mining of Massive Datasets", ch. 3): the signature is cut
into `b` bands of `r` rows; two documents become candidates when any band is equal, with probability
P(J) = 1 - (1 - J^r)^b. The bands are chosen with the S-curve's steep part *below* the threshold (high recall),
and every candidate is then checked on its full signature (estimated J >= threshold), which restores precision.

The hashing is done by a maintained library (`rensa`, a Rust MinHash, by default; `datasketch` as the reference
implementation); see docs/benchmarks.md for the measurement that chose it. Both are seeded, so a signature is the
same in every process and every run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

_FNV_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_EMPTY = np.uint32(0xFFFFFFFF)


def _rensa_signature(num_perm: int, seed: int) -> Callable[[Sequence[str]], np.ndarray]:
    from rensa import RMinHash

    def sign(shingles: Sequence[str]) -> np.ndarray:
        m = RMinHash(num_perm=num_perm, seed=seed)
        m.update(list(shingles))
        return np.asarray(m.digest(), dtype=np.uint32)

    return sign


def _datasketch_signature(num_perm: int, seed: int) -> Callable[[Sequence[str]], np.ndarray]:
    from datasketch import MinHash

    template = MinHash(num_perm=num_perm, seed=seed)  # the permutations are built once, then copied

    def sign(shingles: Sequence[str]) -> np.ndarray:
        m = template.copy()
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m.hashvalues.astype(np.uint32)

    return sign


# backend name -> (import name, pip requirement, factory(num_perm, seed) -> signature function)
MINHASH_BACKENDS: dict[str, tuple[str, str, Callable[[int, int], Callable[[Sequence[str]], np.ndarray]]]] = {
    "rensa": ("rensa", "rensa", _rensa_signature),
    "datasketch": ("datasketch", "datasketch", _datasketch_signature),
}


@lru_cache(maxsize=16)
def minhash_function(backend: str, num_perm: int, seed: int) -> Callable[[Sequence[str]], np.ndarray]:
    """The seeded signature function of `backend` (`uint32[num_perm]` per shingle list; an empty list gives
    all-max entries, which never match a real document's band).

    Raises:
        ValueError: unknown backend. ImportError: its library is not installed (naming the pip package).
    """
    if backend not in MINHASH_BACKENDS:
        raise ValueError(f"`backend` must be one of {sorted(MINHASH_BACKENDS)}, got {backend!r}")
    module, requirement, factory = MINHASH_BACKENDS[backend]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ImportError(f"near-duplicate removal with backend {backend!r} needs the `{module}` package, which is "
                          f"not installed. Install it with: pip install {requirement}") from None
    sign = factory(num_perm, seed)

    def signature(shingles: Sequence[str]) -> np.ndarray:
        if not shingles:
            return np.full(num_perm, _EMPTY, dtype=np.uint32)
        return sign(shingles)

    return signature


def candidate_probability(j: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two documents with Jaccard `j` share at least one band) = 1 - (1 - j^rows)^bands."""
    return 1.0 - (1.0 - np.asarray(j, dtype=float) ** rows) ** bands


def choose_bands(threshold: float, num_perm: int, recall_weight: float = 0.95) -> tuple[int, int]:
    """`(bands, rows)` with `bands * rows <= num_perm` minimising the weighted area of missed pairs (J >=
    `threshold` that are never candidates, weight `recall_weight`) and of needless candidates (J < threshold,
    weight 1 - `recall_weight`). Candidates are verified on the full signature afterwards, so missing a pair
    costs more than checking one: the default weights recall 19:1 (at 0.8 and 128 permutations: 16 bands of 8
    rows, P(candidate) = 0.95 at J = 0.8, 0.06 at J = 0.5)."""
    grid = np.linspace(0.0, 1.0, 401)
    below, above = grid < threshold, grid >= threshold
    best, best_cost = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = candidate_probability(grid, b, r)
            cost = (recall_weight * np.trapezoid(1 - p[above], grid[above])
                    + (1 - recall_weight) * np.trapezoid(p[below], grid[below]))
            if cost < best_cost - 1e-12:
                best, best_cost = (b, r), cost
    return best


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[int]:
    """One 64-bit key per band (FNV-1a over the band's `rows` entries): equal bands give equal keys."""
    cut = signature[: bands * rows].astype(np.uint64).reshape(bands, rows)
    h = np.full(bands, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in range(rows):
            h = (h ^ cut[:, c]) * _FNV_PRIME
    return h.tolist()


class NearDuplicateIndex:
    """The kept documents' LSH bands and signatures: `find(sig)` names the first kept document whose estimated
    Jaccard similarity with `sig` is >= `threshold`, `add(sig)` keeps one.

    Memory: per kept document `bands` dictionary entries (~100 bytes each in CPython) plus its signature
    (`4 * num_perm` bytes); with the defaults (16 bands, 128 permutations) ~2.1 kB, i.e. ~2.1 GB per million
    kept documents (see docs/data_at_scale.md for sharded, on-disk dedup beyond that).
    """

    def __init__(self, threshold: float, num_perm: int, bands: int, rows: int) -> None:
        self.threshold, self.num_perm, self.bands, self.rows = threshold, num_perm, bands, rows
        self._tables: list[dict[int, int]] = [{} for _ in range(bands)]
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)
        self.size = 0

    def find(self, signature: np.ndarray, keys: list[int] | None = None) -> int | None:
        """The id of the earliest kept document that is a near duplicate of `signature`, or None."""
        keys = band_keys(signature, self.bands, self.rows) if keys is None else keys
        candidates = sorted({t[k] for t, k in zip(self._tables, keys) if k in t})
        for doc in candidates:
            if float(np.mean(self._sigs[doc] == signature)) >= self.threshold:
                return doc
        return None

    def add(self, signature: np.ndarray, keys: list[int] | None = None) -> int:
        """Keep `signature` (a document found new); returns its id (0, 1, ... in the order kept)."""
        keys = band_keys(signature, self.bands, self.rows) if keys is None else keys
        doc = self.size
        if doc == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[doc] = signature
        for table, key in zip(self._tables, keys):
            table.setdefault(key, doc)  # the earliest kept document answers for a band
        self.size += 1
        return doc

    def signature_of(self, doc: int) -> np.ndarray:
        return self._sigs[doc]
