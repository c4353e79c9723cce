"""Trainer callbacks: thin glue around the pure cores."""

from .forgetting import ForgettingMonitorCallback, ForgettingMonitorConfig
from .rewarm import CycleConfig, RewarmCallback, RewarmConfig

__all__ = ["CycleConfig", "ForgettingMonitorCallback", "ForgettingMonitorConfig", "RewarmCallback", "RewarmConfig"]
