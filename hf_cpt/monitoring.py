"""The monitors' pure cores: summaries of an evaluation history and the one tolerance rule of hf-cpt (how far a
held-out metric may move from its value at step 0).

The forgetting monitor (`callbacks/forgetting.py`), the downstream guard (`callbacks/downstream.py`), the CMR fit
(`mixers/cmr.py`) and the learning-dynamics planner use them; this module imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

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


def describe_guard(guard: dict[str, Any]) -> str:
    """One sentence on one guard of the forgetting monitor and whether it held, from its summary (an entry of
    `metrics.json` `forgetting.guards`): ``KL to the base on `general_self` <= 0.2000 nats (absolute tolerance 0.2):
    not breached``. The set and the number are named, so a loss that fell because the set is replayed cannot pass
    for a kept model."""
    name, metric = guard.get("guarded_set", "general"), guard.get("tolerance_metric", "loss")
    what = "KL to the base" if metric == "kl" else "held-out loss"
    unit = "nats" if metric == "kl" else "nats/token"
    bound = guard.get("tolerance_bound")
    text = (f"{what} on `{name}` <= " + (f"{bound:.4f} {unit}" if bound is not None else "its bound")
            + f" ({guard.get('tolerance_mode')} tolerance {guard.get('tolerance')}): ")
    if guard.get("tolerance_breached"):
        return text + f"breached, first at step {guard.get('breach_step')}"
    return text + ("not breached" if bound is not None else "never measured")


def forgetting_guards(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The guards of a forgetting summary (`metrics.json` `forgetting`): its `guards` list, or, in a summary
    written before guards were a list, the one guard its top-level fields describe."""
    if summary.get("guards") is not None:
        return list(summary["guards"])
    return [{"guarded_set": "general", "tolerance_metric": "loss", **summary}] if "tolerance" in summary else []


def describe_guards(summary: dict[str, Any]) -> str:
    """`describe_guard` for every guard of a forgetting summary, joined with ``; ``."""
    return "; ".join(describe_guard(g) for g in forgetting_guards(summary)) or "no guard"


def summarize_run(forgetting: dict[str, Any], domain: str, output_dir: str) -> str:
    """The one sentence that ends a run (`hf-cpt train`, `metrics.json` `summary`, the model card): the domain
    gain, the KL to the base on every guarded set (the held-out loss where a guard watches the loss), the guards'
    status and where the files are. E.g. ``Domain loss 3.100 -> 2.500 (-0.600 nats/token); KL to the base 0.041 on
    `general_self` (bound 0.200); guard held; model, metrics.json, forgetting.png and card in runs/quickstart.``"""
    start, end = forgetting.get(f"{domain}_loss_start"), forgetting.get(f"{domain}_loss_end")
    gain = ("domain loss n/a" if start is None or end is None
            else f"Domain loss {start:.3f} -> {end:.3f} ({end - start:+.3f} nats/token)")
    parts, guards = [], forgetting_guards(forgetting)
    for g in guards:
        name, metric = g.get("guarded_set"), g.get("tolerance_metric")
        bound = g.get("tolerance_bound")
        value = g.get("end") if g.get("end") is not None else forgetting.get(f"{name}_{metric}_end")
        if metric == "loss" and value is None:
            value = forgetting.get(f"{name}_loss_end")
        what = "KL to the base" if metric == "kl" else "loss"
        parts.append(f"{what} {'n/a' if value is None else f'{value:.3f}'} on `{name}`"
                     + (f" (bound {bound:.3f})" if bound is not None else ""))
    # forgetting as KL on the guarded sets even where a guard watches the loss
    kl_guarded = {g.get("guarded_set") for g in guards if g.get("tolerance_metric") == "kl"}
    for name in dict.fromkeys(g.get("guarded_set") for g in guards if g.get("guarded_set") not in kl_guarded):
        kl = forgetting.get(f"{name}_kl_end")
        if kl is not None:
            parts.append(f"KL to the base {kl:.3f} on `{name}`")
    breached = [g for g in guards if g.get("tolerance_breached")]
    if not guards:
        status = "no guard"
    elif breached:
        status = "guard breached on " + ", ".join(f"`{g.get('guarded_set')}` {g.get('tolerance_metric')} (step "
                                                  f"{g.get('breach_step')})" for g in breached)
    else:
        status = "guard held" if len(guards) == 1 else f"all {len(guards)} guards held"
    return (f"{gain}; " + "; ".join(parts + [status])
            + f"; model, metrics.json, forgetting.png and card in {output_dir}.")


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
