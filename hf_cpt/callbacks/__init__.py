"""Trainer callbacks: thin glue around the pure cores."""

from .forgetting import ForgettingMonitorCallback, ForgettingMonitorConfig

__all__ = ["ForgettingMonitorCallback", "ForgettingMonitorConfig"]
