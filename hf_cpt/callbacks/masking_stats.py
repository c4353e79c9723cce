"""Masking statistics of a span-masking collator, added to the Trainer's training logs."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class MaskingStatsCallback(TrainerCallback):
    """Adds the collator's masking statistics since the last log (`masking/rate`, `masking/span_share`: share of
    masked tokens inside entity/lexicon spans, `masking/<TYPE>`: share per span type) to the Trainer logs."""

    def __init__(self, collator: Any):
        self.collator = collator

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:  # training logs only; eval batches are not counted apart
            stats = self.collator.pop_stats()
            logs.update(stats)
            # the Trainer appended a copy of `logs` to the history just before this hook
            if state is not None and state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)
