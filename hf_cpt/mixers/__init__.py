"""Mixing named text sources (domain data, general replay data, ...) at exact token shares."""

from .core import RatioStage, allocate_shares, assign_blocks, check_ratios, ratios_at
from .prepared import PreparedMixer, PreparedStore, build_mix_schedule
from .replay import ReplayMixer, ReplayMixerConfig

__all__ = ["PreparedMixer", "PreparedStore", "RatioStage", "ReplayMixer", "ReplayMixerConfig", "allocate_shares",
           "assign_blocks", "build_mix_schedule", "check_ratios", "ratios_at"]
