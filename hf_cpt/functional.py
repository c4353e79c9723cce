"""Every pure core of hf-cpt on one page: plain Python / tensors in, new values out, no Trainer.

This is the list of what the library can do; each function is documented where it is defined.
"""

from .callbacks.active_forgetting import clear_optimizer_state, reset_embeddings
from .callbacks.downstream import downstream_breached, summarize_downstream
from .callbacks.forgetting import compute_forgetting, exceeds_tolerance, tolerance_bound
from .callbacks.rewarm import build_cycles, lr_multiplier, lr_multiplier_cycles
from .collators.masking import apply_replacement, choose_one_per_span, lexicon_budget_mask
from .collators.distill import distill_token_weights
from .collators.spans import char_to_token_spans, lexicon_spans
from .data_clean import (candidate_probability, choose_bands, clean_documents, exact_key, normalize_words,
                         word_shingles)
from .distill import top1_agreement, topk_kl, topk_targets
from .dynamics import annealing_area, fit_dynamics, forward_area
from .evaluation import flatten_results
from .losses import chunked_linear_cross_entropy
from .mixers.cmr import cmr_power_law, critical_ratio, fit_cmr_law, predict_cmr
from .mixers.core import allocate_shares, assign_blocks, check_ratios, pack_blocks, ratios_at
from .mixers.packing import pack_documents, segment_labels, segment_position_ids
from .mixers.prepared import build_mix_schedule
from .synth import dedup_lines, split_seeds
from .vocab.init import factorize_embeddings, init_mean, init_ofa, init_random, init_subword_mean

__all__ = [
    "candidate_probability",
    "choose_bands",
    "clean_documents",
    "exact_key",
    "normalize_words",
    "word_shingles",
    "downstream_breached",
    "flatten_results",
    "summarize_downstream",
    "dedup_lines",
    "distill_token_weights",
    "split_seeds",
    "tolerance_bound",
    "top1_agreement",
    "topk_kl",
    "topk_targets",
    "apply_replacement",
    "char_to_token_spans",
    "choose_one_per_span",
    "factorize_embeddings",
    "init_mean",
    "init_ofa",
    "init_random",
    "init_subword_mean",
    "lexicon_budget_mask",
    "lexicon_spans",
    "build_cycles",
    "chunked_linear_cross_entropy",
    "clear_optimizer_state",
    "annealing_area",
    "cmr_power_law",
    "compute_forgetting",
    "critical_ratio",
    "allocate_shares",
    "assign_blocks",
    "build_mix_schedule",
    "check_ratios",
    "exceeds_tolerance",
    "fit_cmr_law",
    "fit_dynamics",
    "forward_area",
    "lr_multiplier",
    "lr_multiplier_cycles",
    "pack_blocks",
    "pack_documents",
    "segment_labels",
    "segment_position_ids",
    "predict_cmr",
    "ratios_at",
    "reset_embeddings",
]
