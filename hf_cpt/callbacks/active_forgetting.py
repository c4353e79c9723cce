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
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ..plasticity import clear_optimizer_state, embedding_parameters, relearn_embeddings, reset_embeddings
from ..registry import Technique, TrainerParts, names
from ..utils import is_dtensor, is_sharded_model, requested_sharding, unwrap_model
from ..validation import check_int

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)
DEEPSPEED_REFUSED = ("`active_forgetting` does not support DeepSpeed (its embeddings and optimizer state are "
                     "partitioned outside the model): use FSDP2, DDP or a single process, or remove "
                     "`active_forgetting`")


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
        check_int("every_k_updates", self.every_k_updates)


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
            raise ValueError(DEEPSPEED_REFUSED)
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


# --- registry entry ---------------------------------------------------------------------------------------------------
def _preflight(cfg: CPTConfig, model: Any, args: Any) -> None:
    if cfg.active_forgetting is not None:  # a model without token embeddings fails here, before any data
        embedding_parameters(unwrap_model(model), cfg.active_forgetting.reset_untied_output)
        # FSDP2 is supported (tests/distributed/test_fsdp_equal.py); FSDP1 is refused by the callback at train
        # start, where the model's parameters show it
        if requested_sharding(args) == "DeepSpeed":
            raise ValueError(DEEPSPEED_REFUSED)


def _setup(parts: TrainerParts) -> None:
    cfg = parts.cfg
    if cfg.train.trainable == "embeddings":  # the relearning phase: the body frozen, new embeddings learned
        relearn_embeddings(parts.model)
    if cfg.active_forgetting is not None:
        parts.callbacks.append(ActiveForgettingCallback(cfg.active_forgetting))


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    lines = []
    af = config.get("active_forgetting")
    if af:
        lines.append(f"active forgetting: embeddings reset every {af.get('every_k_updates')} updates"
                     + (" (with their optimizer state)" if af.get("reset_optimizer_state") else ""))
    trainable = (config.get("train") or {}).get("trainable", "all")
    if trainable != "all":
        lines.append(f"trainable parameters: {trainable} only")
    return lines


TECHNIQUE = Technique(
    name="active forgetting",
    key="active_forgetting",
    config=ActiveForgettingConfig,
    exports=names("callbacks.active_forgetting", "ActiveForgettingConfig", "ActiveForgettingCallback",
                  "relearn_embeddings"),
    functional=names("plasticity", "reset_embeddings", "clear_optimizer_state"),
    # the reset phase (`active_forgetting:`) and the relearning phase (`train.trainable: embeddings`)
    enabled=lambda cfg: cfg.active_forgetting is not None or cfg.train.trainable == "embeddings",
    preflight=_preflight,
    setup=_setup,
    card=_card,
)
