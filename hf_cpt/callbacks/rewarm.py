"""Rewarming learning-rate schedules for continual pretraining.

Paper: "Continual Pre-Training of Large Language Models: How to (re)warm your model?" (Gupta et al., 2023).
Continuing pretraining from a checkpoint whose LR has decayed, the LR is *re-warmed* linearly to a new maximum
and then *re-decayed*; this raises the loss at first but adapts better to the new data in the long run.

A schedule is a list of cycles; each is ``warmup -> stable -> decay -> hold``. Within a cycle, at local step t
(``W`` warmup, ``S`` stable, ``D`` decay steps; multipliers of the optimizer's base LR)::

    t < W            start + (peak - start) * w(t / W)        w: linear p | cosine (1 - cos(pi p)) / 2 | 1-sqrt 1 - sqrt(1 - p)
    t < W + S        peak
    t < W + S + D    floor + (peak - floor) * d((t - W - S) / D)
                     d: cosine (1 + cos(pi p)) / 2 | linear 1 - p | 1-sqrt 1 - sqrt(p) | none 1
                     inverse_sqrt: max(floor, peak * sqrt(T / (T + t - W - S)))
    otherwise        floor

Presets (`RewarmConfig.schedule`) compile to cycles: `rewarm` (warmup then decay to `min_lr_ratio`), `wsd`
(warmup-stable-decay), `infinite` (warmup, cooldown to `constant_lr_ratio`, constant, optional final anneal),
`constant`, and explicit `cycles` (one per data stage; OLMo-core's WSDS). `cycle_steps` repeats the preset's
cycle, re-warming every `cycle_steps` steps.

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
import math
from dataclasses import asdict, dataclass, field, fields
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ..registry import Technique, TrainerParts, names
from ..validation import check_choice, check_int, check_number

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

WARMUPS = ("linear", "cosine", "1-sqrt")
DECAYS = ("cosine", "linear", "1-sqrt", "inverse_sqrt", "none")
SCHEDULES = ("rewarm", "wsd", "infinite", "constant", "cycles")


@dataclass
class CycleConfig:
    """One warmup -> stable -> decay -> hold cycle, e.g. one data stage. LRs are ratios of the base LR."""

    steps: int = field(metadata={"help": "Length of the cycle in optimizer steps."})
    peak: float = field(default=1.0, metadata={"help": "LR reached after warmup (ratio of the base LR)."})
    warmup_steps: int = field(default=0, metadata={"help": "Re-warmup length."})
    warmup_start: float | None = field(
        default=None, metadata={"help": "LR ratio the warmup starts from; None: where the previous cycle ended "
                                        "(0 for the first cycle)."})
    warmup: str = field(default="linear", metadata={"help": f"Warmup shape, one of {WARMUPS}."})
    stable_steps: int = field(default=0, metadata={"help": "Steps held at `peak` after warmup."})
    decay: str = field(default="cosine", metadata={"help": f"Decay shape, one of {DECAYS}."})
    decay_steps: int | None = field(default=None, metadata={"help": "Decay length; None: the rest of the cycle."})
    floor: float = field(default=0.0, metadata={"help": "LR ratio at the end of the decay, held afterwards."})
    timescale: int | None = field(default=None, metadata={"help": "inverse_sqrt timescale (default: warmup or 1)."})

    def __post_init__(self) -> None:
        check_int("steps", self.steps)
        for name in ("warmup_steps", "stable_steps"):
            check_int(name, getattr(self, name), minimum=0)
        check_int("decay_steps", self.decay_steps, minimum=0, optional=True)
        check_int("timescale", self.timescale, minimum=0, optional=True)
        check_number("peak", self.peak, 0.0)
        check_number("floor", self.floor, 0.0)
        if self.warmup_start is not None:
            check_number("warmup_start", self.warmup_start, 0.0)
        check_choice("warmup", self.warmup, WARMUPS)
        check_choice("decay", self.decay, DECAYS)
        if self.floor > self.peak:
            raise ValueError(f"`floor` ({self.floor}) is above `peak` ({self.peak}): the minimum LR must not exceed "
                             "the maximum")
        used = self.warmup_steps + self.stable_steps + (self.decay_steps or 0)
        if used > self.steps:
            raise ValueError(f"warmup + stable + decay steps ({used}) are longer than the cycle (`steps`={self.steps})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"`warmup_steps` ({self.warmup_steps}) is longer than the run ({self.steps} steps)")

    @property
    def resolved_decay_steps(self) -> int:
        return self.steps - self.warmup_steps - self.stable_steps if self.decay_steps is None else self.decay_steps


@dataclass
class RewarmConfig:
    """A rewarming LR schedule (see the module docstring for the formula). LRs are ratios of the base LR
    (`TrainingArguments.learning_rate`), so `learning_rate` is the peak of a single-cycle schedule.

    Args:
        schedule: `rewarm`, `wsd`, `infinite`, `constant` or `cycles`.
        total_steps: length of the run; None: the Trainer's `max_steps`.
    """

    schedule: str = field(default="rewarm", metadata={"help": f"One of {SCHEDULES}."})
    total_steps: int | None = field(default=None, metadata={"help": "Run length; None: the Trainer's max_steps."})
    warmup_steps: int = field(default=0, metadata={"help": "Re-warmup length (per cycle with `cycle_steps`)."})
    warmup_start: float = field(default=0.0, metadata={"help": "LR ratio the warmup starts from (0, or the "
                                                               "checkpoint's final LR / base LR)."})
    warmup: str = field(default="linear", metadata={"help": f"Warmup shape, one of {WARMUPS}."})
    decay: str = field(default="cosine", metadata={"help": f"Decay shape, one of {DECAYS}."})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "LR ratio at the end of the (final) decay."})
    decay_steps: int | None = field(default=None, metadata={"help": "wsd: final decay length; infinite: cooldown."})
    constant_lr_ratio: float = field(default=0.5, metadata={"help": "infinite: LR ratio after the cooldown."})
    anneal_steps: int = field(default=0, metadata={"help": "infinite: final anneal to `min_lr_ratio`."})
    cycle_steps: int | None = field(default=None, metadata={"help": "Repeat the cycle every N steps (re-warm)."})
    cycles: list[CycleConfig] = field(default_factory=list, metadata={"help": "schedule=cycles: one per stage."})
    embedding_lr_ratio: float = field(default=1.0, metadata={"help": "LR multiplier of embedding parameters."})

    def __post_init__(self) -> None:
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("warmup", self.warmup, WARMUPS)
        check_choice("decay", self.decay, DECAYS)
        for name in ("warmup_steps", "anneal_steps"):
            check_int(name, getattr(self, name), minimum=0)
        for name in ("total_steps", "decay_steps", "cycle_steps"):
            check_int(name, getattr(self, name), minimum=0, optional=True)
        if self.total_steps == 0 or self.cycle_steps == 0:
            raise ValueError("`total_steps` and `cycle_steps` must be >= 1 when set")
        check_number("warmup_start", self.warmup_start, 0.0)
        check_number("min_lr_ratio", self.min_lr_ratio, 0.0)
        check_number("constant_lr_ratio", self.constant_lr_ratio, 0.0)
        check_number("embedding_lr_ratio", self.embedding_lr_ratio, 0.0)
        if self.embedding_lr_ratio == 0:
            raise ValueError("`embedding_lr_ratio` must be > 0 (freeze embeddings with requires_grad=False)")
        if self.min_lr_ratio > 1:
            raise ValueError(f"`min_lr_ratio` ({self.min_lr_ratio}) must be <= 1: min_lr above the max LR")
        self.cycles = [_as_cycle(c, i) for i, c in enumerate(self.cycles)]
        if self.schedule == "cycles" and not self.cycles:
            raise ValueError("`cycles` is empty: schedule='cycles' needs at least one cycle")
        if self.schedule != "cycles" and self.cycles:
            raise ValueError(f"`cycles` is set but `schedule` is {self.schedule!r}; set schedule: cycles")
        if self.total_steps is not None:
            build_cycles(self, self.total_steps)  # validates lengths now rather than at train start


def _as_cycle(c: CycleConfig | dict, i: int) -> CycleConfig:
    """A cycle from YAML data, with errors naming `cycles[i].field`."""
    if isinstance(c, CycleConfig):
        return c
    if not isinstance(c, dict):
        raise ValueError(f"`cycles[{i}]` must be a mapping of cycle fields, got {c!r}")
    known = {f.name for f in fields(CycleConfig)}
    for key in c:
        if key not in known:
            raise ValueError(f"unknown field `cycles[{i}].{key}` (known: {', '.join(sorted(known))})")
    if "steps" not in c:
        raise ValueError(f"`cycles[{i}].steps` is required")
    try:
        return CycleConfig(**c)
    except ValueError as e:
        msg = str(e)
        for name in known:
            msg = msg.replace(f"`{name}`", f"`cycles[{i}].{name}`")
        raise ValueError(msg) from None


def build_cycles(cfg: RewarmConfig, total_steps: int) -> list[CycleConfig]:
    """Compile a [`RewarmConfig`] into the explicit cycles covering `total_steps` steps."""
    if cfg.schedule == "cycles":
        return list(cfg.cycles)
    length = cfg.cycle_steps or total_steps
    if cfg.warmup_steps > length:
        raise ValueError(f"`warmup_steps` ({cfg.warmup_steps}) is longer than the run ({length} steps)")
    if cfg.schedule == "rewarm":
        one = dict(warmup_steps=cfg.warmup_steps, warmup=cfg.warmup, decay=cfg.decay, floor=cfg.min_lr_ratio,
                   timescale=cfg.warmup_steps or None)
    elif cfg.schedule == "constant":
        one = dict(warmup_steps=cfg.warmup_steps, warmup=cfg.warmup, decay="none", floor=0.0)
    elif cfg.schedule == "wsd":
        if cfg.decay_steps is None:
            raise ValueError("`decay_steps` is required for schedule='wsd' (length of the final decay)")
        if cfg.warmup_steps + cfg.decay_steps > length:
            raise ValueError(f"`warmup_steps` + `decay_steps` ({cfg.warmup_steps + cfg.decay_steps}) are longer "
                             f"than the run ({length} steps)")
        one = dict(warmup_steps=cfg.warmup_steps, warmup=cfg.warmup, decay=cfg.decay, floor=cfg.min_lr_ratio,
                   stable_steps=length - cfg.warmup_steps - cfg.decay_steps, decay_steps=cfg.decay_steps)
    else:  # infinite: warmup, cooldown to a constant, constant, then an optional final anneal
        if cfg.decay_steps is None:
            raise ValueError("`decay_steps` is required for schedule='infinite' (length of the cooldown)")
        if cfg.constant_lr_ratio > 1:
            raise ValueError(f"`constant_lr_ratio` ({cfg.constant_lr_ratio}) must be <= 1")
        main = total_steps - cfg.anneal_steps
        if cfg.warmup_steps + cfg.decay_steps > main:
            raise ValueError(f"`warmup_steps` + `decay_steps` + `anneal_steps` are longer than the run "
                             f"({total_steps} steps)")
        cycles = [CycleConfig(steps=main, warmup_steps=cfg.warmup_steps, warmup=cfg.warmup,
                              warmup_start=cfg.warmup_start, decay=cfg.decay, decay_steps=cfg.decay_steps,
                              floor=cfg.constant_lr_ratio)]
        if cfg.anneal_steps:
            cycles.append(CycleConfig(steps=cfg.anneal_steps, peak=cfg.constant_lr_ratio, decay=cfg.decay,
                                      floor=min(cfg.min_lr_ratio, cfg.constant_lr_ratio)))
        return cycles
    # `cycle_steps`: identical cycles back to back, each re-warming from `warmup_start`; the run may end inside
    # the last one, exactly as a run of `total_steps` would cut it
    n = -(-total_steps // length)
    return [CycleConfig(steps=length, warmup_start=cfg.warmup_start, **one) for _ in range(n)]


def _cycle_value(t: int, c: CycleConfig, start: float) -> float:
    w, s, d = c.warmup_steps, c.stable_steps, c.resolved_decay_steps
    if t < w:
        p = t / max(1, w)
        shape = p if c.warmup == "linear" else (0.5 * (1.0 - math.cos(math.pi * p)) if c.warmup == "cosine"
                                                else 1.0 - math.sqrt(1.0 - p))
        return start + (c.peak - start) * shape
    if t < w + s:
        return c.peak
    if t < w + s + d:
        td = t - w - s
        if c.decay == "inverse_sqrt":
            scale = c.timescale or max(1, w)
            return max(c.floor, c.peak * math.sqrt(scale / (scale + td)))
        p = td / max(1, d)
        shape = {"cosine": 0.5 * (1.0 + math.cos(math.pi * p)), "linear": 1.0 - p,
                 "1-sqrt": 1.0 - math.sqrt(p), "none": 1.0}[c.decay]
        return c.floor + (c.peak - c.floor) * shape
    return c.peak if c.decay == "none" else c.floor


def lr_multiplier_cycles(step: int, cycles: Sequence[CycleConfig]) -> tuple[float, int]:
    """LR multiplier at `step` and the index of the cycle it falls in (the last cycle holds past its end)."""
    begin, prev_end = 0, 0.0
    for i, c in enumerate(cycles):
        start = prev_end if c.warmup_start is None else c.warmup_start
        if step < begin + c.steps or i == len(cycles) - 1:
            return _cycle_value(min(step - begin, c.steps), c, start), i
        begin += c.steps
        prev_end = _cycle_value(c.steps, c, start)
    raise ValueError("`cycles` is empty")


def lr_multiplier(step: int, cfg: RewarmConfig, total_steps: int | None = None) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based), for the schedule `cfg`.

    Args:
        step: optimizer step.
        cfg: the schedule.
        total_steps: run length when `cfg.total_steps` is None.
    """
    total = cfg.total_steps or total_steps
    if total is None:
        raise ValueError("`total_steps` is not set: give it in the config or pass the run length")
    return lr_multiplier_cycles(step, build_cycles(cfg, total))[0]


@lru_cache(maxsize=64)
def _compiled_cycles(config_json: str, total_steps: int) -> tuple[CycleConfig, ...]:
    return tuple(build_cycles(RewarmConfig(**json.loads(config_json)), total_steps))


class RewarmSchedule:
    """LR lambda for `torch.optim.lr_scheduler.LambdaLR`.

    Its attributes are plain data (the config as a dict and the run length): `LambdaLR.state_dict()` stores them
    in the checkpoint, where `torch.load(weights_only=True)` can read them back on resume.
    """

    def __init__(self, cfg: RewarmConfig, total_steps: int) -> None:
        self.config = asdict(cfg)
        self.total_steps = int(cfg.total_steps or total_steps)
        self._cycles()  # validate now, not at the first step

    def _cycles(self) -> tuple[CycleConfig, ...]:
        return _compiled_cycles(json.dumps(self.config, sort_keys=True), self.total_steps)

    def __call__(self, step: int) -> float:
        return lr_multiplier_cycles(step, self._cycles())[0]

    def stage(self, step: int) -> int:
        """Index of the cycle (data stage) that `step` falls in."""
        return lr_multiplier_cycles(step, self._cycles())[1]


def make_rewarm_scheduler(optimizer: torch.optim.Optimizer, cfg: RewarmConfig, num_training_steps: int,
                          last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `cfg` over `num_training_steps`; pass it as `Trainer(optimizers=(opt, sched))`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, RewarmSchedule(cfg, num_training_steps), last_epoch)


def make_rewarm_optimizer(model: torch.nn.Module, cfg: RewarmConfig, learning_rate: float,
                          weight_decay: float = 0.0, **adamw_kwargs: Any) -> torch.optim.AdamW:
    """AdamW with the Trainer's decay/no-decay split plus the input (and tied output) embeddings in their own
    group at `learning_rate * cfg.embedding_lr_ratio`."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay_names = set(get_parameter_names(model, [torch.nn.LayerNorm], ["bias", "layernorm", "rmsnorm", "norm"]))
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None:
        emb_ids |= {id(p) for p in out.parameters()}
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "weight_decay": weight_decay, "lr": learning_rate},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": learning_rate},
        "embeddings": {"params": [], "weight_decay": weight_decay, "lr": learning_rate * cfg.embedding_lr_ratio},
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


def _setup(parts: TrainerParts) -> None:
    parts.optimizers = make_rewarm_optimizers(parts.model, parts.cfg.schedule, parts.args)
    parts.callbacks.append(RewarmCallback(parts.cfg.schedule))


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    # the run's LR schedule either way: the rewarming one, or the Trainer's own
    schedule, train = config.get("schedule"), config.get("train") or {}
    if schedule:
        return [f"LR schedule: `{schedule.get('schedule', 'rewarm')}`: {schedule.get('warmup', 'linear')} "
                f"re-warmup over {schedule.get('warmup_steps')} updates to {train.get('learning_rate')}, then "
                f"{schedule.get('decay', 'cosine')} re-decay" + "".join(
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
    functional=names("callbacks.rewarm", "build_cycles", "lr_multiplier", "lr_multiplier_cycles"),
    check=_check,
    setup=_setup,
    card=_card,
)
