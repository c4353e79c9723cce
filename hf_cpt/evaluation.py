"""Downstream evaluation with EleutherAI's lm-evaluation-harness on a model that is already in memory.

[`evaluate_tasks`] wraps the live model and tokenizer in lm-eval's `HFLM` (no reload, no copy of the weights,
no move to another device), runs `lm_eval.simple_evaluate` with the same defaults a standalone run uses (so the
numbers equal `lm_eval --model hf --model_args pretrained=<saved checkpoint>` with the same task, limit, few-shot
and batch size), and flattens the results into ``{"<task>/<metric>": value}``. Around the call it keeps what
training depends on: the model's train/eval mode (per module), the grad mode, and the Python / NumPy / torch RNG
states (lm-eval reseeds them all), and it keeps lm-eval's logging quiet.

Tasks are looked up in lm-eval's own task index plus two kinds of local task directories: the offline tasks
shipped with hf-cpt (`offline_tasks_dir()`: multiple-choice continuation on held-out Python docs, the domain,
and held-out King James Bible text, the general side; built by `scripts/build_tasks.py`), and the user's
`include_path`. Names are checked against that index before any model runs ([`check_tasks`]): an unknown task
lists the close names, a metric a task does not produce lists the ones it does.

lm-eval is an optional dependency (`pip install 'hf-cpt[eval]'`); nothing here imports it at module import.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import random
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import import_utils

OFFLINE_TASKS = ("hf_cpt_python_docs_mc", "hf_cpt_kjv_mc")  # domain, general
# what lm-eval reports when a task's YAML has no `metric_list` (lm_eval.api.registry.DEFAULT_METRIC_REGISTRY)
_DEFAULT_METRICS = {
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "multiple_choice": ("acc", "acc_norm"),
    "generate_until": ("exact_match",),
}


def offline_tasks_dir() -> Path:
    """The directory of the lm-eval task YAMLs (and their JSONL rows) shipped inside hf-cpt."""
    return Path(__file__).resolve().parent / "data" / "tasks"


def load_offline_task(data_file: str, **metadata: Any) -> Any:
    """lm-eval `custom_dataset` hook of the shipped tasks: the rows of `data_file` (a JSONL file next to the task
    YAMLs in [`offline_tasks_dir`]) as a `DatasetDict` with one `test` split. Built in memory: offline, no
    datasets cache. lm-eval passes the task metadata as keyword arguments too; they do not change the rows."""
    from datasets import Dataset, DatasetDict

    path = offline_tasks_dir() / data_file
    if not path.is_file():
        raise FileNotFoundError(f"offline task data {str(path)!r} is missing: rebuild it with "
                                "`python scripts/build_tasks.py` or reinstall hf-cpt")
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def _require_lm_eval(purpose: str) -> None:
    # through the module attribute, so tests can simulate a missing install by patching `is_available`
    if not import_utils.is_lm_eval_available():
        raise import_utils.MissingDependencyError(f"{purpose} needs lm-evaluation-harness (the `lm_eval` package), "
                                                  "which is not installed. Install it with: pip install 'hf-cpt[eval]'")


def _include_paths(include_path: str | Path | None) -> list[str]:
    paths = [str(offline_tasks_dir())]
    if include_path is not None:
        path = Path(include_path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"`include_path` {str(include_path)!r} is not a directory: point it at the "
                                    "folder that holds your lm-eval task YAMLs")
        paths.append(str(path.resolve()))
    return paths


@lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], with_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        return TaskManager(include_path=list(paths), include_defaults=with_defaults)


def get_task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """An lm-eval `TaskManager` that knows `tasks`: only the local task directories (the shipped offline tasks
    and `include_path`, indexed in well under a second) when they hold every name, else lm-eval's full index
    too (~15,000 tasks, a few seconds). Built once per process and set of directories."""
    _require_lm_eval("downstream evaluation")
    paths = tuple(_include_paths(include_path))
    local = _task_manager(paths, False)
    return local if all(t in local.task_index for t in tasks) else _task_manager(paths, True)


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None,
                metrics: Sequence[str] = ()) -> dict[str, list[str]]:
    """Check task names (and metric names) against lm-eval's task index, before any model runs.

    Args:
        tasks: lm-eval task, group or tag names.
        include_path: a directory of the user's own task YAMLs.
        metrics: metric names that must be reported (by at least one of the tasks).

    Returns:
        ``{task: [metric, ...]}``, the metrics each named task (or its subtasks) reports, as far as its YAML
        says (Python-class tasks: not known before they run, so empty).

    Raises:
        ImportError: lm-eval is not installed (names the extra). FileNotFoundError: `include_path` is not a
        directory. ValueError: an unknown task (close names listed) or a metric no task reports.
    """
    if not tasks:
        raise ValueError("`tasks` must name at least one lm-eval task, e.g. "
                         f"[{', '.join(OFFLINE_TASKS)}] (shipped, offline) or [hellaswag, arc_easy]")
    manager = get_task_manager(tasks, include_path)
    index = manager.task_index
    for name in tasks:
        if name not in index:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            raise ValueError(f"`tasks`: unknown lm-eval task {name!r}" + (
                f"; close names: {', '.join(close)}" if close else "") + (
                "" if include_path is None else f" (searched lm-eval's tasks and {str(include_path)!r})"))
    produced = {name: sorted(_task_metrics(name, index, set())) for name in tasks}
    known = {m for ms in produced.values() for m in ms}
    for metric in metrics:
        if metric not in known and all(produced.values()):
            raise ValueError(f"`metrics`: no task in {list(tasks)} reports {metric!r}; they report: "
                             f"{', '.join(sorted(known))}")
    return produced


def check_metric_key(key: str, tasks: Sequence[str], include_path: str | Path | None = None,
                     field: str = "tolerance_metric") -> None:
    """Check that ``"<task>/<metric>"`` names a metric one of `tasks` (or one of their subtasks) reports.

    Raises:
        ValueError: naming `field`, when the task is not evaluated or does not report the metric.
    """
    task, _, rest = key.partition("/")
    metric = rest.split("/", 1)[0]
    if not task or not metric:
        raise ValueError(f"`{field}` must be `<task>/<metric>`, e.g. `{OFFLINE_TASKS[1]}/acc`, got {key!r}")
    index = get_task_manager(tasks, include_path).task_index
    covered = set().union(*(_expand(t, index, set()) for t in tasks))
    if task not in covered:
        raise ValueError(f"`{field}` {key!r}: task {task!r} is not evaluated (`tasks`: {list(tasks)})")
    produced = _task_metrics(task, index, set())
    if produced and metric not in produced:
        raise ValueError(f"`{field}` {key!r}: task {task!r} does not report {metric!r}; it reports: "
                         f"{', '.join(sorted(produced))}")


def _expand(name: str, index: dict[str, Any], seen: set[str]) -> set[str]:
    """`name` and every group member or tagged task under it."""
    entry = index.get(name)
    if entry is None or name in seen:
        return {name}
    seen.add(name)
    children: list[str] = []
    if entry.kind.name == "TAG":
        children = sorted(entry.tags)
    elif entry.kind.name == "GROUP":
        children = [c for c in (entry.cfg or {}).get("task") or [] if isinstance(c, str)]
    return {name}.union(*(_expand(c, index, seen) for c in children))


def _task_metrics(name: str, index: dict[str, Any], seen: set[str]) -> set[str]:
    """Metric names a task, group or tag reports, from the index's YAML configs (no datasets loaded)."""
    entry = index.get(name)
    if entry is None or name in seen:
        return set()
    seen.add(name)
    kind = entry.kind.name
    if kind == "TAG":
        return set().union(*(_task_metrics(t, index, seen) for t in entry.tags))
    cfg = entry.cfg or {}
    if kind == "GROUP":
        out: set[str] = {m["metric"] for m in cfg.get("aggregate_metric_list") or [] if isinstance(m, dict)
                         and "metric" in m}
        for child in cfg.get("task") or []:
            out |= _task_metrics(child, index, seen) if isinstance(child, str) else _config_metrics(child)
        return out
    return _config_metrics(cfg) if kind == "TASK" else set()


def _config_metrics(cfg: dict[str, Any]) -> set[str]:
    listed = [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m, dict) and "metric" in m]
    return set(listed or _DEFAULT_METRICS.get(cfg.get("output_type", "generate_until"), ()))


def flatten_results(results: dict[str, Any], metrics: Sequence[str] = ()) -> dict[str, float]:
    """lm-eval's results as flat ``{"<task>/<metric>": value}``: the filter is dropped when it is `none` (the
    usual case) and kept as a third part otherwise (``gsm8k/exact_match/strict-match``); standard errors become
    ``<metric>_stderr`` where computed; only `metrics` when given; non-numeric entries (aliases, "N/A") dropped.

    Args:
        results: what `lm_eval.simple_evaluate` returns (its ``"results"`` mapping is read).
        metrics: metric names to keep (their stderr included); empty keeps every metric.
    """
    flat: dict[str, float] = {}
    for task, values in sorted(results.get("results", {}).items()):
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            base = metric[: -len("_stderr")] if metric.endswith("_stderr") else metric
            if metrics and base not in metrics:
                continue
            flat[f"{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return flat


# a change is told apart from noise at this many standard errors of the difference (two-sided 95 %)
NOISE_Z = 1.96


def stderr_key(key: str) -> str:
    """The key of the standard error of score `key` in [`flatten_results`]'s dict: ``task/acc`` ->
    ``task/acc_stderr``, ``gsm8k/exact_match/strict-match`` -> ``gsm8k/exact_match_stderr/strict-match``."""
    task, metric, *rest = key.split("/")
    return "/".join([task, f"{metric}_stderr", *rest])


def change_stderr(err_before: float | None, err_after: float | None) -> float | None:
    """Standard error of ``after - before`` for two scores with standard errors `err_before`, `err_after`, taken as
    independent: ``sqrt(a**2 + b**2)``. Both are measured on the same documents, so the true error of the change
    is usually smaller (the items' difficulty cancels); this errs on the side of calling a change noise. None when
    either is missing or not finite."""
    import math

    if err_before is None or err_after is None or not (math.isfinite(err_before) and math.isfinite(err_after)):
        return None
    return math.hypot(err_before, err_after)


def beyond_noise(change: float, err: float | None) -> bool | None:
    """Whether `change` lies outside ``±NOISE_Z * err`` (None: no error bar to judge by)."""
    return None if err is None else abs(change) > NOISE_Z * err


def format_change(change: float, err: float | None) -> str:
    """``+0.0400 ± 0.1300 (within noise)``: the change with its 95 % half-width and whether it is told apart from
    noise; just ``+0.0400`` without an error bar."""
    if err is None:
        return f"{change:+.4f}"
    return f"{change:+.4f} ± {NOISE_Z * err:.4f}" + ("" if beyond_noise(change, err) else " (within noise)")


def higher_is_better(results: dict[str, Any]) -> dict[str, bool]:
    """``{"<task>/<metric>": True/False}`` from lm-eval's `higher_is_better` block (perplexities are lower-is-
    better); the keys match [`flatten_results`] without the filter part."""
    return {f"{task}/{metric}": bool(flag) for task, flags in results.get("higher_is_better", {}).items()
            for metric, flag in (flags or {}).items() if flag is not None}


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.ERROR) -> Iterator[None]:
    """Keep lm-eval from flooding a training log for the duration: its log level raised (per-call INFO lines, the
    warning about a model passed as an object); the `git describe` it runs for its results' `git_hash` silenced
    (outside a git checkout it prints "fatal: not a git repository" on every call); and, with `TQDM_DISABLE=1`
    (set by `hf-cpt` when output is redirected), its progress bars off, which it creates with an explicit
    `disable=` that tqdm's environment defaults cannot override."""
    import os
    import subprocess

    import lm_eval.api.model
    import lm_eval.evaluator
    import lm_eval.models.huggingface

    def git_hash() -> str | None:
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return out.stdout.strip() or None

    patches = [(lm_eval.evaluator, "get_git_commit_hash", git_hash)]
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true"):
        for module in (lm_eval.api.model, lm_eval.models.huggingface):
            bar = module.tqdm
            patches.append((module, "tqdm", lambda *a, _bar=bar, **k: _bar(*a, **{**k, "disable": True})))
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(level)
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        logger.setLevel(old)
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def preserved_training_state(model: Any) -> Iterator[None]:
    """Restore, after the block, everything an evaluation could change that training depends on: each module's
    train/eval mode, the grad mode, and the Python, NumPy and torch (CPU and CUDA) RNG states."""
    import numpy as np
    import torch

    modes = [(m, m.training) for m in model.modules()]
    grad = torch.is_grad_enabled()
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        torch.set_grad_enabled(grad)
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def evaluate_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], *, include_path: str | Path | None = None,
                   limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                   bootstrap_iters: int = 0) -> dict[str, Any]:
    """Run lm-eval tasks on an in-memory causal LM; return lm-eval's results dict.

    The model is evaluated where it is (device, dtype, weights untouched; wrappers such as DDP are looked
    through by the caller); the tokenizer is copied once per call because lm-eval may set a pad token on it.

    Args:
        model: a `transformers.PreTrainedModel` (causal LM).
        tokenizer: its tokenizer.
        tasks: lm-eval task/group/tag names (checked with [`check_tasks`] first).
        include_path: a directory of extra task YAMLs.
        limit: at most this many documents per task (the first ones, as `lm_eval --limit`).
        num_fewshot: few-shot examples; None keeps each task's default.
        batch_size: requests per forward pass.
        bootstrap_iters: bootstrap resamples for standard errors of non-mean metrics (0: none; mean metrics
            such as `acc` get their closed-form standard error whenever this is > 0).

    Returns:
        the dict `lm_eval.simple_evaluate` returns (`results`, `higher_is_better`, `n-samples`, `config`, ...);
        [`flatten_results`] turns it into ``{"<task>/<metric>": value}``.
    """
    _require_lm_eval("downstream evaluation")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = get_task_manager(tasks, include_path)
    with preserved_training_state(model), quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            bootstrap_iters=bootstrap_iters, log_samples=False,
        )
    return results
