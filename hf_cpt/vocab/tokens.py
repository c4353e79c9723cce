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

import json
import os
import tempfile
from collections.abc import Iterable
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


class _BPESegmenter:
    """Segments one pre-tokenized word as base BPE followed by the merges added so far (what the merged model does:
    base merges outrank new ones, and no base merge involves a new token, so they are exhausted first)."""

    def __init__(self, model: Any):
        self.model = model
        self.ranks: dict[tuple[str, str], int] = {}

    def add(self, a: str, b: str) -> None:
        self.ranks.setdefault((a, b), len(self.ranks))

    def __call__(self, word: str) -> list[str]:
        pieces = [t.value for t in self.model.tokenize(word)]
        while len(pieces) > 1:
            best = min(range(len(pieces) - 1), key=lambda i: self.ranks.get((pieces[i], pieces[i + 1]), 1 << 60))
            if (pieces[best], pieces[best + 1]) not in self.ranks:
                break
            pieces[best:best + 2] = [pieces[best] + pieces[best + 1]]
        return pieces


def _select_bpe(base_state: dict[str, Any], trained_state: dict[str, Any], base_tok: Any,
                n_new: int) -> tuple[list[str], list[tuple[str, str]]]:
    vocab = base_state["model"]["vocab"]
    segment = _BPESegmenter(base_tok.backend_tokenizer.model)
    new_tokens: list[str] = []
    new_merges: list[tuple[str, str]] = []
    added: set[str] = set()
    for merge in trained_state["model"]["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        target = a + b
        if target in vocab or target in added:
            continue
        pieces = segment(target)
        cur = pieces[0]
        for p in pieces[1:]:
            nxt = cur + p
            if (cur, p) not in segment.ranks:
                if nxt not in vocab and nxt not in added:
                    if len(new_tokens) >= n_new:
                        return new_tokens, new_merges
                    new_tokens.append(nxt)
                    added.add(nxt)
                new_merges.append((cur, p))
                segment.add(cur, p)
            cur = nxt
        if len(new_tokens) >= n_new:
            break
    return new_tokens, new_merges


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


def learn_domain_tokens(corpus: Iterable[str], tokenizer: Any, n_new: int, *, heldout: Iterable[str] | None = None,
                        train_vocab_size: int | None = None, min_frequency: int = 2) -> VocabExtension:
    """Train a tokenizer of `tokenizer`'s own type (same normaliser, pre-tokenizer, algorithm) on `corpus`, pick the
    `n_new` most useful subwords it has and the base lacks, and merge them into the base tokenizer.

    Selection follows the domain tokenizer's own order of discovery: BPE merges are learnt most-frequent pair first
    and WordPiece likewise, so earlier = more frequent in the domain; Unigram pieces are ranked by their
    log-probability. Each new BPE token is built from the base pieces (see the module docstring), so
    `decode(encode(x)) == x` still holds.

    Args:
        corpus: domain texts.
        tokenizer: the base fast tokenizer.
        n_new: how many entries to add (fewer if the corpus has fewer new subwords).
        heldout: domain texts for the fertility report (tokens per word before/after).
        train_vocab_size: vocabulary of the domain tokenizer trained for selection (default: enough for `n_new`).
        min_frequency: BPE/WordPiece: ignore pairs seen fewer times.
    """
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise ValueError(f"`n_new` must be an integer >= 1, got {n_new!r}")
    base_state = _tokenizer_json(tokenizer)
    kind = base_state["model"]["type"]
    texts = [t for t in corpus if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("the domain corpus is empty: give texts to learn new tokens from")
    size = train_vocab_size or max(4 * n_new, 8000)
    kwargs: dict[str, Any] = {"min_frequency": min_frequency} if kind != "Unigram" else {}
    trained = tokenizer.train_new_from_iterator(texts, vocab_size=size, **kwargs)
    trained_state = json.loads(trained.backend_tokenizer.to_str())
    base_vocab = tokenizer.get_vocab()
    merges = scores = None
    if kind == "BPE":
        new_tokens, merges = _select_bpe(base_state, trained_state, tokenizer, n_new)
    elif kind == "Unigram":
        ranked = sorted((p for p in trained_state["model"]["vocab"] if p[0] not in base_vocab), key=lambda p: -p[1])
        special = set(tokenizer.all_special_tokens)
        ranked = [p for p in ranked if p[0] not in special][:n_new]
        new_tokens, scores = [p[0] for p in ranked], [p[1] for p in ranked]
    else:
        special = set(tokenizer.all_special_tokens)
        vocab = trained_state["model"]["vocab"]
        new_tokens = [t for t in sorted(vocab, key=vocab.get) if t not in base_vocab and t not in special][:n_new]
    if not new_tokens:
        raise ValueError("the domain corpus yields no subword the base tokenizer lacks; nothing to add")
    ext = merge_tokens(tokenizer, new_tokens, merges=merges, scores=scores)
    if heldout is not None:
        heldout = list(heldout)
        ext.fertility_before = fertility(tokenizer, heldout)
        ext.fertility_after = fertility(ext.tokenizer, heldout)
    ext.stats["requested"] = n_new
    return ext
