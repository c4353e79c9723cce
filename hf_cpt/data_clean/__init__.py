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
