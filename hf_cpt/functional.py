"""Every pure core of hf-cpt on one page: plain Python / tensors in, new values out, no Trainer.

This is the list of what the library can do; each function is documented where it is defined.
"""

from .callbacks.active_forgetting import clear_optimizer_state, reset_embeddings
from .callbacks.forgetting import compute_forgetting, exceeds_tolerance
from .callbacks.rewarm import build_cycles, lr_multiplier, lr_multiplier_cycles
from .data import pack_blocks
from .losses import chunked_linear_cross_entropy
from .mixers.cmr import cmr_power_law, critical_ratio, fit_cmr_law, predict_cmr
from .mixers.core import allocate_shares, assign_blocks, check_ratios, ratios_at

__all__ = [
    "build_cycles",
    "chunked_linear_cross_entropy",
    "clear_optimizer_state",
    "cmr_power_law",
    "compute_forgetting",
    "critical_ratio",
    "allocate_shares",
    "assign_blocks",
    "check_ratios",
    "exceeds_tolerance",
    "fit_cmr_law",
    "lr_multiplier",
    "lr_multiplier_cycles",
    "pack_blocks",
    "predict_cmr",
    "ratios_at",
    "reset_embeddings",
]
