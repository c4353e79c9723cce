"""Training and held-out sets for masked objectives (`masking:` runs): chunked documents, tagged once (cached by
`datasets`), tokenized with token spans, mixed general/domain, and a collator that masks training batches on the
fly while held-out batches are masked once with a fixed seed (so the forgetting monitor compares like with like).

Token-exact replay ([`ReplayMixer`]) packs documents into blocks, which would cut entity spans; masked runs mix
*chunks* of up to `block_size` tokens instead, with `datasets.interleave_datasets` at per-chunk probabilities
set from each corpus's mean chunk length so that the expected token share of general text is `replay_ratio`:
right on average, not exact per window. The token-exact mixer's other settings (`data.replay_stages`,
`granularity`, `on_exhausted`, `prepared_dir`) are therefore refused for masked runs by `CPTConfig`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..collators.masking import CausalSpanCollator, LEMCollator, LexiconMaskingCollator, MaskingConfig
from ..config import CPTConfig
from ..mixers.core import document_indices
from .data import count_token_ids, load_split
from .run_data import RunData

if TYPE_CHECKING:
    from ..callbacks.progress import PhaseBar

# ~4 characters per token in English subword vocabularies: chunks of block_size tokens fit without truncation
CHARS_PER_TOKEN = 4


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split a document at paragraph, line, then sentence boundaries into pieces of at most `max_chars`
    (a single longer sentence is cut at whitespace)."""
    pieces: list[str] = []
    for unit in re.split(r"(?<=[.!?])\s+|\n+", text or ""):
        unit = unit.strip()
        while len(unit) > max_chars:
            cut = unit.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(unit[:cut])
            unit = unit[cut:].strip()
        if unit:
            pieces.append(unit)
    chunks, cur = [], ""
    for p in pieces:
        if cur and len(cur) + 1 + len(p) > max_chars:
            chunks.append(cur)
            cur = p
        else:
            cur = f"{cur} {p}" if cur else p
    if cur:
        chunks.append(cur)
    return chunks


@dataclass
class PremaskedOrCollate:
    """Training features go through `collator`; held-out features that already carry `labels` (masked once by
    `premask`) are only padded. Output keys: those of `collator`.

    Training features may carry a `source` name (domain/general): its tokens are counted in `tokens_per_source`
    and the key is dropped. Batches the Trainer skips on resume are collated too, so the counts stay totals.
    """

    collator: Any
    pad_token_id: int
    tokens_per_source: dict[str, int] = field(default_factory=dict)
    cleaning: dict[str, Any] | None = None  # data cleaning (issue 34): what was removed from the training text

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "labels" not in features[0]:
            if "source" in features[0]:
                features = [dict(f) for f in features]
                for f in features:
                    name = f.pop("source")
                    self.tokens_per_source[name] = self.tokens_per_source.get(name, 0) + len(f["input_ids"])
            return self.collator(features)
        t = max(len(f["input_ids"]) for f in features)
        out: dict[str, torch.Tensor] = {}
        for key, pad in (("input_ids", self.pad_token_id), ("labels", -100), ("token_type_ids", 0)):
            if key in features[0]:
                out[key] = torch.tensor([list(f[key]) + [pad] * (t - len(f[key])) for f in features])
        out["attention_mask"] = torch.tensor([[1] * len(f["input_ids"]) + [0] * (t - len(f["input_ids"]))
                                              for f in features])
        return out


def make_collator(masking: MaskingConfig, tokenizer: Any, objective: str, seed: int | None = None) -> Any:
    """The training collator a `masking:` block describes."""
    if objective == "clm":
        types = tuple(masking.entity_types) if masking.entity_types else None
        return CausalSpanCollator(tokenizer, span_weight=masking.span_weight,
                                  input_mask_probability=masking.input_mask_probability, entity_types=types, seed=seed)
    if masking.kind == "random":
        from transformers import DataCollatorForLanguageModeling

        if tokenizer.mask_token_id is None:
            raise ValueError("`objective: mlm` needs a tokenizer with a mask token")
        return DataCollatorForLanguageModeling(tokenizer, mlm_probability=masking.mlm_probability,
                                               mask_replace_prob=masking.mask_replace_prob,
                                               random_replace_prob=masking.random_replace_prob, seed=seed)
    if masking.kind == "lem":
        return LEMCollator(tokenizer, mlm_probability=masking.mlm_probability,
                           span_probability=masking.span_probability,
                           entity_types=tuple(masking.entity_types) if masking.entity_types else None,
                           mask_replace_prob=masking.mask_replace_prob,
                           random_replace_prob=masking.random_replace_prob, seed=seed)
    return LexiconMaskingCollator(tokenizer, mlm_probability=masking.mlm_probability,
                                  lexicon_share=masking.lexicon_share, mask_replace_prob=masking.mask_replace_prob,
                                  random_replace_prob=masking.random_replace_prob, seed=seed)


def _prepare(ds: Any, cfg: CPTConfig, tokenizer: Any, text_field: str, what: str, bar: PhaseBar) -> Any:
    """Chunk, tag and tokenize one split into span features (or plain MLM features for `random`), counted on
    the phase's `bar` once done."""
    out = _features_of(ds, cfg, tokenizer, text_field, what)
    bar.update(len(ds), count_token_ids(out))
    return out


def _features_of(ds: Any, cfg: CPTConfig, tokenizer: Any, text_field: str, what: str) -> Any:
    from ..collators.spans import tag_entities, tag_lexicon, tokenize_with_spans

    masking: MaskingConfig = cfg.masking
    block = cfg.data.block_size
    fields = tuple(masking.tlm_fields) if masking.tlm_fields else ("text",)
    if masking.tlm_fields is None:  # one text column, chunked to about a block each
        def chunk(batch: dict[str, list]) -> dict[str, list]:
            texts = [batch[text_field][i] for i in document_indices(batch[text_field], what)]  # non-strings refused
            return {"text": [c for t in texts for c in chunk_text(t, block * CHARS_PER_TOKEN)]}

        ds = ds.map(chunk, batched=True, remove_columns=ds.column_names, desc=f"Chunking {what}")
    else:
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise ValueError(f"`masking.tlm_fields`: columns {missing} not in {what} (columns: {ds.column_names})")
    if masking.kind == "random" and cfg.objective == "mlm":
        def tok(batch: dict[str, list]) -> dict[str, list]:
            enc = tokenizer(*[batch[f] for f in fields], truncation=True, max_length=block,
                            return_special_tokens_mask=True)
            return {k: enc[k] for k in ("input_ids", "special_tokens_mask", "token_type_ids") if k in enc}

        return ds.map(tok, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {what}")
    if masking.kind == "lexicon":
        ds = tag_lexicon(ds, masking.lexicon, fields, masking.case_sensitive, num_proc=masking.tag_num_proc)
    else:
        ds = tag_entities(ds, masking.spacy_pipeline, fields, num_proc=masking.tag_num_proc,
                          desc=f"Tagging entities in {what}")
    ds = tokenize_with_spans(ds, tokenizer, fields, max_length=block)
    return ds.remove_columns([c for c in ds.column_names if c in fields])


def chunk_probabilities(replay_ratio: float, domain_tokens: float, general_tokens: float) -> list[float]:
    """Per-chunk sampling probabilities (domain, general) whose expected *token* share of general is
    `replay_ratio`, given the mean tokens per chunk of each corpus (chunks of one corpus can be shorter)."""
    wd, wg = (1 - replay_ratio) / domain_tokens, replay_ratio / general_tokens
    return [wd / (wd + wg), wg / (wd + wg)]


def mean_length(ds: Any, sample: int = 2000) -> float:
    rows = ds.select(range(min(sample, len(ds))))["input_ids"]
    return max(1.0, sum(len(x) for x in rows) / max(len(rows), 1))


def premask(ds: Any, collator: Any, batch_size: int = 64) -> Any:
    """Mask a held-out set once (the collator's seed fixes it): rows with `input_ids`, `labels` (+ types)."""
    import datasets

    rows: dict[str, list] = {"input_ids": [], "labels": []}
    for i in range(0, len(ds), batch_size):
        feats = [ds[j] for j in range(i, min(i + batch_size, len(ds)))]
        out = collator(feats)
        for b, f in enumerate(feats):
            n = len(f["input_ids"])
            rows["input_ids"].append(out["input_ids"][b, :n].tolist())
            rows["labels"].append(out["labels"][b, :n].tolist())
            if "token_type_ids" in out:
                rows.setdefault("token_type_ids", []).append(out["token_type_ids"][b, :n].tolist())
    return datasets.Dataset.from_dict(rows)


def build_masked_run_data(cfg: CPTConfig, model: Any, tokenizer: Any, args: Any) -> RunData:
    """The `masking:` technique's `data` hook: the whole data side of a masked run (tagged chunks the Trainer reads
    map-style, the held-out sets, the collator, and the masking statistics callback)."""
    from ..callbacks.masking_stats import MaskingStatsCallback

    train_set, eval_sets, collator, train_collator = build_masked_data(cfg, tokenizer)
    callbacks = [MaskingStatsCallback(train_collator)] if hasattr(train_collator, "pop_stats") else []
    return RunData(train_set, eval_sets, collator, callbacks, cleaning=collator.cleaning, stream=False)


def build_masked_data(cfg: CPTConfig, tokenizer: Any) -> tuple[Any, dict[str, Any], PremaskedOrCollate, Any]:
    """Training set, held-out sets, the Trainer's collator, and the training collator (for its statistics)."""
    import datasets



    data = cfg.data
    r = data.replay_ratio if data.general is not None else 0.0
    names = ["domain"] + (["general"] if data.general is not None and r > 0 else [])
    loaded = {}
    for name in names:
        src = getattr(data, name)
        ds = load_split(src.train, src, f"data.{name}.train")
        if len(ds) == 0:
            raise ValueError(f"`data.{name}.train`: {src.train!r} holds no documents; point it at your text")
        loaded[name] = ds
    # --- data cleaning (issue 34): dedup + decontamination of the documents, before chunking ---
    from .cleaning import clean_train_sources, run_held_out_sets
    from .data import held_out_texts

    loaded, cleaning = clean_train_sources(data.dedup, data.decontaminate, loaded,
                                           {n: getattr(data, n).text_field for n in names},
                                           held_out_texts(data, run_held_out_sets(cfg)), tokenizer)
    # --- end data cleaning ---
    from ..callbacks.progress import PhaseBar, datasets_bars_off

    with datasets_bars_off():  # small sets: no `datasets` bar per set while they load either
        held_out_sets = {name: (load_split(spec.path, spec, where), spec, where)
                         for name, (spec, where) in data.held_out_files().items()}  # `general`, `domain`, named
    total = sum(len(ds) for ds in loaded.values()) + sum(len(ds) for ds, _, _ in held_out_sets.values())
    with datasets_bars_off(), PhaseBar("Tokenizing training text and held-out sets", total=total) as bar:
        train_parts = []
        for name in names:
            src = getattr(data, name)
            part = _prepare(loaded[name], cfg, tokenizer, src.text_field, f"{name} training text", bar)
            train_parts.append(part.add_column("source", [name] * len(part)))
        prepared = {name: (_prepare(ds, cfg, tokenizer, spec.text_field, f"{name} held-out text", bar), where)
                    for name, (ds, spec, where) in held_out_sets.items()}
    if len(train_parts) == 2:
        lengths = [mean_length(p) for p in train_parts]
        train = datasets.interleave_datasets(train_parts, probabilities=chunk_probabilities(r, *lengths),
                                             seed=data.shuffle_seed, stopping_strategy="all_exhausted")
    else:
        train = train_parts[0].shuffle(seed=data.shuffle_seed)
    collator = make_collator(cfg.masking, tokenizer, cfg.objective, seed=cfg.train.seed)
    eval_sets = {}
    for name, (ds, where) in prepared.items():
        if data.max_eval_blocks:
            ds = ds.select(range(min(data.max_eval_blocks, len(ds))))
        if len(ds) == 0:
            raise ValueError(f"`{where}`: no held-out text")
        # clm: the held-out loss is the plain causal loss (no weights, no input masking), comparable to base runs
        held_out = CausalSpanCollator(tokenizer, span_weight=1.0) if cfg.objective == "clm" else \
            make_collator(cfg.masking, tokenizer, cfg.objective, seed=1234)
        eval_sets[name] = premask(ds, held_out)
    return train, eval_sets, PremaskedOrCollate(collator, tokenizer.pad_token_id or 0, cleaning=cleaning), collator
