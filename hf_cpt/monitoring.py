"""The monitors' pure cores: summaries of an evaluation history and the one tolerance rule of hf-cpt (how far a
held-out metric may move from its value at step 0).

The forgetting monitor (`callbacks/forgetting.py`), the downstream guard (`callbacks/downstream.py`), the CMR fit
(`mixers/cmr.py`) and the learning-dynamics planner use them; this module imports neither torch nor transformers.
"""

from __future__ import annotations

from .validation import check_choice

TOLERANCE_MODES = ("relative", "absolute")


def tolerance_bound(baseline: float, tolerance: float, mode: str = "relative") -> float:
    """The highest value allowed: ``baseline * (1 + tolerance)`` (relative) or ``baseline + tolerance`` (absolute).

    The one tolerance rule of hf-cpt: the forgetting monitor's guard and the CMR fit both use it.
    """
    check_choice("tolerance_mode", mode, TOLERANCE_MODES)
    return baseline * (1 + tolerance) if mode == "relative" else baseline + tolerance


def exceeds_tolerance(baseline: float, current: float, tolerance: float, mode: str = "relative") -> bool:
    """Whether `current` (e.g. the general loss) has risen past the tolerance over `baseline`."""
    return current > tolerance_bound(baseline, tolerance, mode)


def compute_forgetting(
    history: list[dict[str, float]], general: str = "general", domain: str = "domain"
) -> dict[str, float | None]:
    """Summarise a history: first/last value per held-out set and metric, their absolute and relative change.

    Args:
        history: records ``{"step": int, "<name>_loss": float, "<name>_kl": float, ...}`` in step order.
        general: name of the (primary) general held-out set.
        domain: name of the domain held-out set.

    Returns:
        ``{"<name>_loss_start", "<name>_loss_end", "<name>_delta", "<name>_delta_rel"}`` for `general` and
        `domain` (``None`` where the history has no value) and for every other set in the history; plus
        ``"<name>_kl_end"`` and ``"<name>_top1_agree_end"`` for sets with a KL-to-base record.
    """
    names = [general, domain] + sorted({k[: -len("_loss")] for r in history for k in r if k.endswith("_loss")}
                                       - {general, domain})
    out: dict[str, float | None] = {}
    for name in names:
        values = [r[f"{name}_loss"] for r in history if f"{name}_loss" in r]
        start, end = (values[0], values[-1]) if values else (None, None)
        out[f"{name}_loss_start"] = start
        out[f"{name}_loss_end"] = end
        out[f"{name}_delta"] = None if start is None else end - start
        out[f"{name}_delta_rel"] = None if not start else (end - start) / start
        for metric in ("kl", "top1_agree"):
            series = [r[f"{name}_{metric}"] for r in history if f"{name}_{metric}" in r]
            if series:
                out[f"{name}_{metric}_end"] = series[-1]
    return out


def describe_guard(summary: dict[str, Any]) -> str:
    """One sentence on what the forgetting monitor guarded and whether it held, from its summary (`metrics.json`
    `forgetting`): ``KL to the base on `general_self` <= 0.2 nats (absolute tolerance 0.2): not breached``. The
    set and the number are named, so a loss that fell because the set is replayed cannot pass for a kept model."""
    name, metric = summary.get("guarded_set", "general"), summary.get("tolerance_metric", "loss")
    what = "KL to the base" if metric == "kl" else "held-out loss"
    unit = "nats" if metric == "kl" else "nats/token"
    bound = summary.get("tolerance_bound")
    text = (f"{what} on `{name}` <= " + (f"{bound:.4f} {unit}" if bound is not None else "its bound")
            + f" ({summary.get('tolerance_mode')} tolerance {summary.get('tolerance')}): ")
    if summary.get("tolerance_breached"):
        return text + f"breached, first at step {summary.get('breach_step')}"
    return text + "not breached"


def downstream_breached(baseline: float, current: float, tolerance: float, mode: str = "absolute",
                        higher_is_better: bool = True) -> bool:
    """Whether a downstream metric moved past the tolerance in its bad direction (see `DownstreamConfig`,
    callbacks/downstream.py).

    Uses `tolerance_bound`, the one tolerance rule of hf-cpt: the allowed change is ``bound - baseline``, applied
    downwards for a higher-is-better metric (accuracy) and upwards otherwise (perplexity).
    """
    allowed = tolerance_bound(baseline, tolerance, mode) - baseline
    return current < baseline - abs(allowed) if higher_is_better else current > baseline + abs(allowed)


def summarize_downstream(history: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """First value, last value and change of every ``<task>/<metric>`` in a history of records
    ``{"step": int, "<task>/<metric>": float, "<task>/<metric>_stderr": float, ...}``; where lm-eval computed
    standard errors, also theirs at start and end, the change's (`change_stderr`) and `beyond_noise`: whether the
    change lies outside its 95 % interval (a smaller change is noise, not a gain or a drop)."""
    from .evaluation import beyond_noise, change_stderr, stderr_key

    keys = sorted({k for r in history for k in r if k != "step" and "_stderr" not in k})
    out: dict[str, dict[str, Any]] = {"start": {}, "end": {}, "delta": {}, "start_stderr": {}, "end_stderr": {},
                                      "delta_stderr": {}, "beyond_noise": {}}
    for key in keys:
        records = [r for r in history if key in r]
        first, last = records[0], records[-1]
        out["start"][key], out["end"][key] = first[key], last[key]
        out["delta"][key] = last[key] - first[key]
        err = change_stderr(first.get(stderr_key(key)), last.get(stderr_key(key)))
        if err is not None:
            out["start_stderr"][key], out["end_stderr"][key] = first[stderr_key(key)], last[stderr_key(key)]
            out["delta_stderr"][key] = err
            out["beyond_noise"][key] = beyond_noise(out["delta"][key], err)
    return out
