"""KL to the base model on held-out general text: forgetting measured from the model alone.

A general held-out *loss* only shows forgetting when the held-out text is something the model knew and is not
learning again (the King James Bible, for SmolLM2, is learnt: its loss falls while the model drifts). The KL from
the base model's next-token distribution to the current one is zero at step 0 and can only rise as the model
forgets, whatever the text. The base log-probs are kept compactly: the top-k ids and log-probs per token
(8 x k bytes per token), and the KL is the top-k + rest estimator of `hf_cpt.base_targets.topk_kl` (a lower bound of
the full KL; exact when k = vocabulary size).

The callback computes the KL in `on_log`, right when the Trainer logs ``eval_<set>_loss``, and adds
``eval_<set>_kl`` and ``eval_<set>_top1_agree`` to the same log record (and so to `state.log_history`,
`trainer.evaluate()`'s metrics and the [`ForgettingMonitorCallback`] history). Reporting integrations
(TensorBoard, W&B, ...) see them when they run after this callback: [`attach_kl_to_base`] adds it and moves them
behind it with the Trainer's public `pop_callback`/`add_callback`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from ..base_targets import compute_base_targets, evaluate_kl
from ..utils import add_callback_before_integrations, unwrap_model
from ..validation import check_int

logger = logging.getLogger(__name__)


def _positions(data: Any) -> torch.Tensor | None:
    """The `position_ids` column of document-packed blocks (a dataset or a list of block dicts), else None."""
    if isinstance(data, list) and data and isinstance(data[0], Mapping) and "position_ids" in data[0]:
        return torch.tensor([list(b["position_ids"]) for b in data], dtype=torch.long)
    columns = getattr(data, "column_names", None)
    if isinstance(columns, list) and "position_ids" in columns:
        return torch.tensor([list(r) for r in data["position_ids"]], dtype=torch.long)
    return None


def _as_ids(data: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(N, T)` token ids and an attention mask (None when every row is full length) from a tensor, a list of
    rows (or of block dicts), or a dataset with an `input_ids` column; ragged rows (e.g. masked-LM chunks) are
    right-padded."""
    if isinstance(data, torch.Tensor):
        return data.long(), None
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        data = [b["input_ids"] for b in data]
    rows = [list(r) for r in (data["input_ids"] if not isinstance(data, list) else data)]
    width = max(len(r) for r in rows)
    if all(len(r) == width for r in rows):
        return torch.tensor(rows, dtype=torch.long), None
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


class KLToBaseCallback(TrainerCallback):
    """Logs KL(base || model) and top-1 agreement with the base model for named held-out sets.

    Args:
        eval_sets: `{name: blocks}`, the same held-out sets (or a subset) passed to the Trainer as
            `eval_dataset`; blocks are equal-length rows of `input_ids` (a tensor, rows, or a dataset column).
            Document-packed blocks (a `position_ids` column) are run with those positions, so the KL sees the
            same per-document attention as the Trainer's evaluation.
        top_k: base log-probs kept per token.
        targets: precomputed base targets `{name: {"ids", "logprobs"}}` (from `compute_base_targets` on the base
            model). Without them they are computed from the live model at the first evaluation at step 0 — so a
            run resumed from a checkpoint must pass them (the live model is no longer the base).
        batch_size: rows per forward pass of the KL evaluation.

    Not stateful on purpose: the base targets are tensors, too large for `trainer_state.json`; the Trainer keeps
    this object as it is across a resume.
    """

    def __init__(self, eval_sets: Mapping[str, Any], top_k: int = 64,
                 targets: Mapping[str, Mapping[str, torch.Tensor]] | None = None, batch_size: int = 8) -> None:
        check_int("top_k", top_k)
        check_int("batch_size", batch_size)
        if not eval_sets:
            raise ValueError("`eval_sets` must name at least one held-out set to measure the KL on")
        converted = {name: _as_ids(data) for name, data in eval_sets.items()}
        self.inputs = {name: ids for name, (ids, _) in converted.items()}
        self.masks = {name: mask for name, (_, mask) in converted.items()}
        self.positions = {name: _positions(data) for name, data in eval_sets.items()}
        self.top_k, self.batch_size = top_k, batch_size
        self.targets: dict[str, Mapping[str, torch.Tensor]] = dict(targets or {})
        unknown = set(self.targets) - set(self.inputs)
        if unknown:
            raise ValueError(f"`targets` for sets that are not in `eval_sets`: {sorted(unknown)}")

    def compute_targets(self, base_model: Any) -> None:
        """Store the base model's top-k on every set (call before training, on the base model)."""
        for name, ids in self.inputs.items():
            self.targets[name] = compute_base_targets(base_model, ids, self.top_k, batch_size=self.batch_size,
                                                      attention_mask=self.masks[name],
                                                      position_ids=self.positions[name])

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or model is None:
            return control
        names = [n for n in self.inputs if f"eval_{n}_loss" in logs]
        if not names:
            return control
        model = unwrap_model(model)
        for name in names:
            if name not in self.targets:
                if state.global_step != 0:
                    raise ValueError(f"KLToBaseCallback has no base targets for {name!r} at step "
                                     f"{state.global_step}: pass `targets` (compute them on the base model with "
                                     "`compute_targets`) when resuming")
                self.targets[name] = compute_base_targets(model, self.inputs[name], self.top_k,
                                                          batch_size=self.batch_size, attention_mask=self.masks[name],
                                                          position_ids=self.positions[name])
            t = self.targets[name]
            result = evaluate_kl(model, self.inputs[name], t["ids"], t["logprobs"], batch_size=self.batch_size,
                                 attention_mask=self.masks[name], position_ids=self.positions[name])
            extra = {f"eval_{name}_kl": result["kl"], f"eval_{name}_top1_agree": result["top1_agree"]}
            logs.update(extra)  # the same dict the Trainer returns from evaluate() and the monitor reads
            # the Trainer appended a copy of `logs` to the history just before this hook
            if state.log_history and f"eval_{name}_loss" in state.log_history[-1]:
                state.log_history[-1].update(extra)
        return control


def attach_kl_to_base(trainer: Any, callback: KLToBaseCallback) -> KLToBaseCallback:
    """Add `callback` to `trainer` ahead of its reporting integrations, so TensorBoard/W&B/... log the KL too.

    Uses only the Trainer's public callback API: the integrations are popped and added back after it.
    """
    return add_callback_before_integrations(trainer, callback)
