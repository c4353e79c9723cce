"""Rewarming learning-rate schedules for continual pretraining: the configs and the pure LR formulas
(no torch, no transformers); `callbacks/rewarm.py` puts them into a Trainer.

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
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from .validation import build_list_item, check_choice, check_int, check_number

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
        if self.schedule == "constant":
            # a constant schedule never decays: record `none`, not the unused default, so the saved recipe says
            # what ran (`cosine`, the default, is what earlier hf-cpt versions saved here)
            if self.decay not in ("none", "cosine"):
                raise ValueError(f"`decay` is {self.decay!r} but `schedule` is constant, which never decays: remove "
                                 "`decay` or pick `schedule: rewarm`")
            self.decay = "none"
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


# the transformers scheduler of the same shape, where one exists (`TrainingArguments.lr_scheduler_type`)
_TRAINER_NAMES = {"cosine": "cosine", "linear": "linear", "inverse_sqrt": "inverse_sqrt", "none": "constant"}


def trainer_scheduler_name(cfg: RewarmConfig) -> str:
    """The `TrainingArguments.lr_scheduler_type` that names `cfg`'s shape for the Trainer's records
    (`training_args.bin`, the hyper-parameters integrations log): hf-cpt builds the real scheduler itself
    (`make_rewarm_scheduler`), so this only keeps those records from naming a schedule that did not run.
    `constant` / `constant_with_warmup`, `warmup_stable_decay` (wsd), the decay's name for `rewarm` (with
    `cosine_with_min_lr` above a zero floor); `cycles` and `infinite`, which transformers has no name for, by the
    shape of their decay."""
    if cfg.schedule == "constant":
        return "constant_with_warmup" if cfg.warmup_steps else "constant"
    if cfg.schedule == "wsd":
        return "warmup_stable_decay"
    if cfg.schedule == "rewarm" and cfg.decay == "cosine" and cfg.min_lr_ratio > 0:
        return "cosine_with_min_lr"
    decay = cfg.cycles[-1].decay if cfg.schedule == "cycles" else cfg.decay
    return _TRAINER_NAMES.get(decay, "cosine")


def _as_cycle(c: CycleConfig | dict, i: int) -> CycleConfig:
    """A cycle from YAML data, with errors naming `cycles[i].field`."""
    return build_list_item(CycleConfig, c, f"cycles[{i}]", "a mapping of cycle fields", required=("steps",))


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
