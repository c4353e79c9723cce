"""Plan, then check the plan: the held-out loss curves `hf-cpt plan` predicted for a run, compared with what the run
measures at every evaluation.

`hf-cpt plan --write-config` stores its prediction in the planned run's config as the block `monitor.prediction`:
the predicted general and domain held-out loss at the run's evaluation steps, each with a band (the plan's
bootstrap band, widened by the fit's RMSE on the pilots: the scatter of one measured curve around the law). The
forgetting monitor compares every evaluation with it; `metrics.json` (`forgetting.prediction`), the forgetting
plot (the band drawn under the measured curves) and the model card report predicted vs measured, and the run
warns once, in one line, when a measurement leaves the band.

A step between two stored steps is predicted by linear interpolation; a step outside them is not checked.

This module is the pure core: plain Python, no torch, no transformers.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .registry import Technique, names
from .validation import check_fraction, check_int, check_number

if TYPE_CHECKING:  # pragma: no cover
    from .config import CPTConfig

ROLES = ("general", "domain")  # the monitor's two held-out sets (`monitor.general`, `monitor.domain`)


@dataclass
class PredictionConfig:
    """Predicted held-out losses of a run, per evaluation step, with a band (the YAML block `monitor.prediction`,
    written by `hf-cpt plan --write-config`; see [`compare_prediction`]).

    The settings the prediction was made for (`replay_ratio`, `learning_rate`, `max_steps`, when recorded) must be
    the run's: a run that changes one is refused rather than compared with a curve made for another run.
    """

    steps: list[int] = field(metadata={"help": "Evaluation steps the losses are predicted at (increasing, >= 0)."})
    general: list[float] = field(metadata={"help": "Predicted loss on `monitor.general` at each step."})
    general_lo: list[float] = field(metadata={"help": "Bottom of the general band at each step."})
    general_hi: list[float] = field(metadata={"help": "Top of the general band at each step."})
    domain: list[float] = field(metadata={"help": "Predicted loss on `monitor.domain` at each step."})
    domain_lo: list[float] = field(metadata={"help": "Bottom of the domain band at each step."})
    domain_hi: list[float] = field(metadata={"help": "Top of the domain band at each step."})
    band: str = field(default="", metadata={"help": "How the band was made (shown on the plot and the card)."})
    source: str = field(default="", metadata={"help": "Where the prediction came from (e.g. the plan's pilots)."})
    replay_ratio: float | None = field(default=None, metadata={"help": "`data.replay_ratio` it was made for."})
    learning_rate: float | None = field(default=None, metadata={"help": "`train.learning_rate` it was made for."})
    max_steps: int | None = field(default=None, metadata={"help": "`train.max_steps` it was made for."})

    def __post_init__(self) -> None:
        # the run it was made for first: one wrong field is named as itself, before the curves are looked at
        if self.replay_ratio is not None:
            self.replay_ratio = check_fraction("replay_ratio", self.replay_ratio)
        if self.learning_rate is not None:
            self.learning_rate = check_number("learning_rate", self.learning_rate, 0.0, min_inclusive=False)
        check_int("max_steps", self.max_steps, optional=True)
        if not isinstance(self.steps, list) or not self.steps:
            raise ValueError(f"`steps` must be a non-empty list of evaluation steps, got {self.steps!r}")
        for i, s in enumerate(self.steps):
            check_int(f"steps[{i}]", s, 0)
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"`steps` must increase, got {self.steps[:6]}...")
        for role in ROLES:
            series = {k: getattr(self, k) for k in (role, f"{role}_lo", f"{role}_hi")}
            for key, values in series.items():
                if not isinstance(values, list) or len(values) != len(self.steps):
                    n = len(values) if isinstance(values, list) else values
                    raise ValueError(f"`{key}` must hold one loss per step ({len(self.steps)}), got {n!r}")
                setattr(self, key, [check_number(f"{key}[{i}]", v) for i, v in enumerate(values)])
            point, lo, hi = (getattr(self, k) for k in series)
            for i, (p, a, b) in enumerate(zip(point, lo, hi)):
                if not a <= p <= b:
                    raise ValueError(f"`{role}_lo[{i}]` <= `{role}[{i}]` <= `{role}_hi[{i}]` does not hold ({a:g}, "
                                     f"{p:g}, {b:g}): the band must hold its prediction")


def predicted_loss(prediction: PredictionConfig, role: str, step: int) -> tuple[float, float, float] | None:
    """``(predicted, lo, hi)`` of the `role` (`general` / `domain`) loss at `step`: the stored values, linearly
    interpolated between stored steps; None outside the stored steps (not predicted there)."""
    if role not in ROLES:
        raise ValueError(f"`role` must be one of {ROLES}, got {role!r}")
    steps = prediction.steps
    if step < steps[0] or step > steps[-1]:
        return None
    series = [getattr(prediction, k) for k in (role, f"{role}_lo", f"{role}_hi")]
    i = bisect_left(steps, step)
    if steps[i] == step:
        return tuple(s[i] for s in series)  # type: ignore[return-value]
    w = (step - steps[i - 1]) / (steps[i] - steps[i - 1])
    return tuple((1 - w) * s[i - 1] + w * s[i] for s in series)  # type: ignore[return-value]


def inside_band(measured: float, lo: float, hi: float) -> bool:
    """Whether a measured loss lies in its predicted band ``[lo, hi]`` (a NaN measurement does not)."""
    return not math.isnan(measured) and lo <= measured <= hi


def compare_prediction(history: list[dict[str, Any]], prediction: PredictionConfig, general: str = "general",
                       domain: str = "domain") -> dict[str, Any]:
    """Predicted vs measured at every evaluation of `history` (the forgetting monitor's records).

    Returns:
        ``{"evals": [{"step", "general_measured", "general_predicted", "general_lo", "general_hi",
        "general_inside", "domain_...": ...}, ...], "general_checked", "general_inside", "domain_checked",
        "domain_inside", "left_band", "first_departure", "band", "source", "general_set", "domain_set"}``: per
        evaluation the values of each set measured at a predicted step; counts of checked and inside evaluations
        per set; the first measurement outside its band (step order, general first) or None.
    """
    evals = []
    for record in history:
        row: dict[str, Any] = {"step": int(record["step"])}
        for role, name in zip(ROLES, (general, domain)):
            measured = record.get(f"{name}_loss")
            predicted = predicted_loss(prediction, role, row["step"])
            if measured is None or predicted is None:
                continue
            p, lo, hi = predicted
            row.update({f"{role}_measured": float(measured), f"{role}_predicted": p, f"{role}_lo": lo,
                        f"{role}_hi": hi, f"{role}_inside": inside_band(float(measured), lo, hi)})
        if len(row) > 1:
            evals.append(row)
    out: dict[str, Any] = {"general_set": general, "domain_set": domain, "band": prediction.band,
                           "source": prediction.source, "evals": evals}
    for role in ROLES:
        checked = [e for e in evals if f"{role}_inside" in e]
        out[f"{role}_checked"] = len(checked)
        out[f"{role}_inside"] = sum(bool(e[f"{role}_inside"]) for e in checked)
    out["first_departure"] = first_departure(evals, general, domain)
    out["left_band"] = out["first_departure"] is not None
    return out


def first_departure(evals: list[dict[str, Any]], general: str = "general",
                    domain: str = "domain") -> dict[str, Any] | None:
    """The first measurement of `evals` (from [`compare_prediction`]) outside its band: ``{"role", "set", "step",
    "measured", "predicted", "lo", "hi"}``, or None when every one is inside."""
    for e in evals:
        for role, name in zip(ROLES, (general, domain)):
            if e.get(f"{role}_inside") is False:
                return {"role": role, "set": name, "step": e["step"],
                        **{k: e[f"{role}_{k}"] for k in ("measured", "predicted", "lo", "hi")}}
    return None


def describe_departure(departure: dict[str, Any]) -> str:
    """The one warning line of a run that leaves its predicted band."""
    d = departure
    side = "above" if d["measured"] > d["hi"] else "below"
    return (f"the run left its plan: {d['role']} loss on {d['set']!r} measured {d['measured']:.4f} at step "
            f"{d['step']}, {side} the predicted band {d['lo']:.4f}-{d['hi']:.4f} (predicted {d['predicted']:.4f}, "
            "`monitor.prediction`); later departures are not warned about, every evaluation's predicted vs measured "
            "is in metrics.json `forgetting.prediction`")


def summarize_prediction(summary: dict[str, Any]) -> str:
    """One sentence on a run against its prediction (from [`compare_prediction`]'s result): ``general loss inside
    the predicted band at 5/5 evaluations, domain at 3/5 (first outside at step 8)``."""
    parts = [f"{role} loss inside the predicted band at {summary[f'{role}_inside']}/{summary[f'{role}_checked']} "
             "evaluations" if role == "general" else
             f"{role} at {summary[f'{role}_inside']}/{summary[f'{role}_checked']}" for role in ROLES]
    d = summary.get("first_departure")
    tail = (f" (first outside: {d['role']} at step {d['step']}, measured {d['measured']:.4f} vs band "
            f"{d['lo']:.4f}-{d['hi']:.4f})" if d else "")
    return ", ".join(parts) + tail


# --- registry entry ---------------------------------------------------------------------------------------------------
# The forgetting monitor (always on) does the comparison at every evaluation; the entry checks the block against
# the run it was made for and puts the result on the model card.
def _check(cfg: CPTConfig) -> None:
    p = cfg.monitor.prediction
    if p is None:
        return
    made_for = (("data.replay_ratio", p.replay_ratio, cfg.data.replay_ratio),
                ("train.learning_rate", p.learning_rate, cfg.train.learning_rate),
                ("train.max_steps", p.max_steps, cfg.train.max_steps))
    for name, planned, actual in made_for:
        if planned is not None and not math.isclose(float(planned), float(actual), rel_tol=1e-9, abs_tol=1e-12):
            raise ValueError(f"`monitor.prediction` was made for `{name}` {planned:g}, but the run has {actual:g}: "
                             f"rerun `hf-cpt plan --write-config` for this run, or remove `monitor.prediction`")
    if p.replay_ratio is not None and cfg.data.replay_stages:
        raise ValueError("`monitor.prediction` was made for one replay ratio, but `data.replay_stages` changes it "
                         "during the run: remove one of them")
    if cfg.merge_base is not None and cfg.merge_base.ship:
        raise ValueError("`monitor.prediction` predicts the trained model, but `merge_base.ship` measures the merge at "
                         "the end: remove `merge_base` (merge afterwards with `hf-cpt merge RUN --alpha A`) or the "
                         "prediction")


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    summary = (metrics.get("forgetting") or {}).get("prediction")
    if not summary:
        return []
    return [f"plan check (`monitor.prediction`{', ' + summary['source'] if summary.get('source') else ''}): "
            f"{summarize_prediction(summary)}"]


TECHNIQUE = Technique(
    name="plan check",
    key="monitor.prediction",
    config=PredictionConfig,
    exports=names("prediction", "PredictionConfig", "compare_prediction"),
    functional=names("prediction", "predicted_loss", "inside_band", "compare_prediction"),
    check=_check,
    card=_card,
)
