"""New-rows-first phase after a vocabulary extension: train only the new embedding rows for a few updates, so
they catch up before the body moves (the old rows and the body are left exactly as they are)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from ..utils import is_sharded_model

# the one wording of the refusal: here at train start, and by `hf-cpt train` right after the model loads
SHARDED_REFUSED = ("`vocab.new_rows_first_steps` (NewRowsFirstCallback) does not support sharded training "
                   "(FSDP/DeepSpeed ZeRO-3) yet: its gradient masks and frozen body would not reach the sharded "
                   "parameters; set `new_rows_first_steps: 0`, or train with DDP or one process")


class NewRowsFirstCallback(TrainerCallback):
    """For the first `steps` updates, train only the embedding rows from `first_new_id` on: the body is frozen
    (no gradients, so AdamW leaves it alone) and old rows get zero gradients; afterwards everything trains.

    Stateless across resume: the phase is read from `state.global_step`.
    """

    def __init__(self, first_new_id: int, steps: int):
        self.first_new_id = first_new_id
        self.steps = steps
        self._hooks: list[Any] = []
        self._frozen: list[torch.nn.Parameter] = []

    def _enter(self, model: Any) -> None:
        emb = {id(model.get_input_embeddings().weight)}
        out = model.get_output_embeddings()
        if out is not None:
            emb.add(id(out.weight))
        start = self.first_new_id

        def mask_old_rows(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[:start] = 0
            return grad

        for p in model.parameters():
            if id(p) in emb:
                self._hooks.append(p.register_hook(mask_old_rows))
            elif p.requires_grad:
                p.requires_grad_(False)
                self._frozen.append(p)

    def _leave(self) -> None:
        for h in self._hooks:
            h.remove()
        for p in self._frozen:
            p.requires_grad_(True)
        self._hooks, self._frozen = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # the phase hooks and freezes the module's parameters; FSDP2 trains gathered copies of them (the hooks never
        # fire, and a frozen flag set after the first gather never reaches the copies), FSDP1/ZeRO-3 flat ones
        if model is not None and is_sharded_model(model):
            raise ValueError(SHARDED_REFUSED)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        active = bool(self._hooks)
        if state.global_step < self.steps and not active and model is not None:
            self._enter(model)
        elif state.global_step >= self.steps and active:
            self._leave()

    def on_train_end(self, args, state, control, **kwargs):
        self._leave()
