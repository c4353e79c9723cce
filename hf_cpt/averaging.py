"""Weight averaging, the formulas: an exponential moving average and the mean of the last K snapshots
(`hf_cpt.callbacks.weight_averaging` keeps them during training). Pure core: torch only, no transformers."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ema_update(average: torch.Tensor, weights: torch.Tensor, decay: float) -> torch.Tensor:
    """`decay * average + (1 - decay) * weights` (as `torch.lerp`, in `average`'s dtype), a new tensor."""
    return torch.lerp(average, weights.to(device=average.device, dtype=average.dtype), 1.0 - decay)


def window_average(snapshots: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float32 mean of equally shaped `snapshots`, summed one at a time (no stacked copy)."""
    if not snapshots:
        raise ValueError("`snapshots` is empty: nothing to average")
    total = snapshots[0].to(torch.float32).clone()
    for s in snapshots[1:]:
        total += s.to(device=total.device, dtype=torch.float32)
    return total / len(snapshots)


def average_due(step: int, start_step: int, every: int) -> bool:
    """Whether the update that ends at `step` counts (`start_step`, then every `every` updates)."""
    return step >= start_step and (step - start_step) % every == 0
