"""[`RunData`]: the data side of a run, as `build_data` (or a technique's `data` hook) hands it to the Trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunData:
    """The data side of a run: what the Trainer reads, and the callbacks that belong to it.

    Args:
        train_set: the training set (the token-exact mixer's stream, or a technique's own).
        eval_sets: held-out sets by name.
        collator: the Trainer's data collator.
        callbacks: callbacks that belong to the data (the mixer's resume state, masking statistics).
        cleaning: the data-cleaning report of `hf_cpt.recipe.cleaning`, when it ran.
        stream: `train_set` is an iterable stream that restores its own position on resume (the mixer); False
            for a map-style set the Trainer skips through itself.
    """

    train_set: Any
    eval_sets: dict[str, Any]
    collator: Any
    callbacks: list[Any] = field(default_factory=list)
    cleaning: dict[str, Any] | None = None
    stream: bool = True
