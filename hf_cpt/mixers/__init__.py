"""Mixing domain data with general (replay) data."""

from .ratio import cycled_indices, mix_indices, mix_streams, ratio_schedule

__all__ = ["cycled_indices", "mix_indices", "mix_streams", "ratio_schedule"]
