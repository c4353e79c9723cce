"""Active forgetting: reset the token embeddings every K optimizer updates during pretraining.

Paper: "Improving Language Plasticity via Pretraining with Active Forgetting" (Chen et al., NeurIPS 2023).
Pretraining with the input embedding layer re-initialised every K updates (K = 1000 in the paper) makes the
transformer body rely less on any particular embedding, so that later a *new* embedding layer (a new language or
vocabulary) is learned faster, by training the embeddings alone with the body frozen ([`relearn_embeddings`]).

At update k·K (k = 1, 2, ...): ``E <- N(0, initializer_range)`` (the init transformers uses for embeddings, padding
row zeroed), the tied output head follows since it is the same tensor, and the optimizer state of exactly those
parameters (Adam `exp_avg`, `exp_avg_sq`, `step`) is zeroed; every other parameter and its state is untouched.
The reset count is derived from the Trainer's update counter, and each reset draws from a generator seeded by
``(seed, k)``: every rank resets identically, and a resumed run resets at the same steps to the same values.
Under FSDP2 each rank writes its own rows of that same full draw, and clears the optimizer state of its shard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from ..utils import is_dtensor, is_sharded_model, requested_sharding, unwrap_model

logger = logging.getLogger(__name__)


@dataclass
class ActiveForgettingConfig:
    """When and how to reset the embeddings."""

    every_k_updates: int = field(default=1000, metadata={"help": "Reset after every K-th optimizer update."})
    reset_optimizer_state: bool = field(default=True, metadata={"help": "Zero the reset parameters' Adam state."})
    reset_untied_output: bool = field(
        default=False, metadata={"help": "Also reset an untied LM head (a tied one always follows)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the reset draws (same on every rank)."})

    def __post_init__(self) -> None:
        k = self.every_k_updates
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"`every_k_updates` must be an integer >= 1, got {k!r}")


def embedding_parameters(model: torch.nn.Module, include_untied_output: bool = False) -> list[torch.nn.Parameter]:
    """The input embedding weight (and the output head's, if untied and asked for), each once."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if not isinstance(emb, torch.nn.Module) or not hasattr(emb, "weight"):
        raise ValueError(f"{type(model).__name__} has no input embeddings (`get_input_embeddings()`): active "
                         "forgetting needs a model with a token embedding layer")
    params = [emb.weight]
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if include_untied_output and out is not None and out.weight is not emb.weight:
        params.append(out.weight)
    return params


@torch.no_grad()
def reset_embeddings(model: torch.nn.Module, generator: torch.Generator, std: float | None = None,
                     include_untied_output: bool = False) -> list[torch.nn.Parameter]:
    """Re-initialise the embeddings in place with N(0, std) (default `config.initializer_range`).

    Returns:
        the parameters that were reset.
    """
    params = embedding_parameters(model, include_untied_output)
    std = std if std is not None else float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    pad = getattr(model.get_input_embeddings(), "padding_idx", None)
    for i, p in enumerate(params):
        fresh = torch.randn(p.shape, generator=generator, dtype=torch.float32) * std  # the full (global) shape
        if i == 0 and pad is not None:
            fresh[pad] = 0.0
        _copy_whole(p, fresh.to(dtype=p.dtype))
    return params


def _copy_whole(param: torch.Tensor, whole: torch.Tensor) -> None:
    """`param.copy_(whole)`; for an FSDP2-sharded parameter (a `DTensor`) each rank copies its own rows of the same
    full draw (`src_data_rank=None`: no communication), so the sharded reset equals the unsharded one."""
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        whole = distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(whole.to(param.device))


@torch.no_grad()
def clear_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> int:
    """Zero every state tensor (moments and step) of `params` in `optimizer`; returns how many were found."""
    found = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        found += 1
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()
    return found


def relearn_embeddings(model: torch.nn.Module, include_untied_output: bool = True) -> list[str]:
    """Freeze everything but the embeddings (the paper's adaptation phase); returns the trainable names.

    Undo with `for p in model.parameters(): p.requires_grad_(True)`.
    """
    keep = {id(p) for p in embedding_parameters(model, include_untied_output)}
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            names.append(name)
    return names


class ActiveForgettingCallback(TrainerCallback):
    """Resets the embeddings after every `every_k_updates` optimizer updates (see the module docstring).

    Counts optimizer updates (`state.global_step`), so gradient accumulation does not change the schedule.
    Logs `active_forgetting_resets` and `active_forgetting_last_reset`.
    """

    def __init__(self, config: ActiveForgettingConfig | dict | None = None, **kwargs: Any) -> None:
        if isinstance(config, dict):
            config = ActiveForgettingConfig(**config)
        self.config = config if config is not None else ActiveForgettingConfig(**kwargs)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # the real setting: what the arguments or `accelerate launch` ask for, and what the model is. FSDP2
        # (DTensor parameters) is supported: each rank resets its rows of one full draw, and the optimizer state
        # of the sharded parameters is cleared shard by shard. FSDP1's flat parameters and DeepSpeed are not.
        params = embedding_parameters(unwrap_model(model), self.config.reset_untied_output) if model is not None \
            else []  # fail early on a model without embeddings
        if requested_sharding(args) == "DeepSpeed":
            raise ValueError("`active_forgetting` does not support DeepSpeed (its embeddings and optimizer state are "
                             "partitioned outside the model): use FSDP2, DDP or a single process, or remove "
                             "`active_forgetting`")
        if model is not None and is_sharded_model(model) and not all(is_dtensor(p) for p in params):
            raise ValueError("`active_forgetting` supports FSDP2 (`fsdp_version: 2`, DTensor parameters) but not "
                             "FSDP1 or DeepSpeed ZeRO-3 (flattened/partitioned embeddings): use FSDP2, DDP or a "
                             "single process, or remove `active_forgetting`")
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        k = self.config.every_k_updates
        if state.global_step == 0 or state.global_step % k:
            return control
        index = state.global_step // k
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)
        params = reset_embeddings(unwrap_model(model), generator, include_untied_output=self.config.reset_untied_output)
        if self.config.reset_optimizer_state and optimizer is not None:
            clear_optimizer_state(getattr(optimizer, "optimizer", optimizer), params)  # accelerate wraps it
        if state.is_world_process_zero:
            logger.info("active forgetting: embeddings reset at update %d (reset #%d)", state.global_step, index)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            resets = state.global_step // self.config.every_k_updates
            logs["active_forgetting_resets"] = resets
            logs["active_forgetting_last_reset"] = resets * self.config.every_k_updates
        return control
