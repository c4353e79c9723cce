"""PEFT for continual pretraining: LoRA on the body with trainable embeddings (all rows, or only new token rows),
and a guard that every parameter meant to train actually changes.

Two silent failures this guards against: a LoRA adapter on `lm_head` read around by a fused/chunked loss (it
gets no gradient; see `hf_cpt.losses.lm_head_has_lora`), and new-token embedding rows that never train (frozen,
or never seen in the data). [`TrainedParametersCallback`] checks after a few updates that each trainable
parameter moved, and names the ones that did not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from .import_utils import require

logger = logging.getLogger(__name__)

EMBEDDING_MODES = ("new_rows", "all", "none")


def add_lora_for_cpt(model: torch.nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
                     target_modules: str | Sequence[str] = "all-linear", embeddings: str = "new_rows",
                     new_token_ids: Sequence[int] | None = None) -> Any:
    """Wrap `model` in a PEFT LoRA model for continual pretraining.

    Args:
        r / alpha / dropout / target_modules: LoRA settings (`all-linear` leaves the output head out).
        embeddings: `new_rows` (train only `new_token_ids` rows of the input embeddings, and of a tied head, via
            peft's `trainable_token_indices`; old rows stay bit-identical), `all` (full embeddings and head
            trainable through `modules_to_save`) or `none`.
        new_token_ids: rows to train with `embeddings="new_rows"`.
    """
    peft = require("peft", "LoRA continual pretraining")
    if embeddings not in EMBEDDING_MODES:
        raise ValueError(f"`embeddings` must be one of {EMBEDDING_MODES}, got {embeddings!r}")
    kwargs: dict[str, Any] = {}
    if embeddings == "new_rows":
        if not new_token_ids:
            raise ValueError("`new_token_ids` is required with `embeddings='new_rows'` (the rows to train)")
        vocab = model.get_input_embeddings().weight.shape[0]
        bad = [i for i in new_token_ids if not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(f"`new_token_ids` {bad[:5]} are outside the embedding matrix ({vocab} rows): resize "
                             "the embeddings first (`model.resize_token_embeddings(len(tokenizer))`)")
        kwargs["trainable_token_indices"] = [int(i) for i in new_token_ids]
    elif embeddings == "all":
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                 if m is model.get_input_embeddings() or m is model.get_output_embeddings()}
        kwargs["modules_to_save"] = sorted(names)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if not isinstance(targets, str) and "lm_head" in targets:
        raise ValueError("`target_modules` includes lm_head: a LoRA adapter there gets no gradient from fused or "
                         "chunked losses; train the head with `embeddings='all'` instead")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             task_type="CAUSAL_LM", **kwargs)
    return peft.get_peft_model(model, config)


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
