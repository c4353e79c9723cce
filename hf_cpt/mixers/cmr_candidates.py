"""The candidate loss models of the CMR estimator ([`hf_cpt.mixers.cmr_select`] chooses among them): each fits the
general (and, on demand, domain) held-out loss of constant-LR CMR pilots as a function of tokens T and domain share
r, and refits its general curve for the bootstrap.

    surfaces    L_G0 + F (r T)^phi - R ((1 - r) T)^rho                      hf_cpt.mixers.cmr (power laws)
    dcpt        E + B x^eta T^(-beta) + C (x + eps)^(-gamma)                 D-CPT law (Que et al. 2024, arXiv
                                                                            2406.01375), x = the set's own share
    dynamics    L_G0 - C S2 + B_r (1 - (1 + E_r S1)^(-beta_r))              learning-dynamics law (Wang et al. 2025,
                                                                            arXiv 2505.07796) on the pilots' LR areas
    saturating  L_G0 + B_r (1 - (1 + T / tau)^(-beta))                       that law's shift term alone, in tokens

Shares between the pilots' are linear interpolations of the per-share curves (`dynamics`, `saturating`); no
candidate is evaluated outside the pilots' shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dynamics import MOMENTA, annealing_area, forward_area
from ..import_utils import require
from ..schedules import RewarmConfig, lr_multiplier
from .cmr import CMRRecord, _fit_surfaces

CANDIDATES = ("surfaces", "dcpt", "dynamics", "saturating")
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

        def resid(x: np.ndarray, s1: np.ndarray = s1, s2: np.ndarray = s2) -> np.ndarray:
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
