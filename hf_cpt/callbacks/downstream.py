"""Downstream evaluation during continual pretraining: lm-evaluation-harness scores next to the held-out losses.

Benchmark scores before and after (HellaSwag, ARC, MMLU, ... or the offline tasks hf-cpt ships) are what CPT
papers judge forgetting by. This callback runs lm-eval tasks on the *live* model (no reload, no second copy;
see `hf_cpt.evaluation.evaluate_tasks`) together with the Trainer's own evaluation: at step 0
(`eval_on_start=True`), every `every_n_evals`-th evaluation, and at the end. It adds
``eval_downstream/<task>/<metric>`` to the same log record as the held-out losses, so `state.log_history`,
`trainer.evaluate()`'s metrics and every reporting integration (TensorBoard, W&B, ...) see them, and it guards
one metric against a drop like the forgetting monitor guards the general loss::

    cb = DownstreamEvalCallback(DownstreamConfig(tasks=["hf_cpt_python_docs_mc", "hf_cpt_kjv_mc"], limit=50,
                                                 tolerance_metric="hf_cpt_kjv_mc/acc", tolerance=0.05))
    trainer = Trainer(..., args=TrainingArguments(..., eval_strategy="steps", eval_on_start=True))
    attach_downstream_eval(trainer, cb)   # ahead of the reporting integrations

Multi-process runs (DDP): rank 0 evaluates the whole task list on its replica (the weights are identical on
every rank), the other ranks wait for its result, which is broadcast so every rank logs the same numbers and
takes the same stop decision. Sharded models (FSDP, DeepSpeed ZeRO-3) are refused at the start: no single rank
holds the weights; evaluate the saved checkpoint with `hf-cpt eval` instead.

Resumable without being an `ExportableState`: its history is the ``eval_downstream/...`` entries of
`state.log_history`, which the Trainer saves with every checkpoint; it is rebuilt from there at
`on_train_begin`. (A restored stateful callback would be re-added behind the reporting integrations.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from ..registry import Technique, TrainerParts, names
from ..utils import get_processing_class, is_sharded_model, unwrap_model
from ..validation import check_choice, check_int, check_name, check_number
from ..monitoring import downstream_breached, summarize_downstream  # noqa: F401  (the pure cores)
from .forgetting import ACTIONS, TOLERANCE_MODES, act_on_breach

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)

LOG_PREFIX = "eval_downstream/"


@dataclass
class DownstreamConfig:
    """Settings of downstream (lm-eval) evaluation during training.

    A tolerance guards one metric, ``<task>/<metric>``: for a higher-is-better metric (accuracy) it *breaches*
    when ``m(t) < m(0) - (bound - m(0))`` with ``bound = tolerance_bound(m(0), tolerance, mode)``, i.e. a drop
    of more than `tolerance` (absolute points) or more than `tolerance` x m(0) (relative); for a lower-is-better
    metric (perplexity) when ``m(t) > bound``.
    """

    tasks: list[str] = field(
        default_factory=list, metadata={"help": "lm-eval task, group or tag names, e.g. [hf_cpt_python_docs_mc, "
                                                "hf_cpt_kjv_mc] (shipped, offline) or [hellaswag, arc_easy]."})
    include_path: str | None = field(
        default=None, metadata={"help": "A directory of your own lm-eval task YAMLs (searched with lm-eval's tasks "
                                        "and hf-cpt's offline ones)."})
    limit: int | None = field(
        default=None, metadata={"help": "At most this many documents per task (the first ones): keeps each "
                                        "evaluation short. None: all."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples; None: each task's default."})
    batch_size: int = field(default=8, metadata={"help": "Requests per forward pass of the evaluation."})
    every_n_evals: int = field(
        default=1, metadata={"help": "Run with every N-th held-out evaluation (always at step 0 and at the end)."})
    metrics: list[str] = field(
        default_factory=list, metadata={"help": "Metric names to record, e.g. [acc_norm]; empty: every metric the "
                                                "tasks report."})
    tolerance_metric: str | None = field(
        default=None, metadata={"help": "`<task>/<metric>` guarded against a drop, e.g. `hf_cpt_kjv_mc/acc`; "
                                        "needs `tolerance`."})
    tolerance: float | None = field(
        default=None, metadata={"help": "Largest allowed drop of `tolerance_metric` from its step-0 value."})
    tolerance_mode: str = field(
        default="absolute", metadata={"help": "`absolute` (metric units, e.g. 0.05 = 5 accuracy points) or "
                                              "`relative` (fraction of the step-0 value)."})
    action: str = field(
        default="warn", metadata={"help": "On a breach: `warn` (log a warning), `stop` (end training), `none`."})

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if not isinstance(self.tasks, list) or not self.tasks:
            raise ValueError("`tasks` must name at least one lm-eval task, e.g. [hf_cpt_python_docs_mc, "
                             "hf_cpt_kjv_mc] (shipped, offline) or [hellaswag]")
        for i, name in enumerate(self.tasks):
            check_name(f"tasks[{i}]", name)
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"`tasks` names a task twice: {self.tasks}")
        if self.include_path is not None:
            check_name("include_path", self.include_path)
        if self.limit is not None:
            check_int("limit", self.limit)
        if self.num_fewshot is not None:
            check_int("num_fewshot", self.num_fewshot, minimum=0)
        check_int("batch_size", self.batch_size)
        check_int("every_n_evals", self.every_n_evals)
        if isinstance(self.metrics, str):
            self.metrics = [self.metrics]
        for i, name in enumerate(self.metrics):
            check_name(f"metrics[{i}]", name)
        check_choice("tolerance_mode", self.tolerance_mode, TOLERANCE_MODES)
        check_choice("action", self.action, ACTIONS)
        if (self.tolerance is None) != (self.tolerance_metric is None):
            raise ValueError("`tolerance` and `tolerance_metric` go together: set both (e.g. `tolerance_metric: "
                             "hf_cpt_kjv_mc/acc`, `tolerance: 0.05`) or neither")
        if self.tolerance is not None:
            self.tolerance = check_number("tolerance", self.tolerance, 0.0)
            check_name("tolerance_metric", self.tolerance_metric)
            metric = self.tolerance_metric.partition("/")[2].split("/", 1)[0]
            if "/" not in self.tolerance_metric or not metric:
                raise ValueError(f"`tolerance_metric` must be `<task>/<metric>`, e.g. `hf_cpt_kjv_mc/acc`, got "
                                 f"{self.tolerance_metric!r}")
            if self.metrics and metric not in self.metrics:
                raise ValueError(f"`tolerance_metric` {self.tolerance_metric!r} guards {metric!r}, which `metrics` "
                                 f"({self.metrics}) leaves out: add it to `metrics`")

    def check(self) -> None:
        """The checks that need lm-eval's task index (cheap: no dataset, no model): the task names, `metrics`,
        `tolerance_metric` and `include_path`. Run before training starts.

        Raises:
            ImportError: lm-eval is not installed (names the `eval` extra). FileNotFoundError: `include_path` is
            not a directory. ValueError: an unknown task (close names listed) or a metric no task reports.
        """
        from ..evaluation import check_metric_key, check_tasks

        check_tasks(self.tasks, self.include_path, self.metrics)
        if self.tolerance_metric is not None:
            check_metric_key(self.tolerance_metric, self.tasks, self.include_path)


# lm-eval computes no standard error at all with 0; with > 0, mean metrics (`acc`, ...) get their closed form at no
# cost and the few bootstrapped ones (perplexity, F1, BLEU, ...) this many resamples
BOOTSTRAP_ITERS = 100


class DownstreamEvalCallback(TrainerCallback):
    """Runs lm-eval tasks on the live model with the Trainer's evaluations and logs ``eval_downstream/...``.

    Needs `eval_strategy` other than "no" and `eval_on_start=True` (the step-0 baseline), like
    [`ForgettingMonitorCallback`]. Add it with [`attach_downstream_eval`] so the integrations report its metrics.

    Args:
        config: a [`DownstreamConfig`]; keyword arguments build one when omitted. Task names and metrics are
            checked against lm-eval's task index here (before training).
    """

    def __init__(self, config: DownstreamConfig | dict | None = None, **kwargs: Any) -> None:
        if isinstance(config, dict):
            config = DownstreamConfig(**config)
        self.config = config if config is not None else DownstreamConfig(**kwargs)
        self.config.check()
        self.history: list[dict[str, float]] = []
        self.higher_is_better: dict[str, bool] = {}
        self.breach_step: int | None = None
        self._rounds = 0  # held-out evaluations seen (a round may log once per held-out set)
        self._last_round_step: int | None = None

    # --- hooks -----------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "eval_strategy", "no") in ("no", None):
            raise ValueError("DownstreamEvalCallback runs with the Trainer's evaluations: set "
                             "`eval_strategy='steps'` (and `eval_steps`) and pass an `eval_dataset`")
        if model is not None and is_sharded_model(unwrap_model(model)):
            raise ValueError("downstream evaluation needs the whole model on one process, and FSDP / DeepSpeed "
                             "ZeRO-3 shard it: train with DDP or ZeRO-2, or remove `downstream` and evaluate the "
                             "saved checkpoint with `hf-cpt eval`")
        self._restore(state)
        if not self.history and not args.eval_on_start:
            raise ValueError("DownstreamEvalCallback measures against step 0: set `eval_on_start=True` in "
                             "TrainingArguments")
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and self._last_round_step != state.global_step:
            control.should_evaluate = True  # the end is always evaluated
        return control

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or model is None or not any(k.startswith("eval_") and k.endswith("_loss") for k in logs):
            return control
        step = int(state.global_step)
        if self._last_round_step == step:  # the same evaluation, another held-out set
            return control
        self._last_round_step = step
        round_index, self._rounds = self._rounds, self._rounds + 1
        done = self.history and self.history[-1]["step"] == step  # e.g. the resume step, evaluated before
        if done or (round_index % self.config.every_n_evals and step < state.max_steps):
            return control
        scores = self._evaluate(args, state, unwrap_model(model), get_processing_class(kwargs))
        logged = {LOG_PREFIX + k: v for k, v in scores.items() if "_stderr" not in k}
        logs.update(logged)  # the dict the integrations and the forgetting monitor read next
        if state.log_history and any(k in state.log_history[-1] for k in logs if k.startswith("eval_")):
            state.log_history[-1].update(logged)  # the Trainer appended a copy just before this hook
        self.history.append({"step": step, **scores})
        self._check(self.history[-1], state, control)
        return control

    # --- core ------------------------------------------------------------------------------------------------
    def evaluate(self, model: Any, tokenizer: Any) -> dict[str, float]:
        """``{"<task>/<metric>": value}`` of the configured tasks on `model` now (one process)."""
        from ..evaluation import evaluate_tasks, flatten_results, higher_is_better

        c = self.config
        results = evaluate_tasks(model, tokenizer, c.tasks, include_path=c.include_path, limit=c.limit,
                                 num_fewshot=c.num_fewshot, batch_size=c.batch_size, bootstrap_iters=BOOTSTRAP_ITERS)
        self.higher_is_better.update(higher_is_better(results))
        scores = flatten_results(results, c.metrics)
        missing = [m for m in c.metrics if not any(k.split("/")[1] == m for k in scores)]
        if missing:
            raise ValueError(f"`metrics`: the tasks {c.tasks} reported no {missing}; they report "
                             f"{sorted({k.split('/')[1] for k in flatten_results(results)})}")
        if c.tolerance_metric is not None and c.tolerance_metric not in scores:
            raise ValueError(f"`tolerance_metric` {c.tolerance_metric!r} is not among the reported metrics: "
                             f"{sorted(scores)}")
        return scores

    def _evaluate(self, args, state, model, tokenizer) -> dict[str, float]:
        if args.world_size <= 1:
            return self.evaluate(model, tokenizer)
        import torch.distributed as dist

        # rank 0 evaluates, the others wait in the broadcast; an error travels too, so no rank hangs
        box: list[Any] = [None]
        if state.is_world_process_zero:
            try:
                box[0] = ("ok", self.evaluate(model, tokenizer), self.higher_is_better)
            except Exception as e:  # re-raised below on every rank
                box[0] = ("error", f"{type(e).__name__}: {e}", None)
        dist.broadcast_object_list(box, src=0)
        status, payload, flags = box[0]
        if status == "error":
            raise RuntimeError(f"downstream evaluation failed on rank 0: {payload}")
        self.higher_is_better.update(flags)
        return payload

    def _restore(self, state) -> None:
        """Rebuild the history from `state.log_history` (a resumed run) and replay the tolerance check."""
        if self.history:
            return
        for record in state.log_history:
            scores = {k[len(LOG_PREFIX):]: v for k, v in record.items() if k.startswith(LOG_PREFIX)}
            if scores:
                self.history.append({"step": int(record.get("step", 0)), **scores})
        steps = {int(r["step"]) for r in state.log_history if any(k.startswith("eval_") and k.endswith("_loss")
                                                                  for k in r)}
        self._rounds = len(steps)
        self._last_round_step = max(steps) if steps else None
        for record in self.history:
            if self.breach_step is None and self._breached(record):
                self.breach_step = record["step"]

    def _breached(self, record: dict[str, float]) -> bool:
        key = self.config.tolerance_metric
        if key is None or key not in record:
            return False
        baseline = next(r[key] for r in self.history if key in r)
        direction = self.higher_is_better.get("/".join(key.split("/")[:2]), True)
        return downstream_breached(baseline, record[key], self.config.tolerance, self.config.tolerance_mode,
                                   direction)

    def _check(self, record: dict[str, float], state, control) -> None:
        if not self._breached(record):
            return
        if self.breach_step is None:
            self.breach_step = record["step"]
        if self.config.action == "none":
            return
        key = self.config.tolerance_metric
        baseline = next(r[key] for r in self.history if key in r)
        msg = (f"downstream {key} moved from {baseline:.4f} to {record[key]:.4f} at step {record['step']}, past the "
               f"{self.config.tolerance_mode} tolerance {self.config.tolerance}")
        act_on_breach(self.config.action, msg, state, control)

    def summary(self) -> dict[str, Any]:
        """Before/after numbers for metrics.json and the model card: the settings, the history, start/end/delta
        per ``<task>/<metric>``, and breach information."""
        c = self.config
        return {
            "tasks": list(c.tasks), "limit": c.limit, "num_fewshot": c.num_fewshot,
            **summarize_downstream(self.history),
            "higher_is_better": dict(self.higher_is_better),
            "history": [dict(r) for r in self.history],
            "tolerance_metric": c.tolerance_metric, "tolerance": c.tolerance, "tolerance_mode": c.tolerance_mode,
            "tolerance_breached": self.breach_step is not None, "breach_step": self.breach_step,
        }


def attach_downstream_eval(trainer: Any, callback: DownstreamEvalCallback) -> DownstreamEvalCallback:
    """Add `callback` to `trainer` ahead of its reporting integrations, so TensorBoard/W&B/... log its metrics."""
    from ..utils import add_callback_before_integrations

    return add_callback_before_integrations(trainer, callback)


# --- registry entry ---------------------------------------------------------------------------------------------------
def _check(cfg: CPTConfig) -> None:
    if cfg.downstream is not None and cfg.objective != "clm":
        raise ValueError("`downstream`: lm-eval scores causal language models; remove the `downstream` block for "
                         "`objective: mlm`")


def _config_preflight(cfg: CPTConfig, model_config: Any, tokenizer: Any) -> None:
    cfg.downstream.check()  # lm-eval installed, task names and metrics known: before any weights load


def _setup(parts: TrainerParts) -> Any:
    callback = DownstreamEvalCallback(parts.cfg.downstream)
    return lambda trainer: attach_downstream_eval(trainer, callback)


TECHNIQUE = Technique(
    name="downstream evaluation",
    key="downstream",
    config=DownstreamConfig,
    exports={**names("callbacks.downstream", "DownstreamConfig", "DownstreamEvalCallback", "attach_downstream_eval"),
             **names("evaluation", "evaluate_tasks", "check_tasks", "offline_tasks_dir"),
             **names("recipe.evaluate", "compare_models", "EvalComparison")},
    functional={**names("monitoring", "downstream_breached", "summarize_downstream"),
                "flatten_results": "evaluation"},
    check=_check,
    config_preflight=_config_preflight,
    setup=_setup,
)
