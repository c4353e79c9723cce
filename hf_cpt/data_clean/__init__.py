"""Cleaning of training documents before continual pretraining: exact and near-duplicate removal and n-gram
decontamination against every held-out set, with a report (see `clean.py`). Pure: no transformers, no torch."""

from .clean import CONTAMINATED, EXACT, FLAGGED, KEPT, NEAR, CleanResult, DedupConfig, DocumentCleaner, clean_documents
from .report import STEPS, CleanReport, card_line, summary_line
from .decontam import DECONTAMINATE_ACTIONS, DecontaminateConfig, NgramIndex
from .near import (MINHASH_BACKENDS, NearDuplicateIndex, band_keys, candidate_probability, choose_bands,
                   minhash_function)
from .text import exact_key, jaccard, normalize_words, word_shingles

__all__ = ["CONTAMINATED", "EXACT", "FLAGGED", "KEPT", "NEAR", "STEPS", "CleanReport", "CleanResult", "DedupConfig",
           "card_line", "DocumentCleaner", "clean_documents", "summary_line",
           "DECONTAMINATE_ACTIONS", "DecontaminateConfig", "NgramIndex", "MINHASH_BACKENDS", "NearDuplicateIndex",
           "band_keys", "candidate_probability", "choose_bands", "minhash_function", "exact_key", "jaccard",
           "normalize_words", "word_shingles"]


# --- registry entry ---------------------------------------------------------------------------------------------------
from ..registry import Technique, names  # noqa: E402  (stdlib only)


def _card(config, metrics):
    line = card_line(metrics.get("cleaning"), config.get("data"))
    return [line] if line else []


TECHNIQUE = Technique(
    name="data cleaning",
    key="data.dedup",  # with `data.decontaminate`; both on by default (docs/data_at_scale.md)
    config=DedupConfig,
    exports={**names("data_clean.clean", "DedupConfig", "DocumentCleaner", "clean_documents"),
             "DecontaminateConfig": "data_clean.decontam", "CleanReport": "data_clean.report"},
    functional={**names("data_clean.text", "exact_key", "normalize_words", "word_shingles"),
                **names("data_clean.near", "candidate_probability", "choose_bands"),
                "clean_documents": "data_clean.clean"},
    # the held-out sets and the report are built by the data path itself (recipe/cleaning.py, recipe/data.py)
    enabled=lambda cfg: cfg.data.dedup is not None or (cfg.data.decontaminate is not None
                                                       and cfg.data.decontaminate.action != "off"),
    card=_card,
)
