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

from ..dynamics import MOMENTA, annealing_area, forward_area
from ..import_utils import require
from ..schedules import RewarmConfig, lr_multiplier
from .cmr import CMRRecord, _fit_surfaces, check_records, general_bound

logger = logging.getLogger(__name__)

CANDIDATES = ("surfaces", "dcpt", "dynamics", "saturating")
RIVAL_FACTOR = 2.0  # a candidate scoring within this factor of the best also bounds the interval
Curve = Callable[[Any, Any], np.ndarray]  # (tokens, domain share) -> loss


@dataclass(frozen=True)
class PilotSchedule:
    """The CMR pilots' LR schedule (constant after a linear warmup), which the learning-dynamics candidate needs.

    Args:
        tokens_per_step: training tokens per optimizer update (batch x accumulation x block x world size).
        warmup_steps: linear warmup from 0 to the peak LR.
        lr_before: the LR the checkpoint's pretraining ended at, as a fraction of the pilots' peak LR.
        pretrain_area: the pretraining forward area in updates at the peak LR, when known (None: fitted).
    """

    tokens_per_step: float
    warmup_steps: int = 0
    lr_before: float = 0.0
    pretrain_area: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.tokens_per_step, (int, float)) and self.tokens_per_step > 0):
            raise ValueError(f"`tokens_per_step` must be > 0, got {self.tokens_per_step!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.lr_before, (int, float)) and self.lr_before >= 0):
            raise ValueError(f"`lr_before` must be >= 0 (a fraction of the peak LR), got {self.lr_before!r}")
        if self.pretrain_area is not None and not self.pretrain_area > 0:
            raise ValueError(f"`pretrain_area` must be > 0 or None, got {self.pretrain_area!r}")

    def multipliers(self, steps: int) -> np.ndarray:
        """The LR of updates 1 .. `steps` as a fraction of the peak (hf_cpt's constant schedule)."""
        cfg = RewarmConfig(schedule="constant", warmup_steps=self.warmup_steps)
        total = max(steps, self.warmup_steps + 1)  # a constant run's prefix: its length does not change its LRs
        return np.array([lr_multiplier(s, cfg, total) for s in range(total)])[:steps]


# --- data --------------------------------------------------------------------------------------------------------
@dataclass
class _Data:
    g0: float
    t: np.ndarray
    r: np.ndarray
    g: np.ndarray
    d: np.ndarray

    @classmethod
    def of(cls, records: Sequence[CMRRecord]) -> _Data:
        base = [x for x in records if x.tokens == 0]
        trained = [x for x in records if x.tokens > 0]
        return cls(float(np.mean([x.general_loss for x in base])), np.array([x.tokens for x in trained], float),
                   np.array([x.ratio for x in trained], float), np.array([x.general_loss for x in trained], float),
                   np.array([x.domain_loss for x in trained], float))


@dataclass
class FittedModel:
    """One candidate fitted to records: `general(tokens, share)` and `domain(tokens, share)` loss curves."""

    name: str
    general: Curve
    fit_domain: Callable[[], Curve] = field(repr=False)
    n_params: int
    refit_general: Callable[[Sequence[CMRRecord]], Curve] = field(repr=False)

    def domain(self, tokens: Any, ratio: Any) -> np.ndarray:
        """The domain loss curve (fitted on first use: the selection scores the general curve only)."""
        if not hasattr(self, "_domain"):
            self._domain = self.fit_domain()
        return self._domain(tokens, ratio)


def _least_squares(fun: Callable, starts: Sequence[Sequence[float]], lo: Sequence[float], hi: Sequence[float]
                   ) -> np.ndarray:
    require("scipy", "Fitting the CMR candidates")
    from scipy.optimize import least_squares

    lo_a, hi_a = np.asarray(lo, float), np.asarray(hi, float)
    best = None
    for x0 in starts:
        with np.errstate(all="ignore"):
            try:
                res = least_squares(fun, np.clip(np.asarray(x0, float), lo_a, hi_a), bounds=(lo_a, hi_a),
                                    max_nfev=400)
            except ValueError:  # a start the residual cannot evaluate (overflow): try the next
                continue
        if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise ValueError("no starting point could be fitted")
    return best.x


# --- candidates --------------------------------------------------------------------------------------------------
def fit_surfaces_model(records: Sequence[CMRRecord], schedule: PilotSchedule | None = None) -> FittedModel:
    """The power-law surfaces of [`hf_cpt.mixers.cmr`]."""
    law, _, _ = _fit_surfaces(records)

    def refit(recs: Sequence[CMRRecord]) -> Curve:
        return _fit_surfaces(recs, start=law)[0].general_loss

    return FittedModel("surfaces", law.general_loss, lambda: law.domain_loss, 8, refit)


def _dcpt_curve(p: np.ndarray, scale: float, general: bool) -> Curve:
    e, b, eta, beta, c, eps, gamma = p

    def curve(tokens: Any, ratio: Any) -> np.ndarray:
        t = np.asarray(tokens, float) / scale
        x = 1.0 - np.asarray(ratio, float) if general else np.asarray(ratio, float)
        with np.errstate(all="ignore"):
            return e + b * np.power(np.maximum(x, 0), eta) * np.power(t, -beta) + c * np.power(x + eps, -gamma)
    return curve


def _fit_dcpt_set(data: _Data, y: np.ndarray, general: bool, start: np.ndarray | None = None) -> np.ndarray:
    scale = float(data.t.max())

    def resid(p: np.ndarray) -> np.ndarray:
        return _dcpt_curve(p, scale, general)(data.t, data.r) - y

    span = max(float(np.ptp(y)), 1e-3)
    starts = ([start] if start is not None else
              [(float(y.min()) - 0.1 * span, sign * span, 1.0, beta, 0.1 * span, 0.1, 0.5)
               for sign in (1.0, -1.0) for beta in (0.3, 1.0)])
    lo = (0.0, -np.inf, 0.0, 1e-3, 0.0, 1e-3, 0.0)
    hi = (np.inf, np.inf, 3.0, 3.0, np.inf, 10.0, 5.0)
    return _least_squares(resid, starts, lo, hi)


def fit_dcpt_model(records: Sequence[CMRRecord], schedule: PilotSchedule | None = None) -> FittedModel:
    """The D-CPT law (one model size), one fit per held-out set on the set's own share of the CPT data."""
    data = _Data.of(records)
    scale = float(data.t.max())
    pg = _fit_dcpt_set(data, data.g, True)

    def refit(recs: Sequence[CMRRecord]) -> Curve:
        d = _Data.of(recs)
        return _dcpt_curve(_fit_dcpt_set(d, d.g, True, start=pg), float(d.t.max()), True)

    return FittedModel("dcpt", _dcpt_curve(pg, scale, True),
                       lambda: _dcpt_curve(_fit_dcpt_set(data, data.d, False), scale, False), 7, refit)


@dataclass
class _DynamicsParams:
    """The constant-LR dynamics law's parameters for one held-out set (see `_dynamics_loss`)."""

    start: float  # the pre-CPT loss (known)
    floor: float
    exponent: float
    anneal: float
    pretrain_area: float
    shift: np.ndarray  # per share
    shift_exp: np.ndarray
    shift_rate: np.ndarray


def _dynamics_loss(p: _DynamicsParams, s1: np.ndarray, s2: np.ndarray, share: np.ndarray, group: np.ndarray
                   ) -> np.ndarray:
    """L = L0 + (L_start - L0) ((S_pt + g S1) / S_pt)^(-alpha) - C S2 + B_r (1 - (1 + E_r S1)^(-beta_r)), g the
    general share 1 - r: the continued-pretraining curve advances with the replayed tokens' forward area only
    (with no replay it stays where pretraining left it), the shift term is the distribution shift per share."""
    pre = (p.start - p.floor) * ((p.pretrain_area + (1.0 - share) * s1) / p.pretrain_area) ** (-p.exponent)
    shift = p.shift[group] * (1.0 - (1.0 + p.shift_rate[group] * s1) ** (-p.shift_exp[group]))
    return p.floor + pre - p.anneal * s2 + shift


def _dynamics_set(data: _Data, y: np.ndarray, start: float, schedule: PilotSchedule, momenta: Sequence[float],
                  warm: _DynamicsParams | None = None) -> tuple[Curve, float, _DynamicsParams]:
    """The learning-dynamics law for one held-out set on constant-LR pilots, fitted per momentum on the grid (the
    lowest squared error kept), as a (tokens, share) curve; shares between the fitted ones interpolate linearly."""
    shares = sorted(set(data.r.tolist()))
    n = len(shares)
    steps = np.rint(data.t / schedule.tokens_per_step).astype(int)
    group = np.array([shares.index(x) for x in data.r])
    lrs = schedule.multipliers(int(steps.max()))
    fixed_area = schedule.pretrain_area
    typical = max(float(np.median(forward_area(lrs)[steps])), 1e-6)

    flat = fixed_area is None  # S_pt unknown: one schedule cannot identify the continued-pretraining curve

    def unpack(x: np.ndarray) -> _DynamicsParams:
        k = 1 if flat else 3
        head = (start, 0.0) if flat else (float(x[0]), float(x[1]))
        return _DynamicsParams(start, head[0], head[1], float(x[k - 1]), fixed_area or 1.0, x[k:k + n],
                               x[k + n:k + 2 * n], x[k + 2 * n:k + 3 * n])

    lo = ([] if flat else [0.0, 1e-3]) + [0.0] + [-50.0] * n + [1e-2] * n + [1e-8] * n
    hi = ([] if flat else [max(start, float(y.min())), 5.0]) + [np.inf] + [50.0] * n + [10.0] * n + [1e4] * n
    if warm is not None:
        starts = [([] if flat else [warm.floor, warm.exponent]) + [warm.anneal, *warm.shift, *warm.shift_exp,
                                                                   *warm.shift_rate]]
    else:
        last = [float(np.mean(y[(group == i) & (steps == steps[group == i].max())])) - start for i in range(n)]
        starts = [([] if flat else [0.5 * float(y.min()), alpha]) + [1e-3, *last, *[1.0] * n, *[rate / typical] * n]
                  for alpha, rate in ((0.5, 1.0), (1.0, 0.1), (0.3, 10.0))]
    fits = []
    for m in momenta:
        s1, s2 = forward_area(lrs)[steps], annealing_area(lrs, m, schedule.lr_before)[steps]

        def resid(x: np.ndarray) -> np.ndarray:
            return _dynamics_loss(unpack(x), s1, s2, data.r, group) - y

        try:
            x = _least_squares(resid, starts, lo, hi)
        except ValueError:
            continue
        cost = float(np.sum(resid(x) ** 2))
        if np.isfinite(cost):
            fits.append((cost, float(m), unpack(x)))
    if not fits:
        raise ValueError("the learning-dynamics law could not be fitted from any starting point")
    # one schedule does not pin the momentum (the re-warm's time scale): every momentum on the grid is kept with
    # its Akaike weight exp(-delta / 2), delta = n ln(RSS / RSS_min), and the curve is their weighted mean; the
    # momenta with delta <= 3.84 (the 95 % profile-likelihood set) are the variants that bound the interval
    rss_min = max(min(f[0] for f in fits), 1e-300)
    delta = [len(y) * math.log(max(f[0], 1e-300) / rss_min) for f in fits]
    weights = np.exp(-0.5 * np.asarray(delta))
    weights /= weights.sum()
    curves = [_dynamics_curve(p, m, shares, schedule) for _, m, p in fits]

    def curve(tokens: Any, ratio: Any) -> np.ndarray:
        return np.sum([w * c(tokens, ratio) for w, c in zip(weights, curves) if w > 1e-6], axis=0)

    best = int(np.argmin([f[0] for f in fits]))
    curve.variants = [c for c, dl in zip(curves, delta) if dl <= 3.84]  # type: ignore[attr-defined]
    return curve, fits[best][1], fits[best][2]


def _dynamics_curve(params: _DynamicsParams, momentum: float, shares: list, schedule: PilotSchedule) -> Curve:
    def curve(tokens: Any, ratio: Any) -> np.ndarray:
        t, r = np.broadcast_arrays(np.asarray(tokens, float), np.asarray(ratio, float))
        k = np.rint(t / schedule.tokens_per_step).astype(int).reshape(-1)
        run = schedule.multipliers(int(k.max()) if k.size else 0)
        s1, s2 = forward_area(run)[k], annealing_area(run, momentum, schedule.lr_before)[k]
        curves = np.stack([_dynamics_loss(params, s1, s2, np.full_like(s1, sh), np.full(len(s1), i))
                           for i, sh in enumerate(shares)])
        return _interpolate_shares(shares, curves, r.reshape(-1)).reshape(t.shape)
    return curve


def fit_dynamics_model(records: Sequence[CMRRecord], schedule: PilotSchedule | None = None,
                       momenta: Sequence[float] = MOMENTA) -> FittedModel:
    """The learning-dynamics law on the constant-LR pilots (needs their `schedule`)."""
    if schedule is None:
        raise ValueError("the learning-dynamics candidate needs the pilots' LR schedule (`PilotSchedule`: tokens "
                         "per update, warmup steps, the checkpoint's final LR)")
    data = _Data.of(records)
    general, momentum, params = _dynamics_set(data, data.g, data.g0, schedule, momenta)
    d0 = float(np.mean([x.domain_loss for x in records if x.tokens == 0]))

    def refit(recs: Sequence[CMRRecord]) -> Curve:  # the bootstrap: warm-started, the momentum kept
        d = _Data.of(recs)
        return _dynamics_set(d, d.g, d.g0, schedule, [momentum], warm=params)[0]

    n = len(set(data.r.tolist()))
    return FittedModel("dynamics", general, lambda: _dynamics_set(data, data.d, d0, schedule, momenta)[0],
                       3 * n + (1 if schedule.pretrain_area is None else 3), refit)


def _interpolate_shares(shares: Sequence[float], values: np.ndarray, r: np.ndarray) -> np.ndarray:
    """values[i] belongs to shares[i] (first axis); linear interpolation in r, NaN outside the shares."""
    sh = np.asarray(shares, float)
    hi = np.clip(np.searchsorted(sh, r, side="left"), 1, len(sh) - 1)
    w = np.clip((r - sh[hi - 1]) / (sh[hi] - sh[hi - 1]), 0.0, 1.0)
    out = (1 - w) * np.take_along_axis(values, (hi - 1)[None], 0)[0] + w * np.take_along_axis(values, hi[None], 0)[0]
    return np.where((r < sh[0] - 1e-9) | (r > sh[-1] + 1e-9), np.nan, out)


def _fit_saturating_set(data: _Data, y: np.ndarray, start: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    shares = sorted(set(data.r.tolist()))
    group = np.array([shares.index(x) for x in data.r])
    scale = float(data.t.max())

    def resid(p: np.ndarray) -> np.ndarray:
        tau, beta, b = p[0], p[1], p[2:]
        with np.errstate(all="ignore"):
            return data.g0 + b[group] * (1 - (1 + data.t / (scale * tau)) ** (-beta)) - y

    if start is not None:
        starts = [start]
    else:
        last = np.array([float(np.mean(y[(group == i) & (data.t == data.t[group == i].max())])) - data.g0
                         for i in range(len(shares))])
        starts = [np.concatenate([[tau, beta], last * k]) for tau, beta, k in ((0.3, 1.0, 1.5), (1.0, 0.5, 2.0),
                                                                               (0.1, 2.0, 1.1))]
    lo = [1e-4, 0.05] + [-50.0] * len(shares)
    hi = [1e3, 5.0] + [50.0] * len(shares)
    return _least_squares(resid, starts, lo, hi), shares


def _saturating_curve(p: np.ndarray, shares: list, g0: float, scale: float) -> Curve:
    def curve(tokens: Any, ratio: Any) -> np.ndarray:
        t, r = np.broadcast_arrays(np.asarray(tokens, float), np.asarray(ratio, float))
        rise = 1 - (1 + t / (scale * p[0])) ** (-p[1])
        return _interpolate_shares(shares, g0 + np.asarray(p[2:])[:, None] * rise.reshape(1, -1),
                                   r.reshape(-1)).reshape(t.shape)
    return curve


def fit_saturating_model(records: Sequence[CMRRecord], schedule: PilotSchedule | None = None) -> FittedModel:
    """The learning-dynamics law's distribution-shift term alone, in tokens: L_G = L_G0 + B_r (1 - (1 + T / tau)^
    (-beta)), tau and beta shared, B_r per pilot share (linear in between): a general loss that jumps or drifts and
    then saturates (the continued-pretraining curve taken as flat over the CPT run, S_pt >> S1)."""
    data = _Data.of(records)
    scale = float(data.t.max())
    p, shares = _fit_saturating_set(data, data.g)

    def refit(recs: Sequence[CMRRecord]) -> Curve:
        d = _Data.of(recs)
        q, sh = _fit_saturating_set(d, d.g, start=p)
        return _saturating_curve(q, sh, d.g0, float(d.t.max()))

    def domain() -> Curve:  # the domain loss: the same form, starting from the domain baseline
        dd = _Data(float(np.mean([x.domain_loss for x in records if x.tokens == 0])), data.t, data.r, data.d,
                   data.d)
        q, sh = _fit_saturating_set(dd, dd.g)
        return _saturating_curve(q, sh, dd.g0, scale)

    return FittedModel("saturating", _saturating_curve(p, shares, data.g0, scale), domain, 2 + len(shares), refit)


FITTERS: dict[str, Callable[..., FittedModel]] = {"surfaces": fit_surfaces_model, "dcpt": fit_dcpt_model,
                                                  "dynamics": fit_dynamics_model, "saturating": fit_saturating_model}


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
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, (int, float)) or not budget_tokens > 0:
        raise ValueError(f"`budget_tokens` must be > 0, got {budget_tokens!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"`bootstrap` must be an integer >= 0, got {bootstrap!r}")
    if not 0 < level < 1:
        raise ValueError(f"`level` must be in (0, 1), got {level!r}")
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
    lines = [f"estimator: {selection.chosen} (chosen by leave-one-budget-out: fitted on budgets <= "
             f"{selection.fit_budgets[-1]:.3g} tokens, scored on {len(selection.score_budgets)} longer ones by "
             f"{selection.metric.replace('_', ' ')})"]
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
