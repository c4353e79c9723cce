"""The `vocab:` block of a run: read its corpora from the config and extend a model, in memory (`hf-cpt train`) or
into a stock checkpoint (`hf-cpt extend-vocab`)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from ..config import SELF, CPTConfig, SourceConfig
from ..utils import atomic_output_dir
from ..vocab.extend import extend_vocabulary
from .data import load_split
from .models import load_model_and_tokenizer


def vocab_corpora(cfg: CPTConfig, max_docs: int = 200_000
                  ) -> tuple[list[str], list[str], list[str] | None, list[str] | None]:
    """Texts of a `CPTConfig` for `extend_vocabulary`: domain texts to learn from (`vocab.corpus` or
    `data.domain.train`; also `distill`'s contexts), general texts for OFA's corpus word vectors
    (`data.general.train`, only when OFA builds them), held-out domain texts and held-out general texts
    (`data.general.eval`, first 200 documents): the fertility reports, the same whatever the init."""

    def texts(spec: str | None, source: SourceConfig | None, field: str, limit: int = max_docs) -> list[str]:
        if not spec or source is None:
            return []
        ds = load_split(spec, source, field, streaming=source.streaming)
        return [r[source.text_field] for r in itertools.islice(ds, limit)]

    data = cfg.data
    corpus = cfg.vocab.corpus
    domain = texts(corpus or data.domain.train, data.domain, "vocab.corpus" if corpus else "data.domain.train")
    builds_vectors = cfg.vocab.init == "ofa" and not cfg.vocab.word_vectors
    gen = data.general
    # `general.train: self` is written by the model during the run: OFA's vectors then come from the domain text
    general = texts(gen.train, gen, "data.general.train") if builds_vectors and gen is not None \
        and gen.train != SELF else []
    general_heldout = (texts(gen.eval, gen, "data.general.eval", limit=200) if gen is not None else []) or None
    heldout = texts(data.domain.eval, data.domain, "data.domain.eval") or None
    return domain, general, heldout, general_heldout


def extend_run_model(cfg: CPTConfig, model: Any, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The `vocab:` technique's `model` hook for `hf-cpt train`: the loaded base model with its vocabulary
    extended (deterministic, so a resumed run rebuilds the same extended model), its tokenizer and summary."""
    return extend_vocabulary(model, tokenizer, cfg.vocab, *vocab_corpora(cfg))


def extend_checkpoint(cfg: CPTConfig, output_dir: str, overwrite: bool = False) -> dict[str, Any]:
    """`hf-cpt extend-vocab`: load `cfg.model`, apply `cfg.vocab`, and write a stock checkpoint (safetensors,
    extended tokenizer, `hf_cpt_vocab.json`) to `output_dir` atomically. Returns the summary."""
    if cfg.vocab is None:
        raise ValueError("the config has no `vocab:` block: add one (see `hf-cpt init`) to extend the vocabulary")
    # refuses a non-empty output_dir before any work; removes the staging dir on failure
    with atomic_output_dir(Path(output_dir), overwrite) as tmp:
        model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.objective)
        model, tokenizer, summary = extend_vocabulary(model, tokenizer, cfg.vocab, *vocab_corpora(cfg))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "hf_cpt_vocab.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return summary
