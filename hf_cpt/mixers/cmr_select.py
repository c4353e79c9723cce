"""The CMR estimator chosen by data: fit several loss models to the CMR pilots, keep the one that predicts the
pilots' own longest budgets best when fitted on the shorter ones, and solve it for the critical mixture ratio.

Why: one fixed functional form extrapolates whatever shape it assumes. On the CPT lab (docs/benchmarks.md) the
power-law surfaces of [`hf_cpt.mixers.cmr`] read the general-loss jump while the LR re-warms as forgetting that
keeps growing and predicted CMR 0.07 where the sweep measured 0.63; a curve that saturates fits the same pilots
and extrapolates differently. Which shape the pilots follow is a question the pilots can answer: hold out their
longest budgets, fit every candidate on the shorter ones, score the prediction (leave-one-budget-out).

Candidates (T = training tokens, r = domain share, g = 1 - r the general share):

    surfaces   L_G = L_G0 + F (r T)^phi - R (g T)^rho                    (hf_cpt.mixers.cmr, power laws)
    dcpt       L = E + B x^eta T^(-beta) + C (x + eps)^(-gamma)          D-CPT law, x = the set's own share
    dynamics   L = L0 + A (S_pt + S1)^(-alpha) - C S2 + B_r (1 - (1 + E_r S1)^(-beta_r))   (hf_cpt.dynamics)

D-CPT: Que et al. 2024, "D-CPT Law: Domain-specific Continual Pre-Training Scaling Law for Large Language Models"
(arXiv 2406.01375), L(N, D, r) = E + A / N^alpha + B r^eta / D^beta + C / (r + eps)^gamma with N the model size
(one model here: A / N^alpha joins E) and r the share of the evaluated corpus in the CPT data. Its cross-domain
variant adds F / K^mu with K a learnable coefficient per domain; with one model and one domain that is a constant
too, so it predicts exactly what D-CPT predicts and is listed, not scored twice. We let B take either sign: the
general loss of a CPT run rises towards its plateau (B < 0), the paper's general curves fall (B > 0).

Learning dynamics: Wang et al. 2025 (arXiv 2505.07796) as fitted by [`hf_cpt.dynamics`], on the constant-LR
pilots' LR schedule (`PilotSchedule`: tokens per update, warmup, the LR the checkpoint ended at), with one
continued-pretraining curve and annealing term shared by the ratios and one distribution shift per ratio (the
pilots have one schedule, so the per-ratio fit of `hf-cpt plan` is not identifiable from them). Its annealing area
is negative while the LR re-warms: the jump the surfaces mistake for growing forgetting.

The interval: a wild residual bootstrap of the chosen model's general fit, widened for extrapolation in budget by
the chosen model's own leave-one-budget-out CMR error, scaled by how much further (in log tokens) the target lies
beyond the pilots than the held-out budgets lay beyond the fitted ones. Refused: fewer than 3 ratios or 4 budgets,
general curves without curvature at every ratio (the shapes cannot be told apart), a CMR outside the pilots'
ratios (no candidate is extrapolated in the ratio).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..import_utils import require
from .cmr import CMRRecord, check_prediction_args, check_records, general_bound
from .cmr_candidates import (  # noqa: F401  (fit_* and PilotSchedule: re-exported, the public names live here too)
    CANDIDATES,
    FITTERS,
    Curve,
    FittedModel,
    PilotSchedule,
    _Data,
    fit_dcpt_model,
    fit_dynamics_model,
    fit_saturating_model,
    fit_surfaces_model,
)

logger = logging.getLogger(__name__)

RIVAL_FACTOR = 2.0  # a candidate scoring within this factor of the best also bounds the interval


# --- solving for the ratio ---------------------------------------------------------------------------------------
def solve_ratio(general: Curve, tokens: float, bound: float, lo: float, hi: float, n: int = 401) -> tuple[float, str]:
    """The largest share r in [lo, hi] up to which `general(tokens, r)` stays <= `bound`: (r, status), status
    `ok` (a crossing inside), `above` (no share in range breaks the bound: the CMR is >= hi) or `below` (even lo
    breaks it)."""
    rs = np.linspace(lo, hi, n)
    g = np.asarray(general(np.full_like(rs, tokens), rs), float)
    g = np.where(np.isfinite(g), g, np.inf)
    if g[0] > bound:
        return lo, "below"
    over = np.nonzero(g > bound)[0]
    if not over.size:
        return hi, "above"
    i = int(over[0])
    return float(rs[i - 1] + (bound - g[i - 1]) * (rs[i] - rs[i - 1]) / (g[i] - g[i - 1])), "ok"


def measured_ratio(records: Sequence[CMRRecord], tokens: float, bound: float) -> tuple[float, str]:
    """The CMR the records themselves show at `tokens` (linear interpolation between the measured shares)."""
    pts = sorted((x.ratio, x.general_loss) for x in records if x.tokens == tokens)
    rs, gs = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])

    def curve(_t: Any, r: Any) -> np.ndarray:
        return np.interp(r, rs, gs)
    return solve_ratio(curve, tokens, bound, float(rs[0]), float(rs[-1]), n=2001)


# --- selection ---------------------------------------------------------------------------------------------------
@dataclass
class CandidateScore:
    """One candidate's leave-one-budget-out result (fitted on the shorter budgets, scored on the longer)."""

    name: str
    score: float  # the selection metric (see `CMRSelection.metric`); inf when the candidate could not be fitted
    cmr_error: float | None  # mean |predicted - measured CMR| over the held-out budgets with a measured crossing
    general_rmse: float  # rmse of the general loss over the held-out budgets' records
    n_params: int
    note: str = ""  # why it could not be scored, or why it lost


@dataclass
class CMRSelection:
    """Result of [`select_cmr_estimator`]: the chosen candidate (refitted on every record) and every score."""

    chosen: str
    metric: str  # `cmr_error` (held-out budgets show a crossing) or `general_rmse`
    candidates: list[CandidateScore]
    model: FittedModel = field(repr=False)
    tolerance: float
    tolerance_mode: str
    bound: float
    ratio_range: tuple[float, float]
    budgets: list[float]
    fit_budgets: list[float]
    score_budgets: list[float]
    lobo_extrapolation: float  # log(longest held-out budget / longest fitted budget)
    lobo_cmr_error: float  # the chosen candidate's held-out CMR error (in CMR units, converted when needed)
    records: list[CMRRecord] = field(repr=False, default_factory=list)
    # candidates the held-out budgets could not tell from the chosen one (score <= RIVAL_FACTOR x the best),
    # refitted on every record: their CMRs bound the interval too (the shape itself is uncertain)
    rivals: dict[str, FittedModel] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "metric": self.metric,
                "candidates": [vars(c) for c in self.candidates]
                + [{"name": "dcpt-cross-domain", "score": None, "note": "not scored: its F / K^mu term is one "
                    "constant for one model and one domain, so it predicts what `dcpt` predicts"}],
                "tolerance": self.tolerance, "tolerance_mode": self.tolerance_mode, "bound": self.bound,
                "ratio_range": list(self.ratio_range), "budgets": self.budgets, "fit_budgets": self.fit_budgets,
                "score_budgets": self.score_budgets, "lobo_extrapolation": self.lobo_extrapolation,
                "lobo_cmr_error": self.lobo_cmr_error, "rivals": sorted(self.rivals)}


def _split_budgets(budgets: list[float]) -> tuple[list[float], list[float]]:
    """Fit on the budgets <= half the longest (at least 3), score on the rest."""
    fit = [b for b in budgets if b <= budgets[-1] / 2]
    if len(fit) < 3:
        fit = budgets[:3]
    return fit, [b for b in budgets if b not in fit]


def _curvature_stat(records: Sequence[CMRRecord], transform: Callable[[np.ndarray], np.ndarray]
                    ) -> tuple[float, int, int]:
    """The F statistic of a quadratic against a straight line in transform(T), per ratio, pooled over the ratios
    (one residual variance): (F, numerator dof, denominator dof)."""
    rss_line = rss_quad = 0.0
    k = n = 0
    for ratio in sorted({x.ratio for x in records if x.tokens > 0}):
        pts = sorted((x.tokens, x.general_loss) for x in records if x.tokens > 0 and x.ratio == ratio)
        if len(pts) < 4:
            continue
        u = transform(np.array([p[0] for p in pts], float))
        u = (u - u.mean()) / max(float(np.ptp(u)), 1e-12)
        y = np.array([p[1] for p in pts])
        for degree in (1, 2):
            a = np.stack([u ** j for j in range(degree + 1)], axis=1)
            coef, *_ = np.linalg.lstsq(a, y, rcond=None)
            rss = float(np.sum((a @ coef - y) ** 2))
            if degree == 1:
                rss_line += rss
            else:
                rss_quad += rss
        k += 1
        n += len(y)
    dof = n - 3 * k
    if k == 0 or dof <= 0:
        return 0.0, max(k, 1), max(dof, 1)
    return ((rss_line - rss_quad) / k) / max(rss_quad / dof, 1e-30), k, dof


def check_curvature(records: Sequence[CMRRecord], level: float = 0.95) -> None:
    """Refuse general curves that are straight lines, in tokens and in log tokens, at every ratio: an F test of a
    quadratic against a straight line per ratio, pooled over the ratios, below its `level` point (what straight
    noisy lines give). A power law and a saturating curve then fit the pilots alike and extrapolate apart.

    Raises:
        ValueError: no curvature seen.
    """
    require("scipy", "The curvature check")
    from scipy.stats import f as f_dist

    lin, k, dof = _curvature_stat(records, lambda t: t)
    log, _, _ = _curvature_stat(records, np.log)
    limit = float(f_dist.ppf(level, k, dof))
    if max(lin, log) < limit:
        raise ValueError(f"no curvature seen: the general loss is a straight line at every ratio, in tokens and in "
                         f"log tokens (F = {max(lin, log):.2f} < {limit:.2f}, the {level:.0%} point of a quadratic "
                         "term), so a power law and a saturating curve fit the pilots alike and their CMRs differ; "
                         "run longer pilots or evaluate more often")


def select_cmr_estimator(records: Sequence[CMRRecord], tolerance: float, tolerance_mode: str = "relative",
                         schedule: PilotSchedule | None = None, candidates: Sequence[str] = CANDIDATES
                         ) -> CMRSelection:
    """Score every candidate by leave-one-budget-out on the pilots and refit the best on all of them.

    Args:
        records: pilot evaluations (the CSV of `hf-cpt cmr pilot`), the pre-CPT evaluation included.
        tolerance: allowed rise of the general loss (relative: 0.05 = 5%; absolute: nats).
        tolerance_mode: `relative` or `absolute`.
        schedule: the pilots' LR schedule; without it the learning-dynamics candidate is not scored.
        candidates: names from `CANDIDATES`.

    Raises:
        ValueError: records the fit cannot use (see [`check_records`]), fewer than 4 budgets, no curvature, no
            candidate that could be fitted.
    """
    records = list(records)
    check_records(records)
    unknown = [c for c in candidates if c not in FITTERS]
    if unknown or not candidates:
        raise ValueError(f"`candidates` must be names from {list(FITTERS)}, got {list(candidates)}")
    data = _Data.of(records)
    bound = general_bound(data.g0, tolerance, tolerance_mode)
    budgets = sorted(set(data.t.tolist()))
    if len(budgets) < 4:
        raise ValueError(f"{len(budgets)} token budgets: choosing the estimator by leave-one-budget-out needs >= 4 "
                         "(3 to fit, 1 to score); evaluate the pilots more often (`hf-cpt cmr pilot --budgets 8`)")
    check_curvature(records)
    ratio_range = (float(data.r.min()), float(data.r.max()))
    fit_b, score_b = _split_budgets(budgets)
    base = [x for x in records if x.tokens == 0]
    short = base + [x for x in records if 0 < x.tokens <= fit_b[-1]]
    held = [x for x in records if x.tokens in score_b]
    measured = {b: measured_ratio(records, b, bound) for b in score_b}
    crossing = [b for b, (_, status) in measured.items() if status == "ok"]
    metric = "cmr_error" if crossing else "general_rmse"
    scores, models = [], {}
    for name in candidates:
        try:
            model = FITTERS[name](short, schedule)
        except ValueError as exc:
            scores.append(CandidateScore(name, math.inf, None, math.inf, 0, f"not scored: {exc}"))
            continue
        pred = model.general(np.array([x.tokens for x in held]), np.array([x.ratio for x in held]))
        rmse = float(np.sqrt(np.mean((pred - np.array([x.general_loss for x in held])) ** 2)))
        errs = [abs(solve_ratio(model.general, b, bound, *ratio_range)[0] - measured[b][0]) for b in crossing]
        cmr_err = float(np.mean(errs)) if errs else None
        score = cmr_err if metric == "cmr_error" else rmse
        scores.append(CandidateScore(name, score if math.isfinite(rmse) else math.inf, cmr_err, rmse,
                                     model.n_params))
        models[name] = model
    ranked = sorted(scores, key=lambda c: c.score)
    best = ranked[0]
    if not math.isfinite(best.score):
        raise ValueError("no CMR candidate could be fitted to the pilots: " + "; ".join(c.note for c in scores))
    for c in scores:
        if c is not best and not c.note:
            c.note = (f"lost: held-out {metric.replace('_', ' ')} {c.score:.4f} vs {best.score:.4f} for "
                      f"`{best.name}`")
    full = FITTERS[best.name](records, schedule)
    rivals = {c.name: FITTERS[c.name](records, schedule) for c in ranked[1:]
              if math.isfinite(c.score) and c.score <= RIVAL_FACTOR * best.score}
    for name in rivals:
        next(c for c in scores if c.name == name).note += "; close enough to bound the interval"
    lobo_err = best.cmr_error if best.cmr_error is not None else _rmse_as_cmr(full, best.general_rmse,
                                                                             budgets[-1], bound, ratio_range)
    return CMRSelection(
        chosen=best.name, metric=metric, candidates=scores, model=full, tolerance=tolerance,
        tolerance_mode=tolerance_mode, bound=bound, ratio_range=ratio_range, budgets=budgets, fit_budgets=fit_b,
        score_budgets=score_b, lobo_extrapolation=math.log(score_b[-1] / fit_b[-1]), lobo_cmr_error=lobo_err,
        records=records, rivals=rivals)


def _rmse_as_cmr(model: FittedModel, rmse: float, tokens: float, bound: float, ratio_range: tuple[float, float]
                 ) -> float:
    """A general-loss error converted to CMR units through the slope dL_G/dr near the CMR."""
    r, _ = solve_ratio(model.general, tokens, bound, *ratio_range)
    lo, hi = max(ratio_range[0], r - 0.05), min(ratio_range[1], r + 0.05)
    slope = abs(float(model.general(tokens, hi) - model.general(tokens, lo))) / max(hi - lo, 1e-9)
    return float(min(1.0, rmse / max(slope, 1e-6)))


# --- prediction ----------------------------------------------------------------------------------------------------
@dataclass
class SelectedCMRPrediction:
    """The CMR at a budget from the chosen estimator, its interval, and how it was widened."""

    budget_tokens: float
    cmr: float
    interval: tuple[float, float]
    replay_ratio: float
    estimator: str
    bootstrap_samples: int
    bootstrap_interval: tuple[float, float]
    extrapolation: float  # target tokens / the pilots' largest budget
    widening: float  # added on each side of the bootstrap interval for the extrapolation

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def predict_selected_cmr(selection: CMRSelection, budget_tokens: float, bootstrap: int = 100, seed: int = 0,
                         level: float = 0.9) -> SelectedCMRPrediction:
    """The CMR at `budget_tokens` from the chosen estimator, with a `level` interval.

    Raises:
        ValueError: bad arguments, or a CMR outside the pilots' ratios (no candidate extrapolates in the ratio).
    """
    check_prediction_args(budget_tokens, bootstrap, level)
    lo_r, hi_r = selection.ratio_range
    cmr, status = solve_ratio(selection.model.general, budget_tokens, selection.bound, lo_r, hi_r)
    if status == "below":
        raise ValueError(f"the CMR at {budget_tokens:.3g} tokens is below the pilots' smallest domain share {lo_r:g} "
                         f"(`{selection.chosen}` predicts the general loss over the bound there): add pilots at "
                         "smaller domain shares (more replay)")
    if status == "above" and hi_r < 1.0:
        raise ValueError(f"the CMR at {budget_tokens:.3g} tokens is above the pilots' largest domain share {hi_r:g}: "
                         "add pilots at larger domain shares")
    samples = _bootstrap(selection, budget_tokens, bootstrap, seed)
    q = ((1 - level) / 2, (1 + level) / 2)
    # the refits' spread, centred on the point estimate (a refit may use a simpler fit than the point, e.g. one
    # momentum instead of the weighted mean over the grid)
    centre = float(np.median(samples)) if samples else cmr
    boot = ((cmr + float(np.quantile(samples, q[0])) - centre, cmr + float(np.quantile(samples, q[1])) - centre)
            if samples else (cmr, cmr))
    t_max = selection.budgets[-1]
    # the held-out error was made extrapolating lobo_extrapolation (log tokens) past the fitted budgets; the
    # target's extrapolation past the pilots scales it (linear in log tokens)
    ext = max(math.log(budget_tokens / t_max), 0.0)
    widen = selection.lobo_cmr_error * ext / max(selection.lobo_extrapolation, 1e-9)
    shapes = [m.general for m in selection.rivals.values()] + list(getattr(selection.model.general, "variants", []))
    rival = [solve_ratio(c, budget_tokens, selection.bound, lo_r, hi_r)[0] for c in shapes]
    lo, hi = min([boot[0], cmr] + rival) - widen, max([boot[1], cmr] + rival) + widen
    return SelectedCMRPrediction(budget_tokens=float(budget_tokens), cmr=cmr,
                                 interval=(float(max(lo, 0.0)), float(min(hi, 1.0))), replay_ratio=1.0 - cmr,
                                 estimator=selection.chosen, bootstrap_samples=len(samples), bootstrap_interval=boot,
                                 extrapolation=budget_tokens / t_max, widening=widen)


def _bootstrap(selection: CMRSelection, budget_tokens: float, replicates: int, seed: int) -> list[float]:
    """Wild residual bootstrap of the chosen model's general fit (residual signs flipped at random, scaled by
    sqrt(n / (n - p)) for the fitted parameters), refitted and solved for the CMR."""
    base = [x for x in selection.records if x.tokens == 0]
    trained = [x for x in selection.records if x.tokens > 0]
    t = np.array([x.tokens for x in trained])
    r = np.array([x.ratio for x in trained])
    fitted = selection.model.general(t, r)
    n, p = len(trained), selection.model.n_params
    res = (np.array([x.general_loss for x in trained]) - fitted) * math.sqrt(n / max(n - p, 1))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(replicates):
        y = fitted + rng.choice((-1.0, 1.0), n) * res
        recs = base + [CMRRecord(x.ratio, x.tokens, float(v), x.domain_loss) for x, v in zip(trained, y)]
        try:
            curve = selection.model.refit_general(recs)
        except ValueError:
            continue
        out.append(solve_ratio(curve, budget_tokens, selection.bound, *selection.ratio_range)[0])
    return out


def format_selection(selection: CMRSelection) -> list[str]:
    """Human-readable lines: the chosen estimator, every candidate's score and why the others lost."""
    lines = [(f"estimator: {selection.chosen} (chosen by leave-one-budget-out: fitted on budgets <= "
              f"{selection.fit_budgets[-1]:.3g} tokens, scored on {len(selection.score_budgets)} longer ones by "
              f"{selection.metric.replace('_', ' ')})")]
    for c in sorted(selection.candidates, key=lambda c: c.score):
        cmr = f"{c.cmr_error:.4f}" if c.cmr_error is not None else "n/a"
        mark = "*" if c.name == selection.chosen else " "
        lines.append(f" {mark} {c.name:<9} held-out CMR error {cmr}, general rmse {c.general_rmse:.4f}"
                     + (f"  ({c.note})" if c.note else ""))
    lines.append("   dcpt-cross-domain: not scored, its F / K^mu term is a constant for one model and one domain")
    return lines


def write_selection(selection: CMRSelection, prediction: SelectedCMRPrediction, path: str | Path) -> Path:
    """The selection (chosen estimator, every candidate's score and why the others lost) and the prediction as
    JSON, written to a temp file and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"selection": selection.to_dict(), "prediction": prediction.to_dict()}, indent=1,
                              default=float), encoding="utf-8")
    tmp.replace(path)
    return path


def plot_selection(selection: CMRSelection, prediction: SelectedCMRPrediction | None, path: str | Path) -> Path:
    """PNG: the pilots' general loss per share with the chosen model's curves out to the target, and the CMR the
    model gives along the budgets with the prediction and its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [x for x in selection.records if x.tokens > 0]
    t_max = max(selection.budgets[-1], prediction.budget_tokens if prediction else 0.0)
    ts = np.geomspace(selection.budgets[0], t_max, 120)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ratio in sorted({x.ratio for x in trained}):
        pts = sorted((x.tokens, x.general_loss) for x in trained if x.ratio == ratio)
        (line,) = axes[0].plot(ts, selection.model.general(ts, np.full_like(ts, ratio)), label=f"r={ratio:g}")
        axes[0].scatter([p[0] for p in pts], [p[1] for p in pts], color=line.get_color(), s=12)
    axes[0].axhline(selection.bound, color="k", ls="--", lw=1, label="tolerance")
    axes[0].set(title=f"general held-out loss ({selection.chosen})", xlabel="training tokens", ylabel="loss")
    cmrs = [solve_ratio(selection.model.general, t, selection.bound, *selection.ratio_range)[0] for t in ts]
    axes[1].plot(ts, cmrs, color="C2", label=f"CMR of `{selection.chosen}`")
    if prediction:
        lo, hi = prediction.interval
        axes[1].errorbar([prediction.budget_tokens], [prediction.cmr], yerr=[[prediction.cmr - lo], [hi - prediction.cmr]],
                         fmt="*", color="C3", ms=12, label=f"prediction {prediction.cmr:.3f} [{lo:.3f}, {hi:.3f}]")
    axes[1].set(title="critical domain share", xlabel="training tokens", ylabel="domain share r", ylim=(0, 1.02))
    for ax in axes:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    from ..plotting import save_figure

    return save_figure(fig, path)
