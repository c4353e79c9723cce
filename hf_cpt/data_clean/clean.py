"""Exact and near-duplicate removal and decontamination of training documents, with a report of what went.

[`DocumentCleaner`] decides document by document, in order, so it works on a stream: a document is checked in
three steps, and the first that fires removes it:

1. `exact`: its normalised words (see `hf_cpt.data_clean.text`) hash like an earlier kept document's;
2. `near`: its estimated Jaccard similarity of `shingle_size`-word shingles with an earlier kept document is
   >= `threshold` (MinHash + LSH, see `hf_cpt.data_clean.near`);
3. `contaminated`: it shares a word `ngram` with a held-out set (`hf_cpt.data_clean.decontam`); dropped with
   `action: drop`, counted only with `report`.

The copy kept is the *first seen*: sources in the order given (the recipe passes `domain` before `general`),
documents in file order (before any training shuffle). With `across_sources` a `general` document that repeats a
`domain` one is removed from `general`. Decisions depend only on the documents and the settings (the MinHash is
seeded), never on the number of worker processes: [`clean_documents`] hashes in `workers` processes and decides
in the parent, in order.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..validation import check_bool, check_choice, check_int, check_number
from .decontam import DecontaminateConfig, NgramIndex
from .report import CleanReport
from .near import MINHASH_BACKENDS, NearDuplicateIndex, band_keys, choose_bands, minhash_function
from .text import exact_key, normalize_words, word_shingles

# a document's decision: kept, kept but contaminated (`action: report`), or removed by a step
KEPT, FLAGGED, EXACT, NEAR, CONTAMINATED = 0, 1, 2, 3, 4
DECISION_STEP = {FLAGGED: "contaminated", EXACT: "exact", NEAR: "near", CONTAMINATED: "contaminated"}
_EXAMPLES_PER_STEP = 5
_BATCH = 256  # documents per task sent to a worker process


@dataclass
class DedupConfig:
    """`data.dedup`: exact and near-duplicate removal of training documents (first seen kept)."""

    exact: bool = field(default=True, metadata={"help": "Remove documents whose normalised text repeats an earlier "
                                                        "one (NFKC, case-folded words)."})
    near: bool = field(default=True, metadata={"help": "Remove near duplicates: MinHash + LSH over word shingles, "
                                                       "estimated Jaccard >= `threshold`."})
    threshold: float = field(default=0.8, metadata={"help": "Jaccard similarity (of word shingles) from which two "
                                                            "documents are near duplicates, in (0, 1]."})
    shingle_size: int = field(default=5, metadata={"help": "Words per shingle."})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations (signature length)."})
    seed: int = field(default=0, metadata={"help": "MinHash seed (the same in every process and run)."})
    across_sources: bool = field(default=True, metadata={"help": "Also remove a document of a later source "
                                                                 "(general) that repeats one of an earlier (domain)."})
    backend: str = field(default="rensa", metadata={"help": f"MinHash library: {sorted(MINHASH_BACKENDS)}."})

    def __post_init__(self) -> None:
        for name in ("exact", "near", "across_sources"):
            check_bool(name, getattr(self, name))
        self.threshold = check_number("threshold", self.threshold, 0.0, 1.0, min_inclusive=False)
        check_int("shingle_size", self.shingle_size)
        check_int("num_perm", self.num_perm, minimum=8)
        check_int("seed", self.seed, minimum=0)
        check_choice("backend", self.backend, tuple(MINHASH_BACKENDS))

    @property
    def enabled(self) -> bool:
        return self.exact or self.near

    @property
    def bands(self) -> tuple[int, int]:
        """The LSH `(bands, rows)` for `threshold` and `num_perm` (see [`choose_bands`])."""
        return _bands(self.threshold, self.num_perm)


_BAND_CACHE: dict[tuple[float, int], tuple[int, int]] = {}


def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    key = (threshold, num_perm)
    if key not in _BAND_CACHE:
        _BAND_CACHE[key] = choose_bands(threshold, num_perm)
    return _BAND_CACHE[key]


# --- per-document features (what the worker processes compute) -----------------------------------------------
@dataclass(frozen=True)
class _Spec:
    exact: bool
    near: bool
    shingle_size: int
    num_perm: int
    seed: int
    backend: str
    bands: int
    rows: int


_WORKER: dict[str, Any] = {}


def _init_worker(spec: _Spec | None, ngrams: NgramIndex | None) -> None:
    _WORKER["spec"], _WORKER["ngrams"] = spec, ngrams


def _features(text: Any, spec: _Spec | None, ngrams: NgramIndex | None) -> tuple:
    """(words, exact key, signature, band keys, contaminating set) of one document; None where not asked."""
    words = normalize_words(text)
    key = sig = keys = None
    if spec is not None and spec.exact and words:  # blank documents are kept: the mixers skip them anyway
        key = exact_key(words)
    if spec is not None and spec.near and words:
        sig = minhash_function(spec.backend, spec.num_perm, spec.seed)(word_shingles(words, spec.shingle_size))
        keys = band_keys(sig, spec.bands, spec.rows)
    hit = ngrams.first_match(words) if ngrams is not None else None
    return len(words), key, sig, keys, hit


def _features_batch(texts: list[Any]) -> list[tuple]:
    spec, ngrams = _WORKER["spec"], _WORKER["ngrams"]
    return [_features(t, spec, ngrams) for t in texts]


# --- the decisions --------------------------------------------------------------------------------------------
class DocumentCleaner:
    """Decides, document by document and in order, which training documents to keep.

    Args:
        dedup: exact/near settings (None: no dedup).
        decontaminate: n-gram settings (None or `action: off`: no decontamination).
        held_out: `{set name: texts}` every set the run evaluates on.

    `keep(source, text)` decides one document (streaming); [`clean_documents`] decides whole sources with worker
    processes. `report` holds the counts so far.
    """

    def __init__(self, dedup: DedupConfig | None = None, decontaminate: DecontaminateConfig | None = None,
                 held_out: Mapping[str, Iterable[str]] | None = None) -> None:
        self.dedup = dedup if dedup is not None and dedup.enabled else None
        self.decontaminate = decontaminate if decontaminate is not None and decontaminate.enabled else None
        d = self.dedup
        bands, rows = d.bands if d is not None and d.near else (0, 0)
        self.spec = _Spec(d.exact, d.near, d.shingle_size, d.num_perm, d.seed, d.backend, bands, rows) \
            if d is not None else None
        if d is not None and d.near:
            minhash_function(d.backend, d.num_perm, d.seed)  # a missing library fails here, before any work
        self.ngrams = None
        if self.decontaminate is not None:
            self.ngrams = NgramIndex.from_sets(held_out or {}, self.decontaminate.ngram)
        self._exact: dict[str, dict[int, int]] = {}  # scope -> exact key -> packed (source index, document)
        self._near: dict[str, NearDuplicateIndex] = {}
        self._near_owner: dict[str, list[int]] = {}  # scope -> near-index id -> packed (source, document)
        self._examples: dict[tuple[str, str], int] = {}
        self._source_ids: dict[str, int] = {}
        self._next_doc: dict[str, int] = {}
        self.report = CleanReport(settings=self._settings(bands, rows))
        if self.ngrams is not None:
            self.report.held_out = {n: {"documents": self.ngrams.documents[n],
                                        "shorter_than_ngram": self.ngrams.short_documents[n]}
                                    for n in self.ngrams.names}

    def _settings(self, bands: int, rows: int) -> dict[str, Any]:
        d, c = self.dedup, self.decontaminate
        out: dict[str, Any] = {"exact": bool(d and d.exact), "near": bool(d and d.near),
                               "decontaminate": c.action if c is not None else "off",
                               "kept_copy": "first seen (sources in order, documents in file order)"}
        if d is not None and d.near:
            out.update(threshold=d.threshold, shingle_size=d.shingle_size, num_perm=d.num_perm, seed=d.seed,
                       bands=bands, rows=rows, backend=d.backend)
        if d is not None:
            out["across_sources"] = d.across_sources
        if c is not None:
            out["ngram"] = c.ngram
        return out

    @property
    def active(self) -> bool:
        return self.dedup is not None or self.decontaminate is not None

    def keep(self, source: str, text: Any) -> bool:
        """Whether to keep the next document of `source` (hashing it here, in this process)."""
        return self.decide(source, _features(text, self.spec, self.ngrams)) < EXACT

    def decide(self, source: str, features: tuple) -> int:
        """Record the next document of `source` from its features; returns its decision (`KEPT`, `FLAGGED`:
        kept but contaminated, or the step that removed it: `EXACT`, `NEAR`, `CONTAMINATED`)."""
        n_words, key, sig, keys, hit = features
        src = self._source_ids.setdefault(source, len(self._source_ids))
        doc = self._next_doc.get(source, 0)
        self._next_doc[source] = doc + 1
        stats = self.report.source(source)
        stats["documents"] += 1
        stats["words"] += n_words
        d = self.dedup
        scope = "*" if d is None or d.across_sources else source
        me = src << 40 | doc
        if key is not None:
            owner = self._exact.setdefault(scope, {}).setdefault(key, me)
            if owner != me:
                return self._removed(stats, EXACT, source, doc, n_words, owner)
        if sig is not None:
            index = self._near.get(scope)
            if index is None:
                index = self._near[scope] = NearDuplicateIndex(d.threshold, d.num_perm, *d.bands)
            found = index.find(sig, keys)
            if found is not None:
                return self._removed(stats, NEAR, source, doc, n_words, self._near_owner[scope][found])
            index.add(sig, keys)
            self._near_owner.setdefault(scope, []).append(me)
        if hit is not None:
            name = self.ngrams.names[hit]
            by_set = stats["contaminated"]["by_set"]
            by_set[name] = by_set.get(name, 0) + 1
            if self.decontaminate.action == "drop":
                return self._removed(stats, CONTAMINATED, source, doc, n_words, None, name)
            stats["contaminated"]["documents"] += 1
            stats["contaminated"]["words"] += n_words
            self._example("contaminated", source, {"document": doc, "held_out": name, "kept": True})
        stats["kept"]["documents"] += 1
        stats["kept"]["words"] += n_words
        return FLAGGED if hit is not None else KEPT

    def _removed(self, stats: dict[str, Any], code: int, source: str, doc: int, n_words: int, owner: int | None,
                 held_out: str | None = None) -> int:
        step = DECISION_STEP[code]
        stats[step]["documents"] += 1
        stats[step]["words"] += n_words
        example: dict[str, Any] = {"document": doc}
        if owner is not None:
            kept_source = list(self._source_ids)[owner >> 40]
            if kept_source != source:
                stats[step]["across_sources"] += 1
            example.update(kept_source=kept_source, kept_document=owner & ((1 << 40) - 1))
        else:
            example["held_out"] = held_out
        self._example(step, source, example)
        return code

    def _example(self, step: str, source: str, example: dict[str, Any]) -> None:
        seen = self._examples.get((step, source), 0)
        if seen < _EXAMPLES_PER_STEP:
            self.report.examples.append({"step": step, "source": source, **example})
        self._examples[(step, source)] = seen + 1

    def index_bytes(self) -> dict[str, int]:
        """Approximate memory of the indexes (CPython sizes: ~125 bytes per exact key (measured), ~100 per LSH band
        entry plus the 4-byte signature entries (~2.1 kB per kept document, measured), ~250 per held-out n-gram)."""
        near = sum(i.size * (i.bands * 100 + 4 * i.num_perm) for i in self._near.values())
        exact = sum(125 * len(t) for t in self._exact.values())
        return {"exact": exact, "near": near, "ngrams": 250 * len(self.ngrams or ())}


@dataclass
class CleanResult:
    """[`clean_documents`]'s answer: per source one decision per document (`KEPT`, `FLAGGED`, `EXACT`, `NEAR`,
    `CONTAMINATED`) and the report."""

    decisions: dict[str, np.ndarray]
    report: CleanReport

    def keep(self, name: str) -> np.ndarray:
        """True for the documents of `name` that stay (kept, or contaminated under `action: report`)."""
        return self.decisions[name] < EXACT


def _batches(texts: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def clean_documents(sources: Mapping[str, Iterable[Any]], dedup: DedupConfig | None = None,
                    decontaminate: DecontaminateConfig | None = None,
                    held_out: Mapping[str, Iterable[str]] | None = None, workers: int = 1,
                    progress: Callable[[int], Any] | None = None) -> CleanResult:
    """Decide which documents of each source to keep, and report what was removed.

    Args:
        sources: `{name: texts}` in priority order (the first source's copy of a repeated document is kept).
        dedup / decontaminate: the settings (None: that step is off).
        held_out: `{set name: texts}` the training text must not overlap (decontamination).
        workers: processes that hash documents (normalising, MinHash, n-gram lookups); the decisions are made
            here, in order, so the result is the same for any `workers`.
        progress: called with the number of documents just decided (a batch at a time), e.g. a progress bar's
            `update`.

    Example:
        >>> result = clean_documents({"domain": ["a b c d e f", "A b, c d e f!", "x y z"]}, DedupConfig(near=False))
        >>> result.keep("domain").tolist()
        [True, False, True]
    """
    workers = check_int("workers", workers)
    start = time.perf_counter()
    cleaner = DocumentCleaner(dedup, decontaminate, held_out)
    decisions: dict[str, np.ndarray] = {}
    pool = None
    if workers > 1 and cleaner.active:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(cleaner.spec, cleaner.ngrams))
    try:
        for name, texts in sources.items():
            stats = cleaner.report.source(name)
            if not cleaner.active:
                codes = [KEPT for _ in texts]
                stats["documents"] = stats["kept"]["documents"] = len(codes)
                if progress is not None:
                    progress(len(codes))
            else:
                codes = []
                batches = _batches(texts, _BATCH)
                features = pool.imap(_features_batch, batches, chunksize=1) if pool is not None else \
                    ([_features(t, cleaner.spec, cleaner.ngrams) for t in batch] for batch in batches)
                for feats in features:
                    codes.extend(cleaner.decide(name, f) for f in feats)
                    if progress is not None:
                        progress(len(feats))
            decisions[name] = np.asarray(codes, dtype=np.int8)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    cleaner.report.index_bytes = cleaner.index_bytes()
    cleaner.report.seconds = time.perf_counter() - start
    return CleanResult(decisions, cleaner.report)


