"""Mixing named text sources (domain data, general replay data, ...) at exact token shares."""

from .core import RatioStage, allocate_shares, assign_blocks, check_ratios, ratios_at
from .replay import ReplayMixer, ReplayMixerConfig

__all__ = ["RatioStage", "ReplayMixer", "ReplayMixerConfig", "allocate_shares", "assign_blocks", "check_ratios",
           "ratios_at"]
