"""Critical Mixture Ratio (CMR): fit loss surfaces on pilot runs and predict the domain share for a token budget.

Paper: "CMR Scaling Law: Predicting Critical Mixture Ratios for Continual Pre-training of Language Models"
(Gu et al., 2024, arXiv 2407.17467). Continual pretraining trades domain loss against general loss; the CMR is the
largest *domain share* r of the training tokens whose general held-out loss stays within a tolerance of its
pre-CPT value (the domain loss falls monotonically with r, so the largest feasible r minimises it). Across
budgets the paper finds R_CMR(T) = b0 + b1 * T^s, which extrapolates from small pilots to the real run.

The loss surfaces (our functional form, fitted with `scipy.optimize.least_squares`; T = training tokens,
r = domain share, L_G0 = general loss before CPT):

    general:  L_G(T, r) = L_G0 + F * (r T)^phi - R * ((1 - r) T)^rho
    domain:   L_D(T, r) = E + A * ((r + delta) T)^(-alpha)

Why this form: both are power laws in tokens (as every LM scaling law), with the tokens split by source. General
loss starts at L_G0 (T = 0), *rises* with domain tokens (forgetting, F, phi) and *falls* with general tokens
(replay refreshes and, for replay close to the held-out data, improves it: R, rho); it is increasing in r for any
T, so the feasible set {r : L_G(T, r) <= bound} is an interval [0, CMR(T)] and the CMR moves with T because the
two exponents differ. Domain loss follows a data scaling law in the effective domain tokens (r + delta) T, where
delta is the transfer from general tokens; E is its irreducible floor. Eight parameters in all, identifiable from a
grid of >= 3 ratios x >= 3 budgets plus the pre-CPT evaluation.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..callbacks.forgetting import tolerance_bound
from ..import_utils import require
from ..validation import check_number


RECORD_FIELDS = ("ratio", "tokens", "general_loss", "domain_loss")


@dataclass(frozen=True)
class CMRRecord:
    """One evaluation of a pilot run: domain share `ratio`, `tokens` trained, held-out losses then."""

    ratio: float
    tokens: float
    general_loss: float
    domain_loss: float


@dataclass
class CMRLaw:
    """Parameters of the two surfaces (tokens in raw units; see the module docstring for the formulas)."""

    general_start: float
    forget_scale: float
    forget_exp: float
    replay_scale: float
    replay_exp: float
    domain_floor: float
    domain_scale: float
    domain_exp: float
    domain_transfer: float

    def general_loss(self, tokens: Any, ratio: Any) -> Any:
        t, r = np.asarray(tokens, dtype=float), np.asarray(ratio, dtype=float)
        return (self.general_start + self.forget_scale * (r * t) ** self.forget_exp
                - self.replay_scale * ((1 - r) * t) ** self.replay_exp)

    def domain_loss(self, tokens: Any, ratio: Any) -> Any:
        t, r = np.asarray(tokens, dtype=float), np.asarray(ratio, dtype=float)
        return self.domain_floor + self.domain_scale * ((r + self.domain_transfer) * t) ** (-self.domain_exp)


def general_bound(general_start: float, tolerance: float, mode: str = "relative") -> float:
    """The highest general loss allowed: L_G0 * (1 + tolerance) or L_G0 + tolerance (see `tolerance_bound`)."""
    check_number("tolerance", tolerance, 0.0, min_inclusive=False)
    return tolerance_bound(general_start, tolerance, mode)


def critical_ratio(law: CMRLaw, tokens: float, tolerance: float, mode: str = "relative") -> float:
    """CMR(T): the largest domain share whose general loss at `tokens` stays within the tolerance.

    Raises:
        ValueError: when even r = 0 (all replay) breaks the tolerance.
    """
    require("scipy", "Solving for the CMR")
    from scipy.optimize import brentq

    bound = general_bound(law.general_start, tolerance, mode)

    def excess(r: float) -> float:
        return float(law.general_loss(tokens, r)) - bound

    if excess(0.0) > 0:
        raise ValueError(f"no domain share keeps the general loss within the tolerance at {tokens:.3g} tokens "
                         "(even r=0 breaks it): raise `tolerance`")
    if excess(1.0) <= 0:
        return 1.0
    return float(brentq(excess, 0.0, 1.0, xtol=1e-10))


def cmr_power_law(tokens: Any, b0: float, b1: float, s: float) -> Any:
    """R_CMR(T) = b0 + b1 * T^s (the paper's CMR scaling law)."""
    return b0 + b1 * np.asarray(tokens, dtype=float) ** s


# --- records ---------------------------------------------------------------------------------------------------
def check_records(records: Sequence[CMRRecord], monotone_tol: float = 0.02) -> None:
    """Refuse data the fit cannot honestly use, with the reason.

    Raises:
        ValueError: NaN/negative values, ratios outside [0, 1], no pre-CPT (tokens = 0) evaluation, fewer than 3
            ratios or 3 budgets, or a domain loss that rises with tokens by more than `monotone_tol` (relative).
    """
    if not records:
        raise ValueError("no CMR records: run `hf-cpt cmr pilot` first")
    for i, rec in enumerate(records):
        for name in RECORD_FIELDS:
            v = getattr(rec, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"record {i}: `{name}` is {v!r}; every loss and count must be a finite number "
                                 "(a diverged pilot run? rerun it with a lower learning rate)")
        if not 0.0 <= rec.ratio <= 1.0 or rec.tokens < 0:
            raise ValueError(f"record {i}: `ratio` must be in [0, 1] and `tokens` >= 0, got {rec}")
    if not any(r.tokens == 0 for r in records):
        raise ValueError("the records need the pre-CPT evaluation (a row with tokens=0) for the general loss "
                         "baseline")
    trained = [r for r in records if r.tokens > 0]
    ratios = sorted({r.ratio for r in trained})
    budgets = sorted({r.tokens for r in trained})
    if len(ratios) < 3 or len(budgets) < 3:
        raise ValueError(f"too few records for the fit: need >= 3 domain ratios and >= 3 token budgets, got "
                         f"{len(ratios)} ratios {ratios} and {len(budgets)} budgets")
    for ratio in ratios:
        curve = sorted((r.tokens, r.domain_loss) for r in trained if r.ratio == ratio)
        for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
            if ratio > 0 and l1 > l0 * (1 + monotone_tol):
                raise ValueError(f"domain loss rises with training at ratio {ratio} ({l0:.4f} at {t0:.0f} tokens -> "
                                 f"{l1:.4f} at {t1:.0f}): a diverging or noisy pilot; lower its learning rate or "
                                 "evaluate on more held-out blocks")


def read_records(path: str | Path) -> list[CMRRecord]:
    """Read a records CSV with columns `ratio,tokens,general_loss,domain_loss` (extra columns are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file {str(path)!r} does not exist")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in RECORD_FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{str(path)!r} lacks columns {missing}; expected {', '.join(RECORD_FIELDS)}")
        out = []
        for line, row in enumerate(reader, start=2):
            try:
                out.append(CMRRecord(*(float(row[c]) for c in RECORD_FIELDS)))
            except (TypeError, ValueError):
                raise ValueError(f"{str(path)!r} line {line}: not a number in {row}") from None
    return out


def write_records(records: Iterable[CMRRecord], path: str | Path) -> None:
    """Write pilot records as the CSV [`read_records`] reads (`ratio,tokens,general_loss,domain_loss`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(RECORD_FIELDS)
        for r in records:
            writer.writerow([r.ratio, int(r.tokens), f"{r.general_loss:.6f}", f"{r.domain_loss:.6f}"])
    tmp.replace(path)


# --- fitting ---------------------------------------------------------------------------------------------------
@dataclass
class CMRFit:
    """Result of [`fit_cmr_law`]."""

    law: CMRLaw
    tolerance: float
    tolerance_mode: str
    budgets: list[float]
    cmr_at_budgets: list[float]
    power_law: tuple[float, float, float] | None
    rmse_general: float
    rmse_domain: float
    records: list[CMRRecord] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("records")
        return out


def _fit_surfaces(records: Sequence[CMRRecord]) -> tuple[CMRLaw, float, float]:
    require("scipy", "Fitting the CMR law")
    from scipy.optimize import least_squares

    base = [r for r in records if r.tokens == 0]
    trained = [r for r in records if r.tokens > 0]
    g0 = float(np.mean([r.general_loss for r in base]))
    scale = max(r.tokens for r in trained)  # fit in tokens / scale: parameters of order 1
    t = np.array([r.tokens / scale for r in trained])
    r = np.array([r.ratio for r in trained])
    lg = np.array([x.general_loss for x in trained])
    ld = np.array([x.domain_loss for x in trained])

    def general(p: np.ndarray) -> np.ndarray:
        return g0 + p[0] * (r * t) ** p[1] - p[2] * ((1 - r) * t) ** p[3] - lg

    best = None
    for phi0, rho0 in ((0.5, 0.5), (1.0, 0.3), (0.3, 1.0)):  # a few starts: exponents interact with scales
        res = least_squares(general, [0.1, phi0, 0.1, rho0], bounds=([0, 0.01, 0, 0.01], [np.inf, 3, np.inf, 3]))
        if best is None or res.cost < best.cost:
            best = res
    pg = best.x
    rmse_g = float(np.sqrt(np.mean(best.fun ** 2)))

    def domain(p: np.ndarray) -> np.ndarray:
        return p[0] + p[1] * ((r + p[3]) * t) ** (-p[2]) - ld

    best = None
    floor_hi = float(ld.min())
    for a0 in (0.3, 0.7, 1.5):
        start = [0.8 * floor_hi, max(float(ld.max() - ld.min()), 1e-3), a0, 0.1]
        res = least_squares(domain, start, bounds=([0, 0, 0.01, 0], [floor_hi, np.inf, 5, 10]))
        if best is None or res.cost < best.cost:
            best = res
    pd = best.x
    rmse_d = float(np.sqrt(np.mean(best.fun ** 2)))
    law = CMRLaw(
        general_start=g0,
        forget_scale=float(pg[0] * scale ** -pg[1]), forget_exp=float(pg[1]),
        replay_scale=float(pg[2] * scale ** -pg[3]), replay_exp=float(pg[3]),
        domain_floor=float(pd[0]), domain_scale=float(pd[1] * scale ** pd[2]), domain_exp=float(pd[2]),
        domain_transfer=float(pd[3]),
    )
    return law, rmse_g, rmse_d


def _fit_power_law(budgets: Sequence[float], cmrs: Sequence[float]) -> tuple[float, float, float] | None:
    require("scipy", "Fitting the CMR law")
    from scipy.optimize import least_squares

    b = np.asarray(budgets, dtype=float)
    c = np.asarray(cmrs, dtype=float)
    if np.ptp(c) < 1e-9:  # constant CMR: b1 = 0
        return float(c[0]), 0.0, 0.0
    scale = b.max()
    res = least_squares(lambda p: p[0] + p[1] * (b / scale) ** p[2] - c, [c.mean(), c[-1] - c.mean(), -0.5],
                        bounds=([-np.inf, -np.inf, -5], [np.inf, np.inf, 5]))
    b0, b1, s = res.x
    return float(b0), float(b1 * scale ** -s), float(s)


def fit_cmr_law(records: Sequence[CMRRecord], tolerance: float, tolerance_mode: str = "relative") -> CMRFit:
    """Fit the general/domain loss surfaces and the CMR power law R_CMR(T) = b0 + b1 T^s to pilot records.

    Args:
        records: pilot evaluations, including the pre-CPT evaluation (tokens = 0).
        tolerance: allowed rise of the general loss (relative: 0.05 = 5%; absolute: in nats).
        tolerance_mode: `relative` or `absolute`.

    Raises:
        ValueError: bad records (see [`check_records`]) or tolerance.
    """
    records = list(records)
    general_bound(1.0, tolerance, tolerance_mode)  # validates
    check_records(records)
    law, rmse_g, rmse_d = _fit_surfaces(records)
    budgets = sorted({r.tokens for r in records if r.tokens > 0})
    cmrs = [critical_ratio(law, b, tolerance, tolerance_mode) for b in budgets]
    # the power law is fitted to the CMR along the pilot range, where it is below 1: a saturated CMR (any share is
    # feasible that early) says nothing about the trend
    grid = np.geomspace(budgets[0], budgets[-1], 24)
    along = [(b, critical_ratio(law, b, tolerance, tolerance_mode)) for b in grid]
    along = [(b, c) for b, c in along if c < 1.0]
    power = _fit_power_law([b for b, _ in along], [c for _, c in along]) if len(along) >= 3 else None
    return CMRFit(law=law, tolerance=tolerance, tolerance_mode=tolerance_mode, budgets=budgets, cmr_at_budgets=cmrs,
                  power_law=power, rmse_general=rmse_g, rmse_domain=rmse_d, records=records)


@dataclass
class CMRPrediction:
    """The CMR predicted for a budget, with a bootstrap interval, and the replay ratio that goes with it.

    `cmr` comes from the fitted surfaces at the budget; `power_law_cmr` is the paper's R_CMR(T) = b0 + b1 T^s
    fitted along the pilot range and extrapolated (None when the CMR is 1 over the whole pilot range).
    """

    budget_tokens: float
    cmr: float
    interval: tuple[float, float]
    power_law_cmr: float | None
    replay_ratio: float
    bootstrap_samples: int


def predict_cmr(fit: CMRFit, budget_tokens: float, bootstrap: int = 100, seed: int = 0,
                level: float = 0.9) -> CMRPrediction:
    """The CMR at `budget_tokens`, with a `level` interval from refitting on records resampled with replacement
    within each ratio (`bootstrap` times).

    The point estimate solves the fitted surfaces at the budget: they model the general loss over both r and T, so
    they extrapolate the *cause* of the CMR; the power law over derived CMR values (the paper's R_CMR(T)) is
    reported next to it. On synthetic data from the surface law the surface estimate is the accurate one (see
    tests/mixers/test_cmr.py), and both are shown in the plot.

    Raises:
        ValueError: when no share keeps the general loss within the tolerance at that budget.
    """
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, (int, float)) or not budget_tokens > 0:
        raise ValueError(f"`budget_tokens` must be > 0, got {budget_tokens!r}")
    point = critical_ratio(fit.law, budget_tokens, fit.tolerance, fit.tolerance_mode)
    power = (float(np.clip(cmr_power_law(budget_tokens, *fit.power_law), 0.0, 1.0))
             if fit.power_law is not None else None)
    rng = np.random.default_rng(seed)
    by_ratio: dict[float, list[CMRRecord]] = {}
    for r in fit.records:
        by_ratio.setdefault(r.ratio if r.tokens > 0 else -1.0, []).append(r)
    samples = []
    for _ in range(bootstrap):
        resampled = [grp[i] for grp in by_ratio.values() for i in rng.integers(0, len(grp), len(grp))]
        try:
            refit = fit_cmr_law(resampled, fit.tolerance, fit.tolerance_mode)
            samples.append(critical_ratio(refit.law, budget_tokens, fit.tolerance, fit.tolerance_mode))
        except ValueError:  # a resample with too few distinct budgets, or infeasible: leave it out
            continue
    lo, hi = ((float(np.quantile(samples, (1 - level) / 2)), float(np.quantile(samples, (1 + level) / 2)))
              if samples else (math.nan, math.nan))
    return CMRPrediction(budget_tokens=float(budget_tokens), cmr=point, interval=(lo, hi), power_law_cmr=power,
                         replay_ratio=1.0 - point, bootstrap_samples=len(samples))


def _safe_cmr(law: CMRLaw, tokens: float, fit: CMRFit) -> float:
    try:
        return critical_ratio(law, tokens, fit.tolerance, fit.tolerance_mode)
    except ValueError:
        return math.nan


def plot_cmr(fit: CMRFit, prediction: CMRPrediction | None, path: str | Path) -> Path:
    """PNG: general and domain loss vs tokens per ratio (records and fitted curves), and the feasible region
    (r, T) with the CMR curve and the extrapolated prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = fit.law
    trained = [r for r in fit.records if r.tokens > 0]
    ratios = sorted({r.ratio for r in trained})
    t_max = max(fit.budgets + ([prediction.budget_tokens] if prediction else []))
    ts = np.geomspace(min(fit.budgets) * 0.5, t_max, 200)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    bound = general_bound(law.general_start, fit.tolerance, fit.tolerance_mode)
    for ratio in ratios:
        pts = sorted((r.tokens, r.general_loss, r.domain_loss) for r in trained if r.ratio == ratio)
        (line,) = axes[0].plot(ts, law.general_loss(ts, ratio), label=f"r={ratio:g}")
        axes[0].scatter([p[0] for p in pts], [p[1] for p in pts], color=line.get_color(), s=14)
        axes[1].plot(ts, law.domain_loss(ts, ratio), color=line.get_color(), label=f"r={ratio:g}")
        axes[1].scatter([p[0] for p in pts], [p[2] for p in pts], color=line.get_color(), s=14)
    axes[0].axhline(bound, color="k", ls="--", lw=1, label="tolerance")
    axes[0].set(title="general held-out loss", xlabel="training tokens", ylabel="loss")
    axes[1].set(title="domain held-out loss", xlabel="training tokens")
    grid_r = np.linspace(0, 1, 101)
    tt, rr = np.meshgrid(ts, grid_r)
    axes[2].contourf(tt, rr, law.general_loss(tt, rr) <= bound, levels=[0.5, 1.5], colors=["#cde8c5"])
    axes[2].plot(fit.budgets, fit.cmr_at_budgets, "o", color="C2", label="CMR at pilot budgets")
    axes[2].plot(ts, [_safe_cmr(law, t, fit) for t in ts], color="C2", label="CMR of the fitted surfaces")
    if fit.power_law:
        axes[2].plot(ts, np.clip(cmr_power_law(ts, *fit.power_law), 0, 1), color="C1", ls=":",
                     label="b0 + b1 T^s (paper's form)")
    if prediction:
        axes[2].errorbar([prediction.budget_tokens], [prediction.cmr],
                         yerr=[[prediction.cmr - prediction.interval[0]], [prediction.interval[1] - prediction.cmr]],
                         fmt="*", color="C3", ms=12, label=f"prediction {prediction.cmr:.3f}")
    axes[2].set(title="feasible domain share (green)", xlabel="training tokens", ylabel="domain share r",
                ylim=(0, 1.02))
    for ax in axes:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
