"""CPT learning dynamics: the general and domain held-out loss at every step of a continual-pretraining run, for
any LR schedule, predicted from a few short pilot runs at each replay ratio.

Paper: "Learning Dynamics in Continual Pre-Training for Large Language Models" (Wang et al., ICML 2025,
arXiv 2505.07796). A CPT loss curve moves from the curve the model would have followed on its pretraining data to
a new one on the CPT data; the paper writes it as the LR-annealing scaling law (Tissue et al., 2024: loss as a
power law of the *forward area* S1, the sum of LRs, minus a term linear in the *annealing area* S2) continued from
pretraining, plus a distribution-shift term that grows with the CPT forward area and saturates.

Per held-out set (general, domain) and replay ratio, after k optimizer updates with learning rates eta_0 ..
eta_{k-1}:

    L(k)  = L0 + A * (S_pt + S1(k))^(-alpha) - C * S2(k) + B * (1 - (1 + E * S1(k))^(-beta))

    S1(k) = sum_{i<k} eta_i / u                                   forward area (u = `lr_unit`)
    m_i   = lam * m_{i-1} + (eta_{i-1} - eta_i) / u,  m_{-1} = 0, eta_{-1} = `lr_before`
    S2(k) = sum_{i<k} m_i                                         annealing area, with momentum lam

Areas are counted in steps at the reference LR u (the pilots' largest peak LR), so the parameters are of order
one. `lr_before` is the LR the checkpoint ended its pretraining at: re-warming from it makes S2 negative, which
is the loss bump at the start of CPT. S_pt, the pretraining forward area, is given when known (a model you
pretrained) or fitted. The shift amplitude B is positive for the general set (forgetting) and negative for the
domain set (learning).

Replay ratios: pilots are grouped by domain share p = 1 - replay ratio and, as in the paper, each replay ratio
gets its own parameters and momentum. With `shared_curve=True` the continued-pretraining curve, the annealing term
(L0, A, alpha, S_pt, C) and lam are shared and only the shift (B, beta, E) is per ratio: fewer
parameters and identifiable terms, but in the controlled lab replay also moves that curve (general tokens continue
pretraining) and the per-ratio fit predicted better (docs/benchmarks.md, issue 23). A share between two fitted
shares is predicted by linear interpolation of their curves; shares outside the pilots' range are refused.

Parameters and the bounds the fit keeps them in (per held-out set and ratio; lam on a grid):

    L0     loss floor              [0, min observed loss]
    A      pretraining scale       [0, inf)          alpha  its exponent       [1e-3, 5]
    C      annealing coefficient   [0, inf)
    B      shift amplitude         [-50, 50]         beta   shift exponent     [1e-2, 10]
    E      shift rate              [1e-8, 1e4]
    S_pt   pretraining area        [1e-3, 1e9] when fitted
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .import_utils import require
from .registry import Technique, names

MOMENTA = (0.0, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
PARAMS = ("floor", "scale", "exponent", "anneal", "shift", "shift_exp", "shift_rate", "pretrain_area")


@dataclass
class LossLaw:
    """The law's parameters for one held-out set at one replay ratio (see the module docstring; areas in steps at
    `lr_unit`)."""

    floor: float
    scale: float
    exponent: float
    anneal: float
    shift: float
    shift_exp: float
    shift_rate: float
    pretrain_area: float

    def loss(self, s1: Any, s2: Any) -> np.ndarray:
        """L at forward areas `s1` and annealing areas `s2` (broadcast)."""
        s1, s2 = np.asarray(s1, dtype=float), np.asarray(s2, dtype=float)
        pre = self.scale * (self.pretrain_area + s1) ** (-self.exponent)
        shift = self.shift * (1.0 - (1.0 + self.shift_rate * s1) ** (-self.shift_exp))
        return self.floor + pre - self.anneal * s2 + shift


def forward_area(lrs: Sequence[float], lr_unit: float = 1.0) -> np.ndarray:
    """S1 after 0, 1, ..., n updates (n + 1 values): the running sum of the LRs, in steps at `lr_unit`."""
    eta = np.asarray(lrs, dtype=float) / lr_unit
    return np.concatenate([[0.0], np.cumsum(eta)])


def annealing_area(lrs: Sequence[float], momentum: float, lr_before: float = 0.0,
                   lr_unit: float = 1.0) -> np.ndarray:
    """S2 after 0, 1, ..., n updates: the running sum of the LR drops, each smoothed by `momentum` (lam).

    m_i = lam m_{i-1} + (eta_{i-1} - eta_i), eta_{-1} = `lr_before`; S2(k) = sum_{i<k} m_i. A drop of the LR keeps
    lowering the loss for ~1 / (1 - lam) steps after it happened, which is why the decay phase of a schedule pays
    off gradually.
    """
    eta = np.asarray(lrs, dtype=float) / lr_unit
    if eta.size == 0:
        return np.zeros(1)
    drops = np.concatenate([[lr_before / lr_unit], eta[:-1]]) - eta
    if momentum > 0:
        require("scipy", "The annealing area")
        from scipy.signal import lfilter

        m = lfilter([1.0], [1.0, -momentum], drops)
    else:
        m = drops
    return np.concatenate([[0.0], np.cumsum(m)])


@dataclass(frozen=True)
class PilotCurve:
    """One pilot run: the LR of each optimizer update, its domain share and its held-out losses at `steps`.

    Args:
        name: a label for messages and plots (e.g. the run directory).
        schedule: the LR schedule's name (`constant`, `cosine`, `wsd`, ...); each share needs >= 2 of them.
        lrs: the LR used by update 1, 2, ..., n (n >= the last evaluated step).
        domain_share: share of domain tokens, 1 - replay ratio.
        steps: evaluation steps (0 = before training).
        general: general held-out loss at each step.
        domain: domain held-out loss at each step.
    """

    name: str
    schedule: str
    lrs: tuple[float, ...]
    domain_share: float
    steps: tuple[int, ...]
    general: tuple[float, ...]
    domain: tuple[float, ...]


@dataclass
class DynamicsLaw:
    """The law at one replay ratio: one [`LossLaw`] per held-out set and the settings of the areas."""

    general: LossLaw
    domain: LossLaw
    momentum: float
    lr_unit: float
    lr_before: float
    domain_share: float

    def predict(self, lrs: Sequence[float], steps: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """General and domain loss after each of `steps` updates (default 0 .. len(lrs)) of a run with `lrs`."""
        s1 = forward_area(lrs, self.lr_unit)
        s2 = annealing_area(lrs, self.momentum, self.lr_before, self.lr_unit)
        idx = np.arange(len(s1)) if steps is None else np.asarray(steps, dtype=int)
        if idx.size and (idx.min() < 0 or idx.max() >= len(s1)):
            raise ValueError(f"`steps` must lie in [0, {len(s1) - 1}] (the run has {len(lrs)} updates)")
        return self.general.loss(s1[idx], s2[idx]), self.domain.loss(s1[idx], s2[idx])


def predict_curves(laws: Sequence[DynamicsLaw], lrs: Sequence[float], domain_share: float,
                   steps: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """General and domain curves at `domain_share` from per-share laws: the fitted share's law, or the linear
    interpolation between the two fitted shares around it.

    Raises:
        ValueError: `domain_share` outside the fitted shares (the pilots say nothing there).
    """
    ordered = sorted(laws, key=lambda law: law.domain_share)
    shares = [law.domain_share for law in ordered]
    for law in ordered:
        if abs(law.domain_share - domain_share) < 1e-9:
            return law.predict(lrs, steps)
    if not shares[0] < domain_share < shares[-1]:
        raise ValueError(f"replay ratio {1 - domain_share:g} is outside the pilots' replay ratios "
                         f"[{1 - shares[-1]:g}, {1 - shares[0]:g}]: add pilots at that ratio")
    hi = next(i for i, s in enumerate(shares) if s > domain_share)
    lo_law, hi_law = ordered[hi - 1], ordered[hi]
    w = (domain_share - lo_law.domain_share) / (hi_law.domain_share - lo_law.domain_share)
    (g0, d0), (g1, d1) = lo_law.predict(lrs, steps), hi_law.predict(lrs, steps)
    return (1 - w) * g0 + w * g1, (1 - w) * d0 + w * d1


@dataclass
class DynamicsFit:
    """Result of [`fit_dynamics`]: one law per replay ratio, the residuals, and what the pilots covered (to refuse
    extrapolating where they say nothing)."""

    laws: list[DynamicsLaw]
    rmse_general: float
    rmse_domain: float
    max_error_general: float
    max_error_domain: float
    shares: list[float]
    schedules: list[str]
    peak_lrs: list[float]
    max_steps: int
    start_general: float
    start_domain: float
    fitted_pretrain_area: bool
    shared_curve: bool
    at_bounds: list[str]
    pilots: list[PilotCurve] = field(repr=False, default_factory=list)

    def predict(self, lrs: Sequence[float], domain_share: float,
                steps: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """General and domain curves of a run with `lrs` at `domain_share` (see [`predict_curves`])."""
        return predict_curves(self.laws, lrs, domain_share, steps)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("pilots")
        return out


# --- checks -----------------------------------------------------------------------------------------------------
def _finite(name: str, values: Sequence[float]) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} holds {v!r}: every loss and LR must be a finite number (a diverged pilot? "
                             "rerun it with a lower learning rate)")


def _check_curve(p: PilotCurve) -> None:
    where = f"pilot {p.name!r}"
    if not 0.0 <= p.domain_share <= 1.0:
        raise ValueError(f"{where}: `domain_share` must be in [0, 1], got {p.domain_share}")
    _finite(f"{where} `lrs`", p.lrs)
    if any(x < 0 for x in p.lrs):
        raise ValueError(f"{where}: `lrs` has a negative learning rate")
    _finite(f"{where} `general`", p.general)
    _finite(f"{where} `domain`", p.domain)
    if not (len(p.steps) == len(p.general) == len(p.domain)):
        raise ValueError(f"{where}: `steps`, `general` and `domain` must have one value per evaluation, got "
                         f"{len(p.steps)}, {len(p.general)}, {len(p.domain)}")
    if list(p.steps) != sorted(set(p.steps)) or (p.steps and (p.steps[0] < 0 or p.steps[-1] > len(p.lrs))):
        raise ValueError(f"{where}: `steps` must increase within [0, {len(p.lrs)}] (the run's updates), got "
                         f"{list(p.steps)[:5]}...")


def check_pilots(pilots: Sequence[PilotCurve]) -> None:
    """Refuse pilots the law cannot be fitted to, with the reason and the fix.

    Raises:
        ValueError: fewer than 2 pilots, a replay ratio whose pilots use one LR schedule only, malformed curves
            (steps out of range, lengths that differ, non-finite values), too few evaluations for the parameters
            at a replay ratio, or flat losses.
    """
    if len(pilots) < 2:
        raise ValueError(f"{len(pilots)} pilot run(s): the learning-dynamics fit needs >= 2 pilots with different "
                         "LR schedules (e.g. a constant and a cosine run)")
    for p in pilots:
        _check_curve(p)
    for share, group in sorted(_by_share(pilots).items()):
        where = f"at replay ratio {1 - share:g}" if len(_by_share(pilots)) > 1 else ""
        schedules = sorted({p.schedule for p in group})
        if len(schedules) < 2:
            raise ValueError(f"the pilots {where + ' ' if where else ''}use one LR schedule only ({schedules[0]}): "
                             "the law tells the forward area from the annealing area only with >= 2 schedules per "
                             "replay ratio; add e.g. a constant and a cosine pilot")
        trained = sum(sum(1 for s in p.steps if s > 0) for p in group)
        need = 2 * len(PARAMS)
        if trained < need:
            raise ValueError(f"too few evaluations{' ' + where if where else ''}: {trained} after step 0, the law "
                             f"needs >= {need} (8 parameters per held-out set and ratio); evaluate more often "
                             "(`train.eval_steps`) or add pilots")
        for name in ("general", "domain"):
            values = [v for p in group for v in getattr(p, name)]
            if np.ptp(values) < 1e-6:
                raise ValueError(f"the {name} held-out loss does not change {where + ' ' if where else ''}across "
                                 f"the pilots ({values[0]:.4f}): nothing to fit; train the pilots longer or with a "
                                 "larger LR")


def _by_share(pilots: Sequence[PilotCurve]) -> dict[float, list[PilotCurve]]:
    groups: dict[float, list[PilotCurve]] = {}
    for p in pilots:
        groups.setdefault(round(float(p.domain_share), 9), []).append(p)
    return groups


# --- fitting -----------------------------------------------------------------------------------------------------
SHARED = ("floor", "scale", "exponent", "anneal", "pretrain_area")  # `shared_curve`: one value for all ratios


@dataclass
class _Points:
    s1: np.ndarray
    s2: np.ndarray
    group: np.ndarray
    y: dict[str, np.ndarray]


def _points(groups: list[list[PilotCurve]], momentum: float, lr_before: float, lr_unit: float) -> _Points:
    cols: dict[str, list] = {"s1": [], "s2": [], "group": [], "general": [], "domain": []}
    for gi, group in enumerate(groups):
        for pilot in group:
            s1 = forward_area(pilot.lrs, lr_unit)
            s2 = annealing_area(pilot.lrs, momentum, lr_before, lr_unit)
            idx = np.asarray(pilot.steps, dtype=int)
            cols["s1"].append(s1[idx])
            cols["s2"].append(s2[idx])
            cols["group"].append(np.full(len(idx), gi))
            cols["general"].append(np.asarray(pilot.general, dtype=float))
            cols["domain"].append(np.asarray(pilot.domain, dtype=float))
    c = {k: np.concatenate(v) for k, v in cols.items()}
    return _Points(c["s1"], c["s2"], c["group"].astype(int), {"general": c["general"], "domain": c["domain"]})


class _Layout:
    """Where each parameter sits in the optimiser's vector: the shared ones once, the shift ones per share."""

    def __init__(self, n_groups: int, pretrain_area: float | None, shared_curve: bool) -> None:
        self.fixed = {"pretrain_area": float(pretrain_area)} if pretrain_area is not None else {}
        self.shared = [n for n in SHARED if n not in self.fixed] if shared_curve else []
        self.per_share = [n for n in PARAMS if n not in self.fixed and n not in self.shared]
        self.n_groups = n_groups
        self.size = len(self.shared) + len(self.per_share) * n_groups

    def laws(self, theta: np.ndarray) -> list[LossLaw]:
        shared = dict(self.fixed, **{n: float(v) for n, v in zip(self.shared, theta)})
        k, w = len(self.shared), len(self.per_share)
        return [LossLaw(**shared, **{n: float(theta[k + w * g + j]) for j, n in enumerate(self.per_share)})
                for g in range(self.n_groups)]

    def vector(self, laws: list[LossLaw]) -> np.ndarray:
        return np.array([getattr(laws[0], n) for n in self.shared]
                        + [getattr(law, n) for law in laws for n in self.per_share], dtype=float)

    def names(self) -> list[str]:
        return self.shared + [n for _ in range(self.n_groups) for n in self.per_share]


def _bounds(name: str, y: np.ndarray) -> tuple[float, float]:
    return {"floor": (0.0, float(y.min())), "scale": (0.0, np.inf), "exponent": (1e-3, 5.0), "anneal": (0.0, np.inf),
            "shift": (-50.0, 50.0), "shift_exp": (1e-2, 10.0), "shift_rate": (1e-8, 1e4),
            "pretrain_area": (1e-3, 1e9)}[name]


def _starts(pts: _Points, y: np.ndarray, layout: _Layout, pretrain_area: float | None) -> list[list[LossLaw]]:
    start_loss = float(np.mean(y[pts.s1 == 0])) if np.any(pts.s1 == 0) else float(y.max())
    s_pt = pretrain_area if pretrain_area is not None else 10.0 * max(float(pts.s1.max()), 1.0)
    typical = max(float(np.median(pts.s1[pts.s1 > 0])), 1e-9) if np.any(pts.s1 > 0) else 1.0
    out = []
    for exponent, rate in ((0.5, 1.0), (1.0, 0.1), (0.3, 10.0)):
        floor = 0.5 * float(y.min())
        laws = []
        for g in range(layout.n_groups):
            mine = pts.group == g
            last = float(y[mine][np.argmax(pts.s1[mine])])
            laws.append(LossLaw(floor=floor, scale=(start_loss - floor) * s_pt ** exponent, exponent=exponent,
                                anneal=1e-3, shift=(last - start_loss) or 0.1, shift_exp=1.0,
                                shift_rate=rate / typical, pretrain_area=s_pt))
        out.append(laws)
    return out


def _gradient(law: LossLaw, s1: np.ndarray, s2: np.ndarray) -> dict[str, np.ndarray]:
    """d L / d parameter at every point (the fit's analytic Jacobian)."""
    base = law.pretrain_area + s1
    pre = base ** (-law.exponent)
    grow = 1.0 + law.shift_rate * s1
    decay = grow ** (-law.shift_exp)
    return {"floor": np.ones_like(base), "scale": pre, "exponent": -law.scale * pre * np.log(base),
            "anneal": -s2, "shift": 1.0 - decay, "shift_exp": law.shift * decay * np.log(grow),
            "shift_rate": law.shift * law.shift_exp * s1 * decay / grow,
            "pretrain_area": -law.exponent * law.scale * pre / base}


def _fit_one(pts: _Points, name: str, layout: _Layout, starts: list[list[LossLaw]]
             ) -> tuple[list[LossLaw], float, list[str]]:
    require("scipy", "Fitting the learning-dynamics law")
    from scipy.optimize import least_squares

    y = pts.y[name]
    names = layout.names()
    lo = np.array([_bounds(n, y)[0] for n in names])
    hi = np.array([_bounds(n, y)[1] for n in names])
    masks = [pts.group == g for g in range(layout.n_groups)]

    def predict(theta: np.ndarray) -> np.ndarray:
        out = np.empty_like(y)
        for law, m in zip(layout.laws(theta), masks):
            out[m] = law.loss(pts.s1[m], pts.s2[m])
        return out

    def jacobian(theta: np.ndarray) -> np.ndarray:
        jac = np.zeros((len(y), layout.size))
        k, w = len(layout.shared), len(layout.per_share)
        for g, (law, m) in enumerate(zip(layout.laws(theta), masks)):
            cols = _gradient(law, pts.s1[m], pts.s2[m])
            for j, n in enumerate(layout.shared):
                jac[m, j] = cols[n]
            for j, n in enumerate(layout.per_share):
                jac[m, k + w * g + j] = cols[n]
        return jac

    best = None
    for start in starts:
        x0 = np.clip(layout.vector(start), lo, hi)
        with np.errstate(all="ignore"):
            try:
                res = least_squares(lambda t: predict(t) - y, x0, jac=jacobian, bounds=(lo, hi), x_scale="jac",
                                    max_nfev=300)
            except ValueError:  # a start the residual cannot evaluate (overflow): try the next
                continue
        if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise ValueError(f"the {name} loss curves could not be fitted from any starting point: check the pilots")
    at_bounds = [n for n, v, a, b in zip(names, best.x, lo, hi)
                 if n not in ("floor", "anneal", "scale") and (abs(v - a) <= 1e-6 * max(1, abs(a))
                                                               or abs(v - b) <= 1e-6 * max(1, abs(b)))]
    return layout.laws(best.x), float(best.cost), sorted(set(at_bounds))


def _fit_block(groups: list[list[PilotCurve]], shares: list[float], pretrain_area: float | None, lr_before: float,
               momenta: Sequence[float], unit: float, shared_curve: bool,
               warm: list[DynamicsLaw] | None) -> tuple[list[DynamicsLaw], list[str]]:
    """Fit the replay ratios of `groups` together (one momentum for them, chosen on the grid)."""
    layout = _Layout(len(groups), pretrain_area, shared_curve)
    best: tuple | None = None
    for m in ([warm[0].momentum] if warm is not None else momenta):
        pts = _points(groups, m, lr_before, unit)
        fitted, cost, hit = {}, 0.0, []
        for name in ("general", "domain"):
            starts = ([[getattr(law, name) for law in warm]] if warm is not None
                      else _starts(pts, pts.y[name], layout, pretrain_area))
            fitted[name], c, h = _fit_one(pts, name, layout, starts)
            cost += c
            where = f"replay {1 - shares[0]:g} " if len(shares) == 1 else ""
            hit += [f"{where}{name}.{n}" for n in h]
        if best is None or cost < best[0]:
            best = (cost, m, fitted, hit)
    _, m, fitted, hit = best
    return [DynamicsLaw(general=g, domain=d, momentum=float(m), lr_unit=unit, lr_before=float(lr_before),
                        domain_share=share) for g, d, share in zip(fitted["general"], fitted["domain"], shares)], hit


def fit_dynamics(pilots: Sequence[PilotCurve], pretrain_area: float | None = None, lr_before: float = 0.0,
                 momenta: Sequence[float] = MOMENTA, lr_unit: float | None = None, shared_curve: bool = False,
                 warm_start: Sequence[DynamicsLaw] | None = None) -> DynamicsFit:
    """Fit the learning-dynamics law to pilot runs (least squares per held-out set with an analytic Jacobian and
    a few starts; the momentum on a grid). Each replay ratio gets its own parameters and momentum, or with
    `shared_curve` only its own distribution shift (B, beta, E).

    Args:
        pilots: >= 2 runs from the same checkpoint; at each replay ratio >= 2 LR schedules (e.g. a constant and a
            cosine run). Planning a replay ratio between two fitted ones interpolates their curves.
        pretrain_area: the checkpoint's pretraining forward area in steps at `lr_unit` when known; None: fitted.
        lr_before: the LR the checkpoint's pretraining ended at (0 for a fully annealed checkpoint).
        momenta: the momentum values tried (the one with the lowest total squared error is kept).
        lr_unit: the reference LR areas are counted in; default the pilots' largest LR.
        shared_curve: one continued-pretraining curve and annealing term (L0, A, alpha, S_pt, C) for all replay
            ratios (the paper's decomposition; fewer parameters, but in the lab replay also moves that curve).
        warm_start: start the optimiser at these laws only, with their momentum (the bootstrap refits).

    Raises:
        ValueError: pilots the law cannot be fitted to (see [`check_pilots`]) or bad settings.
    """
    pilots = list(pilots)
    check_pilots(pilots)
    if pretrain_area is not None and not (isinstance(pretrain_area, (int, float)) and pretrain_area > 0):
        raise ValueError(f"`pretrain_area` must be > 0 (steps at `lr_unit`) or None to fit it, got {pretrain_area!r}")
    if not (isinstance(lr_before, (int, float)) and lr_before >= 0):
        raise ValueError(f"`lr_before` must be a learning rate >= 0, got {lr_before!r}")
    if not momenta or any(not 0.0 <= m < 1.0 for m in momenta):
        raise ValueError(f"`momenta` must be values in [0, 1), got {list(momenta)}")
    unit = float(lr_unit) if lr_unit is not None else max(max(p.lrs) for p in pilots)
    if not unit > 0:
        raise ValueError("the pilots' learning rates are all 0: nothing was trained")
    by_share = sorted(_by_share(pilots).items())
    known = {round(law.domain_share, 9): law for law in (warm_start or [])}
    # with a shared curve all ratios are one least-squares problem; otherwise each ratio is its own (own momentum)
    blocks = [by_share] if shared_curve else [[item] for item in by_share]
    laws, hit = [], []
    for block in blocks:
        shares = [s for s, _ in block]
        warm = [known[s] for s in shares] if warm_start is not None else None
        got, h = _fit_block([g for _, g in block], shares, pretrain_area, lr_before, momenta, unit, shared_curve,
                            warm)
        laws += got
        hit += h
    err: dict[str, list] = {"general": [], "domain": []}
    for p in pilots:
        g, d = predict_curves(laws, p.lrs, p.domain_share, p.steps)
        err["general"].append(g - np.asarray(p.general))
        err["domain"].append(d - np.asarray(p.domain))
    err = {k: np.concatenate(v) for k, v in err.items()}
    shares = [law.domain_share for law in laws]
    start = [p for p in pilots if p.steps and p.steps[0] == 0]
    return DynamicsFit(
        laws=laws, rmse_general=float(np.sqrt(np.mean(err["general"] ** 2))),
        rmse_domain=float(np.sqrt(np.mean(err["domain"] ** 2))),
        max_error_general=float(np.abs(err["general"]).max()), max_error_domain=float(np.abs(err["domain"]).max()),
        shares=shares, schedules=sorted({p.schedule for p in pilots}), peak_lrs=sorted({max(p.lrs) for p in pilots}),
        max_steps=max(len(p.lrs) for p in pilots),
        start_general=float(np.mean([p.general[0] for p in start])) if start else math.nan,
        start_domain=float(np.mean([p.domain[0] for p in start])) if start else math.nan,
        fitted_pretrain_area=pretrain_area is None, shared_curve=shared_curve, at_bounds=hit, pilots=pilots,
    )


def bootstrap_dynamics(fit: DynamicsFit, samples: int = 50, seed: int = 0) -> list[list[DynamicsLaw]]:
    """Refit the law on pilots resampled with replacement within each replay ratio (whole runs, so a curve's
    correlated noise moves together), warm-started at `fit`. Resamples the law cannot be fitted to (e.g. one
    schedule only at a ratio) are left out; their count is `samples - len(result)`."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"`samples` must be an integer >= 0, got {samples!r}")
    rng = np.random.default_rng(seed)
    groups = list(_by_share(fit.pilots).values())
    out = []
    for _ in range(samples):
        pick = [g[i] for g in groups for i in rng.integers(0, len(g), len(g))]
        try:
            refit = fit_dynamics(pick, pretrain_area=None if fit.fitted_pretrain_area else
                                 fit.laws[0].general.pretrain_area, lr_before=fit.laws[0].lr_before,
                                 lr_unit=fit.laws[0].lr_unit, shared_curve=fit.shared_curve, warm_start=fit.laws)
        except ValueError:
            continue
        out.append(refit.laws)
    return out


def predict_band(samples: Sequence[Sequence[DynamicsLaw]], lrs: Sequence[float], domain_share: float,
                 level: float = 0.9, steps: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Pointwise `level` band of the general and domain curves over bootstrap refits (from
    [`bootstrap_dynamics`]): `{general_lo, general_hi, domain_lo, domain_hi}` (NaN when there are none)."""
    if not 0 < level < 1:
        raise ValueError(f"`level` must be in (0, 1), got {level}")
    n = (len(lrs) + 1) if steps is None else len(steps)
    if not samples:
        nan = np.full(n, np.nan)
        return {"general_lo": nan, "general_hi": nan, "domain_lo": nan, "domain_hi": nan}
    curves = [predict_curves(laws, lrs, domain_share, steps) for laws in samples]
    g = np.array([c[0] for c in curves])
    d = np.array([c[1] for c in curves])
    q = ((1 - level) / 2, (1 + level) / 2)
    return {"general_lo": np.quantile(g, q[0], axis=0), "general_hi": np.quantile(g, q[1], axis=0),
            "domain_lo": np.quantile(d, q[0], axis=0), "domain_hi": np.quantile(d, q[1], axis=0)}


__all__ = ["LossLaw", "DynamicsLaw", "DynamicsFit", "PilotCurve", "forward_area", "annealing_area", "check_pilots",
           "fit_dynamics", "bootstrap_dynamics", "predict_band", "predict_curves"]


# --- registry entry ---------------------------------------------------------------------------------------------------
TECHNIQUE = Technique(
    name="learning dynamics",
    key=None,  # no block: `hf-cpt plan` fits pilot runs' curves (recipe/plan.py)
    exports={**names("dynamics", "fit_dynamics", "bootstrap_dynamics", "predict_band", "predict_curves",
                     "DynamicsLaw", "DynamicsFit", "LossLaw", "PilotCurve"),
             **names("recipe.plan", "plan_cpt", "plan_from_pilots", "read_pilot", "plot_plan", "write_plan",
                     "planned_config", "write_plan_config", "CPTPlan", "PlanCandidate")},
    functional=names("dynamics", "annealing_area", "fit_dynamics", "forward_area"),
)
