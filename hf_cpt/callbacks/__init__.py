"""Trainer callbacks: thin glue around the pure cores."""

from .forgetting import ForgettingMonitorCallback, ForgettingMonitorConfig
from .replay_mixer import ReplayMixerCallback
from .rewarm import CycleConfig, RewarmCallback, RewarmConfig

__all__ = ["CycleConfig", "ForgettingMonitorCallback", "ForgettingMonitorConfig", "ReplayMixerCallback", "RewarmCallback",
           "RewarmConfig"]
