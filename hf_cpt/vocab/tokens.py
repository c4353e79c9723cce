"""Learning domain subwords and merging them into a tokenizer as real vocabulary (not added tokens).

Added tokens (`tokenizer.add_tokens`) are matched before the model runs, as whole strings, and break subword
segmentation around them. Here new subwords go *into the tokenization model*, so the normal algorithm produces
them:

- byte-level or char BPE (GPT-2, Llama 3, SmolLM): a vocab entry plus the merge that builds it from the pieces the
  current tokenizer produces, appended after the base merges (lower priority). Base merges therefore run first and
  exactly as before; the new merges then join their results. When the pieces are more than two, the chain of
  intermediate merges is added too (each intermediate is a real token).
- Unigram (SentencePiece models such as XLM-R, T5): a vocab entry with the log-probability the domain-trained model
  gave it, so Viterbi segmentation picks it when it is likely.
- WordPiece (BERT): a vocab entry (`##` continuation pieces included); greedy longest-match uses it.

New ids start at `len(tokenizer)`, after every existing and added token, so old ids never move.
"""

from __future__ import annotations

import heapq
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODELS = ("BPE", "Unigram", "WordPiece")


@dataclass
class VocabExtension:
    """What `learn_domain_tokens` / `merge_tokens` produced.

    Attributes:
        tokenizer: the merged tokenizer (a `PreTrainedTokenizerFast`; save it with `save_pretrained`).
        new_tokens: the added vocabulary entries, in id order (the model-internal form, e.g. `Ġdataclass`).
        new_token_ids: their ids, `len(base tokenizer)` onwards.
        old_vocab_size: `len(base tokenizer)`.
        model_type: `BPE`, `Unigram` or `WordPiece`.
        fertility_before / fertility_after: tokens per whitespace word on held-out domain text (if given).
    """

    tokenizer: Any
    new_tokens: list[str]
    new_token_ids: list[int]
    old_vocab_size: int
    model_type: str
    fertility_before: float | None = None
    fertility_after: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"added": len(self.new_tokens), "old_vocab_size": self.old_vocab_size,
                "new_vocab_size": len(self.tokenizer), "model_type": self.model_type,
                "fertility_before": self.fertility_before, "fertility_after": self.fertility_after,
                "examples": [self.tokenizer.convert_tokens_to_string([t]) for t in self.new_tokens[:20]],
                **self.stats}


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"`tokenizer` ({type(tokenizer).__name__}) is a slow tokenizer: vocabulary extension needs a fast "
            "(🤗 tokenizers) one. Load it with `AutoTokenizer.from_pretrained(..., use_fast=True)`."
        )
    state = json.loads(backend.to_str())
    kind = state["model"]["type"]
    if kind not in SUPPORTED_MODELS:
        raise ValueError(f"tokenizer model type {kind!r} is not supported for vocabulary extension; supported: "
                         f"{', '.join(SUPPORTED_MODELS)}")
    return state


def fertility(tokenizer: Any, texts: Iterable[str]) -> float:
    """Tokens per whitespace-separated word (lower = the tokenizer fits the text better)."""
    texts = [t for t in texts if t and t.strip()]
    words = sum(len(t.split()) for t in texts)
    if not words:
        raise ValueError("fertility needs non-empty text")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(len(x) for x in ids) / words


def _rebuild(tokenizer: Any, state: dict[str, Any]) -> Any:
    """The base tokenizer's class and settings with a modified `tokenizer.json`, loaded the stock way."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="hf-cpt-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, ensure_ascii=False)
        for stale in ("vocab.json", "merges.txt", "vocab.txt", "sentencepiece.bpe.model", "tokenizer.model"):
            # slow-tokenizer files would describe the old vocabulary; tokenizer.json is the source of truth
            if os.path.exists(os.path.join(tmp, stale)):
                os.remove(os.path.join(tmp, stale))
        merged = AutoTokenizer.from_pretrained(tmp)
    return merged


def _word_counts(tokenizer: Any, texts: Sequence[str]) -> Counter[str]:
    """Pre-tokenized words of `texts` (the tokenizer's own normaliser and pre-tokenizer) and their counts."""
    backend = tokenizer.backend_tokenizer
    counts: Counter[str] = Counter()
    for text in texts:
        s = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        words = backend.pre_tokenizer.pre_tokenize_str(s) if backend.pre_tokenizer is not None else [(s, None)]
        counts.update(w for w, _ in words)
    return counts


class _BPEContinuation:
    """BPE training that starts from the *base* segmentation of the domain words and keeps merging the pair that
    saves the most tokens on the domain corpus (its count). The merged tokenizer applies the base merges first and
    then these in the same order, so the state here is exactly its segmentation of the corpus: a new token is
    *used* while its count is > 0, and an *intermediate* once later merges have consumed every occurrence."""

    def __init__(self, words: Counter[str], model: Any, vocab: dict[str, int], min_frequency: int):
        self.words = [[t.value for t in model.tokenize(w)] for w in words]
        self.freq = list(words.values())
        self.vocab, self.min_frequency = vocab, min_frequency
        self.pairs: Counter[tuple[str, str]] = Counter()
        self.where: dict[tuple[str, str], set[int]] = {}
        for i, (pieces, f) in enumerate(zip(self.words, self.freq)):
            for pair in zip(pieces, pieces[1:]):
                self.pairs[pair] += f
                self.where.setdefault(pair, set()).add(i)
        self.heap = [(-c, p) for p, c in self.pairs.items()]
        heapq.heapify(self.heap)
        self.count: dict[str, int] = {}  # occurrences of each new token in the current segmentation
        self.merges: list[tuple[str, str]] = []
        self.used = 0

    def _best(self) -> tuple[str, str] | None:
        while self.heap:
            neg, pair = heapq.heappop(self.heap)
            count = self.pairs.get(pair, 0)
            if -neg != count:
                continue  # stale entry: the pair's count changed and was pushed again
            if count < self.min_frequency:
                return None  # the most frequent pair left is too rare
            if pair[0] + pair[1] in self.vocab:
                continue  # joining into a base token would re-segment text the base already handles
            return pair
        return None

    def _shift(self, token: str, delta: int) -> None:
        if token in self.count:
            before = self.count[token]
            self.count[token] = before + delta
            self.used += (self.count[token] > 0) - (before > 0)

    def step(self) -> bool:
        """Apply the best merge everywhere; False when no pair is frequent enough."""
        pair = self._best()
        if pair is None:
            return False
        a, b = pair
        new = a + b
        self.count.setdefault(new, 0)
        self.merges.append(pair)
        touched: Counter[tuple[str, str]] = Counter()
        for i in self.where.pop(pair, ()):
            pieces, f = self.words[i], self.freq[i]
            out, j, k = [], 0, 0
            while j < len(pieces):
                if j + 1 < len(pieces) and pieces[j] == a and pieces[j + 1] == b:
                    out.append(new)
                    j, k = j + 2, k + 1
                else:
                    out.append(pieces[j])
                    j += 1
            if not k:
                continue
            for p in zip(pieces, pieces[1:]):
                touched[p] -= f
            for p in zip(out, out[1:]):
                touched[p] += f
                self.where.setdefault(p, set()).add(i)
            self.words[i] = out
            self._shift(a, -k * f)
            self._shift(b, -k * f)
            self._shift(new, k * f)
        for p, d in touched.items():
            if d:
                self.pairs[p] += d
                if self.pairs[p] > 0:
                    heapq.heappush(self.heap, (-self.pairs[p], p))
        self.pairs.pop(pair, None)
        return True


def _select_bpe(tokenizer: Any, texts: Sequence[str], n_new: int,
                min_frequency: int) -> tuple[list[str], list[tuple[str, str]], int]:
    """New BPE tokens (in merge order), their merges and how many of them the domain segmentation uses: merge until
    exactly `n_new` new tokens occur in it (intermediates do not count)."""
    vocab = tokenizer.get_vocab()
    bpe = _BPEContinuation(_word_counts(tokenizer, texts), tokenizer.backend_tokenizer.model, vocab, min_frequency)
    while bpe.used < n_new and bpe.step():
        pass
    if bpe.used < n_new:
        raise ValueError(
            f"`n_new_tokens` is {n_new}, more than the domain corpus supports: merging every pair seen at least "
            f"{min_frequency} times gives {bpe.used} new tokens its segmentation uses; set `n_new_tokens` <= "
            f"{bpe.used} or give more domain text"
        )
    return [a + b for a, b in bpe.merges], bpe.merges, bpe.used


def merge_tokens(tokenizer: Any, new_tokens: list[str], merges: list[tuple[str, str]] | None = None,
                 scores: list[float] | None = None) -> VocabExtension:
    """Merge explicit vocabulary entries into `tokenizer`'s model.

    Args:
        tokenizer: a fast tokenizer (BPE, Unigram or WordPiece model).
        new_tokens: entries in the model's internal form (byte-level BPE: `Ġword`; SentencePiece: `▁word`).
        merges: BPE only: the merges that build them (appended after the base merges). Required for BPE.
        scores: Unigram only: log-probabilities (default: the lowest base score, i.e. used when nothing
            better fits).

    Raises:
        ValueError: a token already in the vocabulary, duplicates, an unsupported model or a missing merge.
    """
    state = _tokenizer_json(tokenizer)
    kind = state["model"]["type"]
    if not new_tokens:
        raise ValueError("`new_tokens` is empty: nothing to add")
    base = tokenizer.get_vocab()
    dup = [t for t in new_tokens if t in base]
    if dup:
        raise ValueError(f"`new_tokens`: {len(dup)} already in the vocabulary (e.g. {dup[:5]}); pass only new ones")
    if len(set(new_tokens)) != len(new_tokens):
        raise ValueError("`new_tokens` has duplicates")
    start = len(tokenizer)
    model = state["model"]
    if kind == "BPE":
        if merges is None:
            raise ValueError("`merges` are required for a BPE tokenizer: each new token needs the merge that builds "
                             "it (use `learn_domain_tokens`, which derives them)")
        known = set(base) | set(new_tokens)
        for a, b in merges:
            if a not in known or b not in known or (a + b) not in known:
                raise ValueError(f"`merges`: ({a!r}, {b!r}) needs both pieces and their join in the vocabulary")
        for i, tok in enumerate(new_tokens):
            model["vocab"][tok] = start + i
        as_lists = not model["merges"] or isinstance(model["merges"][0], list)
        model["merges"].extend([list(m) if as_lists else f"{m[0]} {m[1]}" for m in merges])
    elif kind == "Unigram":
        if len(model["vocab"]) != start:
            raise ValueError(f"this Unigram tokenizer has added tokens outside its model vocabulary "
                             f"({len(model['vocab'])} model entries, {start} tokens); it cannot be extended in place")
        floor = min(s for _, s in model["vocab"])
        scores = scores if scores is not None else [floor] * len(new_tokens)
        model["vocab"].extend([[t, float(s)] for t, s in zip(new_tokens, scores)])
    else:  # WordPiece
        for i, tok in enumerate(new_tokens):
            model["vocab"][tok] = start + i
    merged = _rebuild(tokenizer, state)
    ids = merged.convert_tokens_to_ids(new_tokens)
    if ids != list(range(start, start + len(new_tokens))):
        raise RuntimeError("merged tokenizer assigned unexpected ids to the new tokens")
    return VocabExtension(merged, list(new_tokens), ids, start, kind)


def token_usage(tokenizer: Any, texts: Sequence[str], token_ids: Sequence[int]) -> Counter[int]:
    """How often each of `token_ids` occurs in `tokenizer`'s segmentation of `texts` (ids never produced: 0)."""
    want = set(token_ids)
    counts: Counter[int] = Counter({i: 0 for i in token_ids})
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        counts.update(i for i in ids if i in want)
    return counts


def _select_by_usage(tokenizer: Any, candidates: list[str], scores: dict[str, float] | None, texts: Sequence[str],
                     n_new: int, rounds: int = 6) -> list[str]:
    """Unigram / WordPiece: merge candidates, keep those the domain segmentation uses, refill from the rest.

    A first pass over twice the budget ranks the used ones by tokens saved (occurrences x (old pieces - 1)). Dropping
    a token the segmentation never produces changes nothing (greedy longest-match and Viterbi never chose it), so
    the final set is exactly the used tokens of the last pass."""
    pool = list(candidates)
    chosen, pool = pool[:2 * n_new], pool[2 * n_new:]
    for r in range(rounds):
        ext = merge_tokens(tokenizer, chosen, scores=[scores[t] for t in chosen] if scores else None)
        usage = token_usage(ext.tokenizer, texts, ext.new_token_ids)
        used = [t for t, i in zip(chosen, ext.new_token_ids) if usage[i] > 0]
        if r == 0:
            def saved(t: str) -> int:
                text = t[2:] if t.startswith("##") else ext.tokenizer.convert_tokens_to_string([t])
                return usage[ext.tokenizer.convert_tokens_to_ids(t)] * max(
                    len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1, 1)
            used = sorted(used, key=lambda t: -saved(t))[:n_new]
        if len(used) == len(chosen) and len(used) >= min(n_new, len(candidates)):
            return used[:n_new]
        deficit = n_new - len(used)
        chosen, pool = used + pool[:max(deficit, 0)], pool[max(deficit, 0):]
        if deficit <= 0 and not pool:
            break
    ext = merge_tokens(tokenizer, chosen, scores=[scores[t] for t in chosen] if scores else None)
    usage = token_usage(ext.tokenizer, texts, ext.new_token_ids)
    return [t for t, i in zip(chosen, ext.new_token_ids) if usage[i] > 0][:n_new]


def learn_domain_tokens(corpus: Iterable[str], tokenizer: Any, n_new: int, *, heldout: Iterable[str] | None = None,
                        general: Iterable[str] | None = None, train_vocab_size: int | None = None,
                        min_frequency: int = 2) -> VocabExtension:
    """Add `n_new` subwords that the merged tokenizer really produces on the domain corpus.

    `n_new` counts *used* tokens: each occurs in the merged tokenizer's segmentation of `corpus`.

    - BPE: training continues from the base segmentation of the domain words, merging the pair that saves the most
      tokens on `corpus` each time (its count), until `n_new` new tokens occur in the resulting segmentation. A
      merge chain may need intermediates (`Ġlogg` on the way to `Ġlogging`) that later merges consume everywhere:
      they are added too (BPE cannot build the longer token otherwise) and reported separately in `stats`
      (`intermediates`, and `intermediates_produced`: how many still occur in held-out / general text).
    - Unigram / WordPiece: candidates come from a tokenizer of the base's own type trained on `corpus` (highest
      log-probability / earliest learnt first); they are merged, ranked by tokens saved on `corpus`, and those the
      segmentation never produces are replaced by the next candidates.

    Args:
        corpus: domain texts.
        tokenizer: the base fast tokenizer.
        n_new: how many used entries to add (`n_new_tokens`).
        heldout: domain texts for the fertility report (tokens per word before/after).
        general: general texts for the fertility report (the extension should leave them about as they were).
        train_vocab_size: Unigram / WordPiece: vocabulary of the candidate tokenizer (default: enough for `n_new`).
        min_frequency: BPE / WordPiece: ignore pairs seen fewer times.

    Raises:
        ValueError: an empty corpus, or `n_new` larger than the corpus supports (the message says how many it can).
    """
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise ValueError(f"`n_new_tokens` (n_new) must be an integer >= 1, got {n_new!r}")
    base_state = _tokenizer_json(tokenizer)
    kind = base_state["model"]["type"]
    texts = [t for t in corpus if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("the domain corpus is empty: give texts to learn new tokens from")
    merges = scores = None
    if kind == "BPE":
        tokens, merges, _ = _select_bpe(tokenizer, texts, n_new, min_frequency)
        ext = merge_tokens(tokenizer, tokens, merges=merges)
    else:
        size = train_vocab_size or max(6 * n_new, 8000)
        kwargs: dict[str, Any] = {"min_frequency": min_frequency} if kind != "Unigram" else {}
        trained = tokenizer.train_new_from_iterator(texts, vocab_size=size, **kwargs)
        trained_state = json.loads(trained.backend_tokenizer.to_str())
        base_vocab, special = tokenizer.get_vocab(), set(tokenizer.all_special_tokens)
        if kind == "Unigram":
            ranked = sorted((p for p in trained_state["model"]["vocab"] if p[0] not in base_vocab
                             and p[0] not in special), key=lambda p: -p[1])
            candidates, scores = [p[0] for p in ranked], {p[0]: p[1] for p in ranked}
        else:
            vocab = trained_state["model"]["vocab"]
            candidates = [t for t in sorted(vocab, key=vocab.get) if t not in base_vocab and t not in special]
        if not candidates:
            raise ValueError("the domain corpus yields no subword the base tokenizer lacks; nothing to add")
        tokens = _select_by_usage(tokenizer, candidates, scores, texts, n_new)
        if len(tokens) < n_new:
            raise ValueError(
                f"`n_new_tokens` is {n_new}, more than the domain corpus supports: {len(tokens)} new {kind} tokens "
                f"occur in its segmentation; set `n_new_tokens` <= {len(tokens)} or give more domain text")
        ext = merge_tokens(tokenizer, tokens, scores=[scores[t] for t in tokens] if scores else None)
    _report(ext, tokenizer, texts, n_new, heldout, general)
    return ext


def _report(ext: VocabExtension, base: Any, texts: Sequence[str], n_new: int, heldout: Iterable[str] | None,
            general: Iterable[str] | None) -> None:
    """Fill `ext`'s usage and fertility statistics (what the summary / model card shows)."""
    after = ext.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    usage = Counter(i for ids in after for i in ids if i >= ext.old_vocab_size)
    inter = [i for i in ext.new_token_ids if not usage[i]]
    elsewhere = [list(t) for t in (heldout, general) if t is not None]
    seen = token_usage(ext.tokenizer, [x for t in elsewhere for x in t], inter) if inter and elsewhere else {}
    ext.stats.update({
        "requested": n_new, "used": len(ext.new_token_ids) - len(inter), "intermediates": len(inter),
        "intermediates_produced": sum(1 for c in seen.values() if c > 0) if elsewhere else None,
        "domain_tokens_before": sum(len(x) for x in base(list(texts), add_special_tokens=False)["input_ids"]),
        "domain_tokens_after": sum(len(x) for x in after),
    })
    if heldout is not None:
        ext.fertility_before = fertility(base, elsewhere[0])
        ext.fertility_after = fertility(ext.tokenizer, elsewhere[0])
    if general is not None:
        ext.stats["general_fertility_before"] = fertility(base, elsewhere[-1])
        ext.stats["general_fertility_after"] = fertility(ext.tokenizer, elsewhere[-1])
