"""A check that every trainable parameter actually changes: an adapter bypassed by a fused loss, a frozen head,
rows of tokens absent from the data or a zero learning rate all leave parameters untouched without an error."""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def _fingerprint(p: torch.Tensor) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    return torch.cat([flat[:4096].float().cpu(), flat.float().sum().reshape(1).cpu()])


def unchanged_parameters(before: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """Names of parameters in `before` (fingerprints from [`snapshot_trainable`]) that have not changed."""
    params = dict(model.named_parameters())
    return [n for n, fp in before.items() if n in params and torch.equal(_fingerprint(params[n]), fp)]


def snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Small fingerprints (first 4096 values + sum) of every trainable parameter."""
    return {n: _fingerprint(p) for n, p in model.named_parameters() if p.requires_grad}


class TrainedParametersCallback(TrainerCallback):
    """After `check_after` optimizer updates, check that every trainable parameter changed.

    Args:
        check_after: updates before the check.
        action: `raise` (stop with the names) or `warn`.
    """

    def __init__(self, check_after: int = 3, action: str = "raise") -> None:
        if action not in ("raise", "warn"):
            raise ValueError(f"`action` must be raise or warn, got {action!r}")
        self.check_after, self.action = check_after, action
        self.before: dict[str, torch.Tensor] | None = None
        self.start_step = 0
        self.unchanged: list[str] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = snapshot_trainable(model)
        self.start_step = state.global_step
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.before is None or self.unchanged is not None or state.global_step - self.start_step < self.check_after:
            return control
        self.unchanged = unchanged_parameters(self.before, model)
        self.before = None
        if self.unchanged:
            msg = (f"{len(self.unchanged)} trainable parameters did not change in {self.check_after} updates: "
                   + ", ".join(self.unchanged[:8]) + (" ..." if len(self.unchanged) > 8 else "")
                   + ". They get no gradient (an adapter bypassed by a fused loss? rows of tokens absent from "
                   "the data? a zero learning rate?)")
            if self.action == "raise":
                raise RuntimeError(msg)
            logger.warning(msg)
        return control
