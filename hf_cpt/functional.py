"""Every pure core of hf-cpt on one page: plain Python / tensors in, new values out, no Trainer.

This is the list of what the library can do; each function is documented where it is defined.
"""

from .callbacks.active_forgetting import clear_optimizer_state, reset_embeddings
from .callbacks.forgetting import compute_forgetting, exceeds_tolerance
from .callbacks.rewarm import build_cycles, lr_multiplier, lr_multiplier_cycles
from .data import pack_blocks
from .mixers.core import allocate_shares, assign_blocks, check_ratios, ratios_at

__all__ = [
    "build_cycles",
    "clear_optimizer_state",
    "compute_forgetting",
    "allocate_shares",
    "assign_blocks",
    "check_ratios",
    "exceeds_tolerance",
    "lr_multiplier",
    "lr_multiplier_cycles",
    "pack_blocks",
    "ratios_at",
    "reset_embeddings",
]
