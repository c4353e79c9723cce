"""Forgetting monitor: held-out loss on general vs domain data during continual pretraining.

Continual pretraining trades *plasticity* (domain loss going down) against *stability* (general loss staying
put). This callback makes the trade visible: it reads the Trainer's own evaluation of named held-out sets, records
each loss and its change since step 0, and warns or stops training when the general loss rises past a tolerance.

Evaluation itself stays the Trainer's job, so it runs distributed, in mixed precision and is reported to every
integration (TensorBoard, W&B, ...) as ``eval_<name>_loss``. Pass the held-out sets as a dict::

    Trainer(..., eval_dataset={"general": general_blocks, "domain": domain_blocks},
            args=TrainingArguments(..., eval_strategy="steps", eval_steps=50, eval_on_start=True),
            callbacks=[ForgettingMonitorCallback(ForgettingMonitorConfig(tolerance=0.05))])
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..registry import Technique, TrainerParts, names
from ..monitoring import TOLERANCE_MODES, compute_forgetting, exceeds_tolerance, tolerance_bound  # noqa: F401
from ..prediction import PredictionConfig, compare_prediction, describe_departure, inside_band, predicted_loss
from ..utils import check_top_k
from ..validation import build_list_item, check_bool, check_choice, check_int, check_name, check_number

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)

ACTIONS = ("warn", "stop", "none")
TOLERANCE_METRICS = ("loss", "kl")
METRICS = ("loss", "kl", "top1_agree")  # what the monitor records per held-out set


@dataclass
class GuardConfig:
    """One bound on forgetting: `metric` on the held-out set `set` may rise at most `tolerance` over its step-0
    value, ``m(t) - m(0) > tolerance`` (absolute) or ``(m(t) - m(0)) / m(0) > tolerance`` (relative) is a breach.

    In YAML, an entry of `monitor.guards`: ``{set: general_self, metric: kl, tolerance: 0.2}``.
    """

    set: str = field(default="general", metadata={"help": "The held-out set guarded (`general`, `general_self`, "
                                                          "...): one the run evaluates."})
    metric: str = field(default="loss", metadata={"help": "`loss` (held-out loss) or `kl` (KL to the base model, "
                                                          "nats; causal LMs with `monitor.kl`)."})
    tolerance: float = field(default=0.05, metadata={"help": "Largest allowed rise of `metric` over its step-0 "
                                                             "value."})
    mode: str | None = field(default=None, metadata={"help": "`relative` (fraction of the step-0 value) or "
                                                             "`absolute`; default: absolute for kl, relative for "
                                                             "loss."})
    action: str | None = field(default=None, metadata={"help": "On a breach of this guard: `warn`, `stop` or "
                                                               "`none`; default: `monitor.action`."})

    def __post_init__(self) -> None:
        check_name("set", self.set)
        check_choice("metric", self.metric, TOLERANCE_METRICS)
        self.tolerance = check_number("tolerance", self.tolerance, 0.0)
        if self.mode is None:  # resolved here, so the saved recipe says which rule ran
            self.mode = "absolute" if self.metric == "kl" else "relative"
        check_choice("mode", self.mode, TOLERANCE_MODES)
        if self.metric == "kl" and self.mode != "absolute":
            raise ValueError("`mode` is relative but `metric` kl starts at 0 at step 0, so a relative tolerance "
                             "means nothing: set `mode: absolute` (nats of KL)")
        if self.action is not None:
            check_choice("action", self.action, ACTIONS)

    @property
    def key(self) -> str:
        """The history key it watches: ``<set>_<metric>``."""
        return f"{self.set}_{self.metric}"


# the single-guard shorthand: its fields and their defaults (one guard on `general`)
_SHORTHAND = {"tolerance": 0.05, "tolerance_mode": "relative", "tolerance_metric": "loss"}


@dataclass
class ForgettingMonitorConfig:
    """Settings of the forgetting monitor.

    It guards one or more held-out sets (`guards`), each with its own metric and tolerance; without `guards`,
    the `tolerance*` fields describe one guard on `general`. A guard on metric m *breaches* at step t when
    ``m(t) - m(0) > tolerance`` (absolute mode) or ``(m(t) - m(0)) / m(0) > tolerance`` (relative mode).
    """

    general: str = field(default="general", metadata={"help": "Name of the general (upstream) held-out set."})
    domain: str = field(default="domain", metadata={"help": "Name of the domain (downstream) held-out set."})
    tolerance: float | None = field(
        default=0.05, metadata={"help": "One guard on `general`: the largest allowed rise of its `tolerance_metric` "
                                        "over its step-0 value (null with `guards`)."}
    )
    tolerance_mode: str | None = field(
        default="relative", metadata={"help": "`relative` (fraction of the step-0 value) or `absolute` (nats); "
                                              "null with `guards`."}
    )
    action: str = field(
        default="warn", metadata={"help": "On a breach: `warn` (log a warning), `stop` (end training), `none`; a "
                                          "guard's own `action` wins."}
    )
    evaluate_at_end: bool = field(
        default=True, metadata={"help": "Also evaluate after the last step when it is not an evaluation step."}
    )
    tolerance_metric: str | None = field(
        default="loss", metadata={"help": "What the one guard watches on `general`: `loss` (held-out loss) or "
                                          "`kl` (KL to the base model, nats; needs `tolerance_mode: absolute`); null "
                                          "with `guards`."}
    )
    guards: list[GuardConfig] = field(
        default_factory=list, metadata={"help": "Several guards, each `{set, metric, tolerance, mode, action}` on "
                                                "its own held-out set; they replace `tolerance`, `tolerance_mode` "
                                                "and `tolerance_metric`."}
    )
    kl: bool = field(
        default=True, metadata={"help": "Measure KL(base || model) and top-1 agreement with the base model on the "
                                        "general held-out sets (causal LMs; base top-k stored once at step 0)."}
    )
    kl_top_k: int = field(
        default=64, metadata={"help": "Base log-probs kept per token for the KL estimate (a lower bound; exact when "
                                      "= vocabulary size)."}
    )
    prediction: PredictionConfig | None = field(
        default=None, metadata={"help": "Predicted general and domain loss per evaluation step with a band (written "
                                        "by `hf-cpt plan --write-config`): every evaluation is compared with it, "
                                        "and the run warns once when a measurement leaves the band."}
    )

    def __post_init__(self) -> None:
        check_name("general", self.general)
        check_name("domain", self.domain)
        if self.general == self.domain:
            raise ValueError(f"`general` and `domain` must differ, both are {self.general!r}")
        check_choice("action", self.action, ACTIONS)
        check_bool("evaluate_at_end", self.evaluate_at_end)
        check_bool("kl", self.kl)
        check_int("kl_top_k", self.kl_top_k)
        if isinstance(self.prediction, dict):  # a checkpoint's `state()` holds plain data
            self.prediction = PredictionConfig(**self.prediction)
        elif self.prediction is not None and not isinstance(self.prediction, PredictionConfig):
            raise ValueError(f"`prediction` must be a mapping (written by `hf-cpt plan --write-config`), got "
                             f"{self.prediction!r}")
        self.guards = [_as_guard(g, i) for i, g in enumerate(self.guards or [])]
        if self.guards:
            given = [k for k, default in _SHORTHAND.items() if getattr(self, k) not in (None, default)]
            if given:
                raise ValueError(f"`{given[0]}` is set next to `guards`, which replace it: move it into a guard "
                                 "(`guards: [{set: ..., metric: ..., tolerance: ...}]`)")
            seen = set()
            for i, g in enumerate(self.guards):
                if g.key in seen:
                    raise ValueError(f"`guards[{i}]` repeats the guard on {g.metric} of {g.set!r}: one bound per "
                                     "set and metric")
                seen.add(g.key)
            # the shorthand is not what runs: the saved recipe says null rather than its unused defaults
            self.tolerance = self.tolerance_mode = self.tolerance_metric = None
            return
        for k, default in _SHORTHAND.items():
            if getattr(self, k) is None:
                setattr(self, k, default)
        self.tolerance = check_number("tolerance", self.tolerance, 0.0)
        check_choice("tolerance_mode", self.tolerance_mode, TOLERANCE_MODES)
        check_choice("tolerance_metric", self.tolerance_metric, TOLERANCE_METRICS)
        if self.tolerance_metric == "kl" and self.tolerance_mode != "absolute":
            raise ValueError("`tolerance_metric` kl starts at 0 at step 0, so a relative tolerance means nothing: set "
                             "`tolerance_mode: absolute` (nats of KL)")

    @property
    def active_guards(self) -> list[GuardConfig]:
        """The guards that run: `guards`, or the one the `tolerance*` fields describe on `general`."""
        if self.guards:
            return list(self.guards)
        return [GuardConfig(set=self.general, metric=self.tolerance_metric, tolerance=self.tolerance,
                            mode=self.tolerance_mode)]


def _as_guard(g: GuardConfig | dict, i: int) -> GuardConfig:
    """A guard from YAML data or a checkpoint's state, with errors naming `guards[i].field`."""
    return build_list_item(GuardConfig, g, f"guards[{i}]",
                           "a mapping like {set: general_self, metric: kl, tolerance: 0.2}")


def act_on_breach(action: str, message: str, state: Any, control: Any) -> None:
    """What every tolerance guard does on a breach: `warn` logs `message` (main process), `stop` also ends
    training (`control.should_training_stop`), `none` does nothing."""
    if action == "stop":
        if state.is_world_process_zero:
            logger.warning("%s: stopping training", message)
        control.should_training_stop = True
    elif action == "warn" and state.is_world_process_zero:
        logger.warning(message)


class ForgettingMonitorCallback(TrainerCallback, ExportableState):
    """Records general vs domain held-out loss over training and guards one or more held-out sets, each on its
    loss or its KL to the base (see [`ForgettingMonitorConfig`] `guards`).

    Reads ``eval_<set>_loss`` (and ``eval_<set>_kl`` / ``eval_<set>_top1_agree`` from [`KLToBaseCallback`]) for
    every held-out set from the Trainer's evaluation metrics. With `prediction` (a planned run's predicted losses,
    [`hf_cpt.prediction.PredictionConfig`]) it compares the general and domain loss of every evaluation with their
    predicted band (`summary()["prediction"]`) and warns once, at the first measurement outside it. Its history
    is saved with Trainer checkpoints (restored with ``restore_callback_states_from_checkpoint=True``).

    Args:
        config: a [`ForgettingMonitorConfig`]; keyword arguments build one when omitted.
    """

    def __init__(self, config: ForgettingMonitorConfig | dict | None = None, **kwargs: Any) -> None:
        # a dict arrives when the Trainer rebuilds the callback from a checkpoint's `state()`
        if isinstance(config, dict):
            config = ForgettingMonitorConfig(**config)
        self.config = config if config is not None else ForgettingMonitorConfig(**kwargs)
        self.guards = self.config.active_guards
        self.history: list[dict[str, float]] = []
        self.breach_steps: list[int | None] = [None] * len(self.guards)  # per guard: its first breach
        self._checked: list[int | None] = [None] * len(self.guards)  # per guard: the step last checked
        self.prediction_warned = False  # `monitor.prediction`: the one warning, once per run (kept on resume)
        self._predicted: dict[str, int] = {}  # per set role: the step last compared with the prediction

    @property
    def breach_step(self) -> int | None:
        """The first step any guard was breached (None: none was)."""
        return min((s for s in self.breach_steps if s is not None), default=None)

    @breach_step.setter
    def breach_step(self, step: int | None) -> None:  # a checkpoint written before guards were a list
        self.breach_steps = [step] + [None] * (len(self.guards) - 1)

    # --- checkpoint state -------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "args": {"config": asdict(self.config)},
            "attributes": {"history": [dict(r) for r in self.history], "breach_steps": list(self.breach_steps),
                           "prediction_warned": self.prediction_warned},
        }

    # --- hooks -----------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "eval_strategy", "no") in ("no", None):  # IntervalStrategy is a str enum: "no" matches
            raise ValueError(
                "ForgettingMonitorCallback needs evaluation: set `eval_strategy='steps'` (and `eval_steps`) in "
                "TrainingArguments and pass `eval_dataset` as a dict with keys "
                f"{self.config.general!r} and {self.config.domain!r}"
            )
        if not self.history and not args.eval_on_start:
            raise ValueError(
                "ForgettingMonitorCallback measures forgetting against step 0: set `eval_on_start=True` in "
                "TrainingArguments"
            )
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics:
            return control
        step = int(state.global_step)
        record = self.history[-1] if self.history and self.history[-1]["step"] == step else None
        found = False
        for key, value in metrics.items():
            # eval_<set>_<metric> for every held-out set (general, domain, general_self, ...)
            metric = next((m for m in METRICS if key.endswith(f"_{m}")), None)
            if metric is None or not key.startswith("eval_"):
                continue
            if record is None:
                record = {"step": step}
                self.history.append(record)
            record[key[len("eval_"):]] = float(value)
            found = True
        if found:
            # the Trainer evaluates a dict of sets one by one: each guard is checked once, when its value arrives
            for i, guard in enumerate(self.guards):
                if guard.key in record and self._checked[i] != step:
                    self._checked[i] = step
                    self._check(i, record, state, control)
            if self.config.prediction is not None:
                self._check_prediction(record, state)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        last = self.history[-1]["step"] if self.history else -1
        if self.config.evaluate_at_end and state.global_step >= state.max_steps and last != state.global_step:
            control.should_evaluate = True
        return control

    # --- core ------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Forgetting numbers of the run so far (see [`compute_forgetting`]), per guard its bound and whether it
        was breached (`guards`, one entry per guard, described by `describe_guard`), and over all guards
        `tolerance_breached` / `breach_step` (the first)."""
        out: dict[str, Any] = compute_forgetting(self.history, self.config.general, self.config.domain)
        out["guards"] = [self._guard_summary(i) for i in range(len(self.guards))]
        out.update(tolerance_breached=self.breach_step is not None, breach_step=self.breach_step)
        if self.config.prediction is not None:  # predicted vs measured at every evaluation
            out["prediction"] = compare_prediction(self.history, self.config.prediction, self.config.general,
                                                   self.config.domain)
        return out

    def _guard_summary(self, i: int) -> dict[str, Any]:
        g = self.guards[i]
        values = [r[g.key] for r in self.history if g.key in r]
        return dict(
            guarded_set=g.set,  # the bound applies to this set's `tolerance_metric` only
            tolerance_metric=g.metric,
            tolerance=g.tolerance,
            tolerance_mode=g.mode,
            action=g.action or self.config.action,
            start=values[0] if values else None,
            end=values[-1] if values else None,
            tolerance_bound=tolerance_bound(values[0], g.tolerance, g.mode) if values else None,
            tolerance_breached=self.breach_steps[i] is not None,
            breach_step=self.breach_steps[i],
        )

    def _check(self, i: int, record: dict[str, float], state, control) -> None:
        g = self.guards[i]
        baseline = next(r[g.key] for r in self.history if g.key in r)
        if not exceeds_tolerance(baseline, record[g.key], g.tolerance, g.mode):
            return
        if self.breach_steps[i] is None:
            self.breach_steps[i] = record["step"]
        action = g.action or self.config.action
        if action == "none":
            return
        what = "loss" if g.metric == "loss" else "KL to the base model"
        msg = (f"held-out {what} on {g.set!r} rose from {baseline:.4f} to {record[g.key]:.4f} at step "
               f"{record['step']}, past the {g.mode} tolerance {g.tolerance}")
        act_on_breach(action, msg, state, control)

    def _check_prediction(self, record: dict[str, float], state) -> None:
        # each set once per step, when its value arrives; one warning per run, at the first departure
        step = record["step"]
        for role, name in (("general", self.config.general), ("domain", self.config.domain)):
            measured = record.get(f"{name}_loss")
            if measured is None or self._predicted.get(role) == step:
                continue
            self._predicted[role] = step
            predicted = predicted_loss(self.config.prediction, role, step)
            if predicted is None or inside_band(measured, *predicted[1:]) or self.prediction_warned:
                continue
            self.prediction_warned = True
            if state.is_world_process_zero:
                logger.warning(describe_departure({"role": role, "set": name, "step": step, "measured": measured,
                                                   "predicted": predicted[0], "lo": predicted[1],
                                                   "hi": predicted[2]}))


# --- registry entry ---------------------------------------------------------------------------------------------------
# The monitor itself is the recipe's measurement and always runs (`build_trainer` puts it first); the entry adds
# what `monitor.kl` asks for: the KL to the base model on the general held-out sets of a causal run.
def _kl_enabled(cfg: CPTConfig) -> bool:
    return cfg.objective == "clm" and cfg.monitor.kl


def _check(cfg: CPTConfig) -> None:
    # a KL guard needs the KL measured, on a set it is measured on: never a guard that silently never runs
    for i, guard in enumerate(cfg.monitor.active_guards):
        if guard.metric != "kl":
            continue
        where = f"monitor.guards[{i}]" if cfg.monitor.guards else "monitor.tolerance_metric"
        if not _kl_enabled(cfg):
            raise ValueError(f"`{where}` guards the KL to the base, which this run does not measure "
                             + ("(`objective: mlm`)" if cfg.objective != "clm" else "(`monitor.kl: false`)")
                             + ": guard the loss (`metric: loss`) or set `monitor.kl: true`")
        if guard.set == cfg.monitor.domain or cfg.data.held_out_kinds().get(guard.set) == "domain":
            raise ValueError(f"`{where}` guards the KL on the domain set {guard.set!r}; the KL to the base is "
                             "measured on the general sets only")


def _config_preflight(cfg: CPTConfig, model_config: Any, tokenizer: Any) -> None:
    check_top_k("monitor.kl_top_k", cfg.monitor.kl_top_k, model_config)  # before the weights load


def _preflight(cfg: CPTConfig, model: Any, args: Any) -> None:
    check_top_k("monitor.kl_top_k", cfg.monitor.kl_top_k, model)  # again: `vocab:` may have changed the rows


def _setup(parts: TrainerParts) -> Any:
    from .kl_to_base import KLToBaseCallback, attach_kl_to_base

    cfg = parts.cfg
    kinds = cfg.general_sets()  # every held-out set of kind general (`data.eval_sets` names its kind)
    general = {n: s for n, s in parts.data.eval_sets.items() if n in kinds}
    kl = KLToBaseCallback(general, top_k=cfg.monitor.kl_top_k, batch_size=cfg.train.per_device_eval_batch_size)
    kl.compute_targets(parts.model)  # before any update: a resumed run recomputes them from the reloaded base
    return lambda trainer: attach_kl_to_base(trainer, kl)


TECHNIQUE = Technique(
    name="forgetting monitor",
    key="monitor",
    config=ForgettingMonitorConfig,
    exports={**names("callbacks.forgetting", "ForgettingMonitorConfig", "ForgettingMonitorCallback", "GuardConfig"),
             "plot_forgetting": "plotting", **names("callbacks.kl_to_base", "KLToBaseCallback", "attach_kl_to_base"),
             **names("base_targets", "compute_base_targets", "evaluate_kl")},
    functional=names("monitoring", "compute_forgetting", "exceeds_tolerance", "tolerance_bound"),
    enabled=_kl_enabled,
    check=_check,
    config_preflight=_config_preflight,
    preflight=_preflight,
    setup=_setup,
)
