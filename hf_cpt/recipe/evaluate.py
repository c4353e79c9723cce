"""`hf-cpt eval`: an adapted model and its base side by side on lm-eval tasks, as one table (task, metric, base,
adapted, Δ) and a JSON file. The public function is [`compare_models`]; the CLI only calls it and prints.

For a directory written by `hf-cpt train`, the base model and the evaluation settings (tasks, limit, few-shot,
batch size, include path) default to the run's recipe (`model.name_or_path` and its `downstream` block), so the
numbers line up with the ones logged during training.
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..callbacks.downstream import DownstreamConfig
from ..config import CONFIG_FILE, CPTConfig, ModelConfig
from ..evaluation import beyond_noise, change_stderr, format_change
from ..validation import check_int

EVAL_FILE = "downstream_eval.json"


@dataclass
class EvalComparison:
    """What [`compare_models`] measured: one row per task and metric, and the settings used."""

    adapted: str
    base: str | None
    settings: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    output: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"adapted": self.adapted, "base": self.base, "settings": self.settings, "rows": self.rows}

    def table(self) -> str:
        """The side-by-side table as aligned text (± the standard error where lm-eval computed one)."""
        def cell(value: float | None, err: float | None = None) -> str:
            if value is None:
                return "n/a"
            return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None and math.isfinite(err) else "")

        header = ["task", "metric", "base", "adapted", "Δ"]
        lines = [[r["task"], r["metric"], cell(r["base"], r.get("base_stderr")),
                  cell(r["adapted"], r.get("adapted_stderr")),
                  "n/a" if r["delta"] is None else format_change(r["delta"], r.get("delta_stderr"))]
                 for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(header, *lines)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                         + [fmt.format(*line) for line in lines])


def resolve_eval_settings(adapted: str, base: str | None = None, tasks: list[str] | None = None,
                          **overrides: Any) -> tuple[str | None, DownstreamConfig, str]:
    """The base model, the [`DownstreamConfig`] and the dtype for comparing `adapted` with its base: explicit
    arguments first, then the run's recipe when `adapted` is an `hf-cpt train` directory.

    Raises:
        ValueError: no tasks given and the run has no `downstream` block.
    """
    run = Path(adapted).expanduser()
    if run.is_dir() and not (run / CONFIG_FILE).is_file() and not (run / "config.json").is_file():
        raise FileNotFoundError(f"`MODEL` {adapted!r} is a directory but neither an `hf-cpt train` output (no "
                                f"{CONFIG_FILE}) nor a model directory (no config.json); give the directory the run "
                                "wrote (`Adapted model written to ...`)")
    cfg = CPTConfig.from_pretrained(run) if (run / CONFIG_FILE).is_file() else None
    recorded = cfg.downstream if cfg is not None else None
    if not tasks and recorded is None:
        raise ValueError(f"`tasks` is not set and {adapted!r} records no `downstream` tasks: pass lm-eval task names "
                         "(CLI: --tasks hf_cpt_python_docs_mc,hf_cpt_kjv_mc)")
    settings = {k: v for k, v in overrides.items() if v is not None}
    if recorded is not None:
        keep = {k: getattr(recorded, k) for k in ("include_path", "limit", "num_fewshot", "batch_size", "metrics")}
        settings = {**keep, **settings}
    downstream = DownstreamConfig(tasks=list(tasks or recorded.tasks), **settings)
    if base is None and cfg is not None:
        base = cfg.model.name_or_path
    return base, downstream, cfg.model.dtype if cfg is not None else "float32"


def compare_models(adapted: str, base: str | None = None, tasks: list[str] | None = None, *,
                   include_path: str | None = None, limit: int | None = None, num_fewshot: int | None = None,
                   batch_size: int | None = None, bootstrap_iters: int = 1000,
                   output: str | Path | None = None) -> EvalComparison:
    """Evaluate `adapted` and its `base` on lm-eval tasks, one model in memory at a time; write the JSON.

    Args:
        adapted: an `hf-cpt train` output directory, any model directory, a Hub id or `embedded:...`.
        base: the model to compare with; default: the run's `model.name_or_path` (None and not a run: only the
            adapted column).
        tasks: lm-eval task/group/tag names; default: the run's `downstream.tasks`.
        include_path, limit, num_fewshot, batch_size: as in [`DownstreamConfig`]; default: the run's values.
        bootstrap_iters: resamples for standard errors of non-mean metrics (mean metrics such as `acc` get the
            closed form); 0 skips standard errors.
        output: where the JSON goes; default: `downstream_eval.json` in `adapted` when it is a directory, else in
            the working directory. Written atomically.

    Returns:
        an [`EvalComparison`]; `.table()` is what the CLI prints.
    """
    from ..evaluation import evaluate_tasks, flatten_results
    from .models import load_model_and_tokenizer

    base, cfg, dtype = resolve_eval_settings(adapted, base, tasks, include_path=include_path, limit=limit,
                                             num_fewshot=num_fewshot, batch_size=batch_size)
    check_int("bootstrap_iters", bootstrap_iters, minimum=0)
    path = _output_path(output, adapted)
    cfg.check()  # lm-eval installed, names and metrics known: before any model loads
    from .models import inspect_model

    for name in (base, adapted):  # both models' files, configs and tokenizers, before either's weights load
        if name is not None:
            inspect_model(ModelConfig(name_or_path=str(name), dtype=dtype))
    scores: dict[str, dict[str, float]] = {}
    for role, name in (("base", base), ("adapted", adapted)):
        if name is None:
            continue
        model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(name), dtype=dtype))
        results = evaluate_tasks(model, tokenizer, cfg.tasks, include_path=cfg.include_path, limit=cfg.limit,
                                 num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size,
                                 bootstrap_iters=bootstrap_iters)
        scores[role] = flatten_results(results, cfg.metrics)
        del model, tokenizer
        gc.collect()
    settings = {"tasks": cfg.tasks, "include_path": cfg.include_path, "limit": cfg.limit,
                "num_fewshot": cfg.num_fewshot, "batch_size": cfg.batch_size, "bootstrap_iters": bootstrap_iters}
    result = EvalComparison(adapted=str(adapted), base=None if base is None else str(base), settings=settings,
                            rows=comparison_rows(scores.get("base", {}), scores["adapted"]))
    result.output = _write_json(result, path)
    return result


def comparison_rows(base: dict[str, float], adapted: dict[str, float]) -> list[dict[str, Any]]:
    """Rows ``{task, metric, base, adapted, delta, base_stderr, adapted_stderr, delta_stderr, beyond_noise}`` from
    two flat score dicts (see [`change_stderr`], [`beyond_noise`])."""
    rows = []
    for key in sorted(k for k in set(base) | set(adapted) if "_stderr" not in k):
        task, metric = key.split("/", 1)
        err = key.replace(f"/{metric.split('/')[0]}", f"/{metric.split('/')[0]}_stderr", 1)
        b, a = base.get(key), adapted.get(key)
        delta = None if a is None or b is None else a - b
        delta_err = change_stderr(base.get(err), adapted.get(err))
        rows.append({"task": task, "metric": metric, "base": b, "adapted": a, "delta": delta,
                     "base_stderr": base.get(err), "adapted_stderr": adapted.get(err), "delta_stderr": delta_err,
                     "beyond_noise": None if delta is None else beyond_noise(delta, delta_err)})
    return rows


def _output_path(output: str | Path | None, adapted: str) -> Path:
    run = Path(adapted).expanduser()
    path = Path(output).expanduser() if output is not None else (run if run.is_dir() else Path.cwd()) / EVAL_FILE
    if path.is_dir():
        raise ValueError(f"`output` {str(path)!r} is a directory: give a file path, e.g. {str(path / EVAL_FILE)!r}")
    return path


def _write_json(result: EvalComparison, path: Path) -> Path:
    """Write the comparison to `path` (a temp file next to it, then a rename: never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    tmp.replace(path)
    return path
