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
from ..utils import check_top_k
from ..validation import check_bool, check_choice, check_int, check_name, check_number

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)

ACTIONS = ("warn", "stop", "none")
TOLERANCE_METRICS = ("loss", "kl")
METRICS = ("loss", "kl", "top1_agree")  # what the monitor records per held-out set


@dataclass
class ForgettingMonitorConfig:
    """Settings of the forgetting monitor.

    The general loss *breaches* the tolerance at step t when
    ``L_general(t) - L_general(0) > tolerance`` (absolute mode) or
    ``(L_general(t) - L_general(0)) / L_general(0) > tolerance`` (relative mode).
    """

    general: str = field(default="general", metadata={"help": "Name of the general (upstream) held-out set."})
    domain: str = field(default="domain", metadata={"help": "Name of the domain (downstream) held-out set."})
    tolerance: float = field(
        default=0.05, metadata={"help": "Largest allowed rise of the general held-out loss over its step-0 value."}
    )
    tolerance_mode: str = field(
        default="relative", metadata={"help": "`relative` (fraction of the step-0 loss) or `absolute` (nats)."}
    )
    action: str = field(
        default="warn", metadata={"help": "On a breach: `warn` (log a warning), `stop` (end training), `none`."}
    )
    evaluate_at_end: bool = field(
        default=True, metadata={"help": "Also evaluate after the last step when it is not an evaluation step."}
    )
    tolerance_metric: str = field(
        default="loss", metadata={"help": "What the tolerance guards on the general set: `loss` (held-out loss) or "
                                          "`kl` (KL to the base model, nats; needs `tolerance_mode: absolute`)."}
    )
    kl: bool = field(
        default=True, metadata={"help": "Measure KL(base || model) and top-1 agreement with the base model on the "
                                        "general held-out sets (causal LMs; base top-k stored once at step 0)."}
    )
    kl_top_k: int = field(
        default=64, metadata={"help": "Base log-probs kept per token for the KL estimate (a lower bound; exact when "
                                      "= vocabulary size)."}
    )

    def __post_init__(self) -> None:
        check_name("general", self.general)
        check_name("domain", self.domain)
        if self.general == self.domain:
            raise ValueError(f"`general` and `domain` must differ, both are {self.general!r}")
        self.tolerance = check_number("tolerance", self.tolerance, 0.0)
        check_choice("tolerance_mode", self.tolerance_mode, TOLERANCE_MODES)
        check_choice("action", self.action, ACTIONS)
        check_bool("evaluate_at_end", self.evaluate_at_end)
        check_choice("tolerance_metric", self.tolerance_metric, TOLERANCE_METRICS)
        if self.tolerance_metric == "kl" and self.tolerance_mode != "absolute":
            raise ValueError("`tolerance_metric` kl starts at 0 at step 0, so a relative tolerance means nothing: set "
                             "`tolerance_mode: absolute` (nats of KL)")
        check_bool("kl", self.kl)
        check_int("kl_top_k", self.kl_top_k)




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
    """Records general vs domain held-out loss over training and guards the general loss (or KL to the base).

    Reads ``eval_<set>_loss`` (and ``eval_<set>_kl`` / ``eval_<set>_top1_agree`` from [`KLToBaseCallback`]) for
    every held-out set from the Trainer's evaluation metrics. Its history is saved with Trainer checkpoints
    (restored with ``restore_callback_states_from_checkpoint=True``).

    Args:
        config: a [`ForgettingMonitorConfig`]; keyword arguments build one when omitted.
    """

    def __init__(self, config: ForgettingMonitorConfig | dict | None = None, **kwargs: Any) -> None:
        # a dict arrives when the Trainer rebuilds the callback from a checkpoint's `state()`
        if isinstance(config, dict):
            config = ForgettingMonitorConfig(**config)
        self.config = config if config is not None else ForgettingMonitorConfig(**kwargs)
        self.history: list[dict[str, float]] = []
        self.breach_step: int | None = None

    # --- checkpoint state -------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "args": {"config": asdict(self.config)},
            "attributes": {"history": [dict(r) for r in self.history], "breach_step": self.breach_step},
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
        key = f"{self.config.general}_{self.config.tolerance_metric}"
        if found and key in record:
            self._check(record, state, control)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        last = self.history[-1]["step"] if self.history else -1
        if self.config.evaluate_at_end and state.global_step >= state.max_steps and last != state.global_step:
            control.should_evaluate = True
        return control

    # --- core ------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Forgetting numbers of the run so far (see [`compute_forgetting`]) plus breach information."""
        out: dict[str, Any] = compute_forgetting(self.history, self.config.general, self.config.domain)
        c = self.config
        key = f"{c.general}_{c.tolerance_metric}"
        baseline = next((r[key] for r in self.history if key in r), None)
        out.update(
            tolerance=c.tolerance,
            tolerance_mode=c.tolerance_mode,
            guarded_set=c.general,  # the bound applies to this set's `tolerance_metric` only
            tolerance_metric=c.tolerance_metric,
            tolerance_bound=None if baseline is None else tolerance_bound(baseline, c.tolerance, c.tolerance_mode),
            tolerance_breached=self.breach_step is not None,
            breach_step=self.breach_step,
        )
        return out

    def _check(self, record: dict[str, float], state, control) -> None:
        key = f"{self.config.general}_{self.config.tolerance_metric}"
        baseline = next(r[key] for r in self.history if key in r)
        if not exceeds_tolerance(baseline, record[key], self.config.tolerance, self.config.tolerance_mode):
            return
        if self.breach_step is None:
            self.breach_step = record["step"]
        if self.config.action == "none":
            return
        what = "loss" if self.config.tolerance_metric == "loss" else "KL to the base model"
        msg = (
            f"general held-out {what} rose from {baseline:.4f} to {record[key]:.4f} at step {record['step']}, past "
            f"the {self.config.tolerance_mode} tolerance {self.config.tolerance}"
        )
        act_on_breach(self.config.action, msg, state, control)


# --- registry entry ---------------------------------------------------------------------------------------------------
# The monitor itself is the recipe's measurement and always runs (`build_trainer` puts it first); the entry adds
# what `monitor.kl` asks for: the KL to the base model on the general held-out sets of a causal run.
def _kl_enabled(cfg: CPTConfig) -> bool:
    return cfg.objective == "clm" and cfg.monitor.kl


def _preflight(cfg: CPTConfig, model: Any, args: Any) -> None:
    check_top_k("monitor.kl_top_k", cfg.monitor.kl_top_k, model)


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
    exports={**names("callbacks.forgetting", "ForgettingMonitorConfig", "ForgettingMonitorCallback"),
             "plot_forgetting": "plotting", **names("callbacks.kl_to_base", "KLToBaseCallback", "attach_kl_to_base"),
             **names("base_targets", "compute_base_targets", "evaluate_kl")},
    functional=names("monitoring", "compute_forgetting", "exceeds_tolerance", "tolerance_bound"),
    enabled=_kl_enabled,
    preflight=_preflight,
    setup=_setup,
)
