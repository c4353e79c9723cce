"""Rewarming learning-rate schedules for continual pretraining.

The schedules and their formulas (the cycles, the presets, the paper) are described in `hf_cpt.schedules`, the
pure core this module puts into a `Trainer`.

Two ways to use it with a `Trainer`, both resume-safe (the LR is a pure function of the step counter the
Trainer restores from the checkpoint):

* `RewarmCallback(cfg)`: add it to any Trainer; it installs the schedule into the Trainer's own scheduler at
  train start and logs `lr_stage` (the cycle) with the learning rate.
* `make_rewarm_optimizer(model, cfg, ...)` + `make_rewarm_scheduler(optimizer, cfg, max_steps)` passed as
  `Trainer(optimizers=(opt, sched))`: needed for `embedding_lr_ratio` (embeddings in their own param group).

Starting a NEW schedule from a checkpoint's weights (the CPT case) means loading the weights with
`from_pretrained(checkpoint)` and training without `resume_from_checkpoint`; use
[`lr_at_checkpoint`] to warm up from the LR the checkpoint ended at. Continuing the old run (the resume case)
is `trainer.train(resume_from_checkpoint=...)` with the same config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ..registry import Technique, TrainerParts, names
from ..schedules import (  # noqa: F401  (the configs and pure cores live there; used and re-exported here)
    DECAYS,
    SCHEDULES,
    WARMUPS,
    CycleConfig,
    RewarmConfig,
    RewarmSchedule,
    build_cycles,
    lr_multiplier,
    lr_multiplier_cycles,
    trainer_scheduler_name,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig


def make_rewarm_scheduler(optimizer: torch.optim.Optimizer, cfg: RewarmConfig, num_training_steps: int,
                          last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `cfg` over `num_training_steps`; pass it as `Trainer(optimizers=(opt, sched))`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, RewarmSchedule(cfg, num_training_steps), last_epoch)


def make_rewarm_optimizer(model: torch.nn.Module, cfg: RewarmConfig, learning_rate: float,
                          weight_decay: float = 0.0, decay_embeddings: bool = False,
                          **adamw_kwargs: Any) -> torch.optim.AdamW:
    """AdamW with the decay/no-decay split of `hf_cpt.param_groups.decay_parameter_names` (no decay on norms and
    biases, nor on the embeddings unless `decay_embeddings`) plus the input (and tied output) embeddings in their
    own group at `learning_rate * cfg.embedding_lr_ratio`."""
    from ..param_groups import decay_parameter_names

    decay_names = set(decay_parameter_names(model, decay_embeddings))
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        emb_ids |= {id(p) for p in out.parameters()}
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "weight_decay": weight_decay, "lr": learning_rate},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": learning_rate},
        "embeddings": {"params": [], "weight_decay": weight_decay if decay_embeddings else 0.0,
                       "lr": learning_rate * cfg.embedding_lr_ratio},
    }
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key = "embeddings" if id(p) in emb_ids else ("decay" if name in decay_names else "no_decay")
        groups[key]["params"].append(p)
    return torch.optim.AdamW([g for g in groups.values() if g["params"]], lr=learning_rate, **adamw_kwargs)


def lr_at_checkpoint(checkpoint_dir: str | Path) -> float:
    """The last learning rate logged in a Trainer checkpoint's `trainer_state.json` (to re-warm from it)."""
    path = Path(checkpoint_dir) / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"no trainer_state.json in {str(checkpoint_dir)!r}: not a Trainer checkpoint")
    history = json.loads(path.read_text())["log_history"]
    lrs = [h["learning_rate"] for h in history if "learning_rate" in h]
    if not lrs:
        raise ValueError(f"{str(path)!r} logs no learning_rate")
    return float(lrs[-1])


class RewarmCallback(TrainerCallback):
    """Installs a [`RewarmConfig`] schedule into the Trainer's scheduler and logs the LR stage.

    The Trainer's scheduler must be a `LambdaLR` (all `lr_scheduler_type` values are); its step counter, saved
    in checkpoints, drives the schedule, so `resume_from_checkpoint` continues exactly where it stopped.
    """

    def __init__(self, config: RewarmConfig | dict | None = None, **kwargs: Any) -> None:
        if isinstance(config, dict):
            config = RewarmConfig(**config)
        self.config = config if config is not None else RewarmConfig(**kwargs)
        self.schedule: RewarmSchedule | None = None

    def on_train_begin(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        if isinstance(getattr(lr_scheduler, "lr_lambdas", None), list) and isinstance(
            lr_scheduler.lr_lambdas[0], RewarmSchedule
        ):
            self.schedule = lr_scheduler.lr_lambdas[0]  # already ours (make_rewarm_scheduler)
            return control
        if self.config.embedding_lr_ratio != 1.0:
            raise ValueError("`embedding_lr_ratio` needs its own optimizer param group: build the optimizer with "
                             "make_rewarm_optimizer() and pass Trainer(optimizers=(optimizer, scheduler))")
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(f"RewarmCallback needs the Trainer's scheduler to be a LambdaLR, got "
                             f"{type(lr_scheduler).__name__}; pass make_rewarm_scheduler() via `optimizers=`")
        self.schedule = RewarmSchedule(self.config, state.max_steps)
        lr_scheduler.lr_lambdas = [self.schedule] * len(lr_scheduler.optimizer.param_groups)
        # re-apply at the current step (non-zero on resume) so the first update already uses our schedule
        step = lr_scheduler.last_epoch
        lrs = [base * self.schedule(step) for base in lr_scheduler.base_lrs]
        for group, lr in zip(lr_scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        # get_last_lr() is what the Trainer logs; it would still report the replaced schedule's value
        lr_scheduler._last_lr = lrs
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.schedule is not None and "learning_rate" in logs:
            # the Trainer logs the LR of the update it just made: update `global_step`, i.e. scheduler step - 1
            logs["lr_stage"] = self.schedule.stage(max(state.global_step - 1, 0))
            # the Trainer appended a copy of `logs` to `state.log_history` just before this hook: update it too,
            # so the stage reaches trainer_state.json and the integrations that read the history
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step and "learning_rate" in last:
                last["lr_stage"] = logs["lr_stage"]
        return control


def make_rewarm_optimizers(model: torch.nn.Module, cfg: RewarmConfig, args: Any) -> tuple:
    """[`make_rewarm_optimizer`] with the betas/eps/weight decay/LR of the Trainer's `args`, and its
    [`make_rewarm_scheduler`] over `args.max_steps`: the pair for `Trainer(optimizers=...)`."""
    optimizer = make_rewarm_optimizer(model, cfg, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    return optimizer, make_rewarm_scheduler(optimizer, cfg, args.max_steps)


# --- registry entry ---------------------------------------------------------------------------------------------------
def _check(cfg: CPTConfig) -> None:
    if cfg.schedule is not None and cfg.train.warmup_steps:
        raise ValueError("`train.warmup_steps` is set but `schedule` defines the LR: set "
                         "`schedule.warmup_steps` instead and remove `train.warmup_steps`")
    if cfg.schedule is not None and cfg.train.lr_scheduler_type is not None:
        raise ValueError(f"`train.lr_scheduler_type` is {cfg.train.lr_scheduler_type!r} but `schedule` defines the "
                         "LR: remove `train.lr_scheduler_type` (or the `schedule` block)")
    if cfg.schedule is None and cfg.train.lr_scheduler_type is None:
        raise ValueError("`train.lr_scheduler_type` is null and there is no `schedule` block: name a transformers "
                         "scheduler (e.g. cosine) or add a `schedule` block")


def name_schedule_in_args(args: Any, cfg: RewarmConfig) -> None:
    """Set `args.lr_scheduler_type` / `args.warmup_steps` to the shape and warm-up of `cfg`'s schedule
    ([`trainer_scheduler_name`]): hf-cpt builds the scheduler itself, and these fields are what the Trainer's
    records (`training_args.bin`, the hyper-parameters integrations log) say ran."""
    from transformers.trainer_utils import SchedulerType

    args.lr_scheduler_type = SchedulerType(trainer_scheduler_name(cfg))
    args.warmup_steps = cfg.warmup_steps


def _setup(parts: TrainerParts) -> None:
    cfg, args, decay_embeddings = parts.cfg.schedule, parts.args, parts.cfg.train.decay_embeddings
    name_schedule_in_args(args, cfg)
    # built by the Trainer on the model it trains (wrapped by DDP/FSDP by then): FSDP refuses ready-made optimizers
    parts.optimizer_factory = lambda model: make_rewarm_optimizer(
        model, cfg, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        decay_embeddings=decay_embeddings,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    parts.scheduler_factory = lambda optimizer, steps: make_rewarm_scheduler(optimizer, cfg, steps)
    parts.callbacks.append(RewarmCallback(cfg))


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    # the run's LR schedule either way: the rewarming one, or the Trainer's own
    schedule, train = config.get("schedule"), config.get("train") or {}
    if schedule:
        return [f"LR schedule: `{schedule.get('schedule', 'rewarm')}`: {schedule.get('warmup', 'linear')} "
                f"re-warmup over {schedule.get('warmup_steps')} updates to {train.get('learning_rate')}, then "
                + ("held constant" if schedule.get("decay") == "none" else f"{schedule.get('decay', 'cosine')} re-decay")
                + "".join(
                    f", {k}={v}" for k, v in schedule.items()
                    if k not in ("schedule", "warmup", "warmup_steps", "decay") and v not in (None, [], {}))]
    return [f"LR schedule: {train.get('lr_scheduler_type')} from {train.get('learning_rate')} "
            f"({train.get('warmup_steps', 0)} warmup updates)"]


TECHNIQUE = Technique(
    name="rewarming",
    key="schedule",
    config=RewarmConfig,
    exports=names("callbacks.rewarm", "RewarmConfig", "CycleConfig", "RewarmCallback", "make_rewarm_scheduler",
                  "make_rewarm_optimizer", "lr_at_checkpoint"),
    functional=names("schedules", "build_cycles", "lr_multiplier", "lr_multiplier_cycles"),
    check=_check,
    setup=_setup,
    card=_card,
)
