"""Plan a CPT run before paying for it: fit the learning-dynamics law ([`hf_cpt.dynamics`]) to pilot runs written
by `hf-cpt train`, predict the general and domain loss curves of candidate runs (schedule, peak LR, replay ratio)
at the planned budget, and recommend the one with the lowest domain loss whose general loss stays within a
forgetting tolerance, with a bootstrap band.

A pilot is an output directory of [`run_cpt`]: its `hf_cpt_config.yaml` gives the LR of every update (the
rewarm `schedule`, or the transformers `train.lr_scheduler_type`) and the replay ratio; `metrics.json` (or a
checkpoint's `trainer_state.json`) gives the held-out losses at each evaluation.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..monitoring import tolerance_bound
from ..callbacks.progress import training_bar_label
from ..callbacks.rewarm import RewarmConfig, lr_multiplier
from ..config import CONFIG_FILE, CPTConfig
from ..dynamics import DynamicsFit, PilotCurve, bootstrap_dynamics, fit_dynamics, predict_band
from ..validation import check_number
from .outputs import METRICS_FILE

logger = logging.getLogger(__name__)

CANDIDATE_SCHEDULES = ("constant", "cosine", "wsd")
# transformers scheduler names -> the schedule family the fit tells apart
_HF_SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine",
                 "cosine_with_min_lr": "cosine", "linear": "linear", "warmup_stable_decay": "wsd",
                 "cosine_with_restarts": "cosine_with_restarts", "polynomial": "polynomial",
                 "inverse_sqrt": "inverse_sqrt", "reduce_lr_on_plateau": "reduce_lr_on_plateau"}


# --- reading pilots ----------------------------------------------------------------------------------------------
def schedule_name(cfg: CPTConfig) -> str:
    """The LR schedule family of a run (`constant`, `cosine`, `wsd`, `linear`, ...)."""
    if cfg.schedule is not None:
        s = cfg.schedule
        return {"rewarm": s.decay, "wsd": "wsd", "constant": "constant"}.get(s.schedule, s.schedule)
    return _HF_SCHEDULES.get(cfg.train.lr_scheduler_type, cfg.train.lr_scheduler_type)


def run_learning_rates(cfg: CPTConfig) -> list[float]:
    """The LR of each of the run's `train.max_steps` updates, as its Trainer set them."""
    steps, lr = cfg.train.max_steps, cfg.train.learning_rate
    if cfg.schedule is not None:
        return [lr * lr_multiplier(s, cfg.schedule, steps) for s in range(steps)]
    if cfg.train.lr_scheduler_type == "reduce_lr_on_plateau":
        raise ValueError("`train.lr_scheduler_type: reduce_lr_on_plateau` depends on the losses, not the step: the "
                         "law needs a schedule known in advance (use constant, cosine or a `schedule:` block)")
    import torch
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    kwargs = cfg.train.training_args.get("lr_scheduler_kwargs") or {}
    sched = get_scheduler(cfg.train.lr_scheduler_type, opt, num_warmup_steps=cfg.train.warmup_steps,
                          num_training_steps=steps, scheduler_specific_kwargs=kwargs)
    out = []
    for _ in range(steps):
        out.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    return out


def _eval_history(run_dir: Path) -> list[dict[str, float]]:
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        return json.loads(metrics.read_text(encoding="utf-8")).get("eval_history", [])
    state = run_dir / "trainer_state.json"
    if state.is_file():  # a checkpoint: evaluations are `eval_<set>_loss` entries of the log history
        rows: dict[int, dict[str, float]] = {}
        for entry in json.loads(state.read_text(encoding="utf-8")).get("log_history", []):
            for key, value in entry.items():
                if key.startswith("eval_") and key.endswith("_loss"):
                    rows.setdefault(int(entry["step"]), {"step": int(entry["step"])})[key[5:]] = float(value)
        return [rows[s] for s in sorted(rows)]
    raise FileNotFoundError(f"{str(run_dir)!r} has neither {METRICS_FILE} nor trainer_state.json: pass output "
                            "directories written by `hf-cpt train`")


def read_pilot(run_dir: str | Path) -> tuple[PilotCurve, int]:
    """A pilot curve from a run directory, and the run's training tokens per update.

    Raises:
        FileNotFoundError: no such directory, or no config / metrics in it.
        ValueError: a history without both held-out losses, or a replay schedule the law does not model.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"pilot run {str(run_dir)!r} does not exist")
    cfg = pilot_config(run_dir)
    if cfg.data.replay_stages:
        raise ValueError(f"pilot {str(run_dir)!r} changes its replay ratio during the run (`data.replay_stages`): "
                         "the law models one ratio per run; use pilots with a fixed `data.replay_ratio`")
    history = _eval_history(run_dir)
    g, d = f"{cfg.monitor.general}_loss", f"{cfg.monitor.domain}_loss"
    rows = [r for r in history if g in r and d in r]
    if not rows:
        have = sorted({k for r in history for k in r if k.endswith("_loss")})
        raise ValueError(f"pilot {str(run_dir)!r}: its evaluation history has no `{g}` and `{d}` together (found "
                         f"{have or 'no losses'}); the law needs both held-out sets: set `data.general` and "
                         "evaluate during training (`train.eval_steps`)")
    tokens = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps * cfg.data.block_size
    pilot = PilotCurve(name=run_dir.name, schedule=schedule_name(cfg), lrs=tuple(run_learning_rates(cfg)),
                       domain_share=round(1.0 - cfg.data.replay_ratio, 10),
                       steps=tuple(int(r["step"]) for r in rows), general=tuple(float(r[g]) for r in rows),
                       domain=tuple(float(r[d]) for r in rows))
    return pilot, tokens


# --- candidates --------------------------------------------------------------------------------------------------
def candidate_schedule(schedule: str, steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                       decay_fraction: float = 0.2) -> RewarmConfig:
    """The `schedule:` block of a candidate run: `constant`, `cosine` (to `min_lr_ratio`) or `wsd` (linear decay
    over the last `decay_fraction` of the run's `steps`), each after a linear warmup of `warmup_steps` from 0."""
    if schedule not in CANDIDATE_SCHEDULES:
        raise ValueError(f"`schedules` must be among {CANDIDATE_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return RewarmConfig(schedule="constant", warmup_steps=warmup_steps)
    if schedule == "cosine":
        return RewarmConfig(schedule="rewarm", warmup_steps=warmup_steps, decay="cosine", min_lr_ratio=min_lr_ratio)
    return RewarmConfig(schedule="wsd", warmup_steps=warmup_steps, decay="linear", min_lr_ratio=min_lr_ratio,
                        decay_steps=max(1, round(decay_fraction * steps)))


def candidate_lrs(schedule: str, steps: int, peak_lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                  decay_fraction: float = 0.2) -> list[float]:
    """LR per update of a candidate run (see [`candidate_schedule`]): what a run with that `schedule:` block and
    `train.learning_rate: peak_lr` trains with."""
    cfg = candidate_schedule(schedule, steps, warmup_steps, min_lr_ratio, decay_fraction)
    return [peak_lr * lr_multiplier(s, cfg, steps) for s in range(steps)]


@dataclass
class PlanCandidate:
    """One candidate run and its predicted losses at the end of the budget (`*_hi`: top of the band, never below
    the point prediction: a percentile band of refits on few pilots can sit beside the full fit)."""

    schedule: str
    peak_lr: float
    replay_ratio: float
    general_end: float
    domain_end: float
    general_hi: float
    domain_hi: float
    feasible: bool


@dataclass
class CPTPlan:
    """Result of [`plan_cpt`]: the fit, every candidate, the recommendation (None when no candidate meets the
    tolerance) and its predicted curves with the band."""

    fit: DynamicsFit
    budget_steps: int
    tokens_per_step: int | None
    tolerance: float
    tolerance_mode: str
    general_bound: float
    level: float
    bootstrap_samples: int
    candidates: list[PlanCandidate]
    recommended: PlanCandidate | None
    curves: dict[str, list[float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fit"] = self.fit.to_dict()
        return out


def _parse_grid(name: str, values: Sequence[float] | None, default: Sequence[float], lo: float, hi: float,
                what: str) -> list[float]:
    grid = [float(v) for v in (default if values is None else values)]
    if not grid:
        raise ValueError(f"`{name}` is empty")
    for v in grid:
        if not math.isfinite(v) or v < lo - 1e-9 or v > hi + 1e-9:
            raise ValueError(f"`{name}` value {v:g} is outside {what} [{lo:g}, {hi:g}]: the law is fitted there "
                             "only; add pilots that cover it")
    return sorted(set(grid))


def plan_from_pilots(pilots: Sequence[PilotCurve], budget_steps: int, tolerance: float,
                     tolerance_mode: str = "relative", schedules: Sequence[str] = CANDIDATE_SCHEDULES,
                     peak_lrs: Sequence[float] | None = None, replay_ratios: Sequence[float] | None = None,
                     warmup_steps: int | None = None, min_lr_ratio: float = 0.1, decay_fraction: float = 0.2,
                     bootstrap: int = 30, level: float = 0.9, pretrain_area: float | None = None,
                     lr_before: float = 0.0, shared_curve: bool = False, tokens_per_step: int | None = None,
                     seed: int = 0) -> CPTPlan:
    """Fit the law to `pilots` and rank candidate runs of `budget_steps` updates (see [`plan_cpt`])."""
    if isinstance(budget_steps, bool) or not isinstance(budget_steps, int) or budget_steps < 1:
        raise ValueError(f"`budget_steps` must be an integer >= 1, got {budget_steps!r}")
    check_number("tolerance", tolerance, 0.0, min_inclusive=False)
    pilots = list(pilots)
    longest = max((len(p.lrs) for p in pilots), default=0)
    if pilots and budget_steps < longest:
        raise ValueError(f"`budget_steps` ({budget_steps}) is below the pilots' longest run ({longest} steps): plan a "
                         "run longer than its pilots (the pilots' own curves already answer shorter ones)")
    fit = fit_dynamics(pilots, pretrain_area=pretrain_area, lr_before=lr_before, shared_curve=shared_curve)
    if math.isnan(fit.start_general):
        raise ValueError("no pilot was evaluated at step 0: the tolerance is a rise over the starting general loss; "
                         "evaluate at the start (`hf-cpt train` does)")
    bound = tolerance_bound(fit.start_general, tolerance, tolerance_mode)
    lrs_grid = _parse_grid("peak_lrs", peak_lrs, fit.peak_lrs, min(fit.peak_lrs), max(fit.peak_lrs),
                           "the pilots' peak LRs")
    lo_share, hi_share = min(fit.shares), max(fit.shares)
    default_ratios = [r for r in np.round(np.arange(0.0, 1.0, 0.05), 4) if lo_share - 1e-9 <= 1 - r <= hi_share + 1e-9]
    ratios = _parse_grid("replay_ratios", replay_ratios, default_ratios or [1 - hi_share], 1 - hi_share,
                         1 - lo_share, "the pilots' replay ratios")
    for s in schedules:
        if s not in CANDIDATE_SCHEDULES:
            raise ValueError(f"`schedules` must be among {CANDIDATE_SCHEDULES}, got {s!r}")
    warm = warmup_steps if warmup_steps is not None else min(10, budget_steps // 10)
    laws = bootstrap_dynamics(fit, bootstrap, seed) if bootstrap else []
    candidates = []
    for sched in schedules:
        for lr in lrs_grid:
            lrs = candidate_lrs(sched, budget_steps, lr, warm, min_lr_ratio, decay_fraction)
            for r in ratios:
                g, d = fit.predict(lrs, 1.0 - r, [budget_steps])
                band = predict_band(laws, lrs, 1.0 - r, level, [budget_steps]) if laws else None
                g_hi = max(float(band["general_hi"][0]), float(g[0])) if band else float(g[0])
                d_hi = max(float(band["domain_hi"][0]), float(d[0])) if band else float(d[0])
                # feasible with the band: the top of the general band (the point estimate without a bootstrap)
                candidates.append(PlanCandidate(sched, lr, float(r), float(g[0]), float(d[0]), g_hi, d_hi,
                                                g_hi <= bound))
    feasible = [c for c in candidates if c.feasible]
    best = min(feasible, key=lambda c: (c.domain_end, c.replay_ratio)) if feasible else None
    curves: dict[str, list[float]] = {}
    if best is not None:
        lrs = candidate_lrs(best.schedule, budget_steps, best.peak_lr, warm, min_lr_ratio, decay_fraction)
        g, d = fit.predict(lrs, 1.0 - best.replay_ratio)
        curves = {"lr": lrs, "general": g.tolist(), "domain": d.tolist()}
        if laws:
            band = predict_band(laws, lrs, 1.0 - best.replay_ratio, level)
            for key, point in (("general", g), ("domain", d)):  # the band holds the point prediction
                band[f"{key}_lo"] = np.minimum(band[f"{key}_lo"], point)
                band[f"{key}_hi"] = np.maximum(band[f"{key}_hi"], point)
            curves.update({k: v.tolist() for k, v in band.items()})
    settings = {"warmup_steps": warm, "min_lr_ratio": min_lr_ratio, "decay_fraction": decay_fraction}
    return CPTPlan(fit=fit, budget_steps=budget_steps, tokens_per_step=tokens_per_step, tolerance=tolerance,
                   tolerance_mode=tolerance_mode, general_bound=bound, level=level, bootstrap_samples=len(laws),
                   candidates=candidates, recommended=best, curves=curves, settings=settings)


def evaluation_steps(max_steps: int, eval_steps: int) -> list[int]:
    """The steps a run of `hf-cpt train` evaluates at: 0, every `eval_steps`, and the last step."""
    return sorted({0, *range(eval_steps, max_steps + 1, eval_steps), max_steps})


def plan_prediction(plan: CPTPlan, steps: Sequence[int]) -> dict[str, Any]:
    """The `monitor.prediction` block of the recommended run: its predicted general and domain loss at `steps`,
    each with a band: the plan's bootstrap band (when it has one) around the prediction, widened on both sides by
    the fit's RMSE on the pilots of that set (the scatter of one measured curve around the law).

    Raises:
        ValueError: the plan recommends no run, or a step is outside the planned run.
    """
    c = plan.recommended
    if c is None or not plan.curves:
        raise ValueError("the plan recommends no run (no candidate keeps the general loss within the tolerance): "
                         "there is no prediction to write; raise `--tolerance` or allow more replay")
    steps = [int(s) for s in steps]
    if not steps or min(steps) < 0 or max(steps) > plan.budget_steps:
        raise ValueError(f"prediction steps must lie in [0, {plan.budget_steps}] (the planned run), got {steps}")
    out: dict[str, Any] = {"steps": steps}
    for role in ("general", "domain"):
        rmse = float(getattr(plan.fit, f"rmse_{role}"))
        point = [float(plan.curves[role][s]) for s in steps]
        lo = [min(float(plan.curves.get(f"{role}_lo", plan.curves[role])[s]), p) - rmse for s, p in zip(steps, point)]
        hi = [max(float(plan.curves.get(f"{role}_hi", plan.curves[role])[s]), p) + rmse for s, p in zip(steps, point)]
        out.update({role: point, f"{role}_lo": lo, f"{role}_hi": hi})
    bands = (f"{plan.level:.0%} bootstrap band ({plan.bootstrap_samples} refits)" if "general_lo" in plan.curves
             else "the prediction")
    out["band"] = (f"{bands} +- the fit's RMSE on the pilots ({plan.fit.rmse_general:.4f} general, "
                   f"{plan.fit.rmse_domain:.4f} domain)")
    out["source"] = (f"hf-cpt plan from {len(plan.fit.pilots)} pilots: {c.schedule}, peak LR {c.peak_lr:g}, replay "
                     f"{c.replay_ratio:g}, {plan.budget_steps} steps")
    out.update(replay_ratio=c.replay_ratio, learning_rate=c.peak_lr, max_steps=plan.budget_steps)
    return out


def planned_config(plan: CPTPlan, cfg: CPTConfig) -> CPTConfig:
    """`cfg` (e.g. a pilot's recipe) as the recommended run: `train.max_steps` the budget, `train.learning_rate` the
    peak LR, the candidate's `schedule:` block, `data.replay_ratio`, and its prediction as `monitor.prediction` at
    the run's evaluation steps (checked by `hf-cpt train` at every evaluation). A `merge_base` block is dropped,
    with a warning: the prediction is of the trained model."""
    c = plan.recommended
    if c is None:
        plan_prediction(plan, [0])  # raises: no run recommended
    s = plan.settings
    schedule = candidate_schedule(c.schedule, plan.budget_steps, s["warmup_steps"], s["min_lr_ratio"],
                                  s["decay_fraction"])
    steps = evaluation_steps(plan.budget_steps, cfg.train.eval_steps)
    if cfg.merge_base is not None:  # the plan predicts the trained model; a merge would change what is measured
        logger.warning("plan: the planned run drops `merge_base` (alpha %g): the prediction is of the trained model; "
                       "merge it afterwards with `hf-cpt merge RUN --alpha %g`", cfg.merge_base.alpha,
                       cfg.merge_base.alpha)
    return cfg.override({"merge_base": None,"train.max_steps": plan.budget_steps, "train.learning_rate": c.peak_lr,
                         "train.warmup_steps": 0, "train.lr_scheduler_type": None, "schedule": asdict(schedule),
                         "data.replay_ratio": c.replay_ratio, "data.replay_stages": [], "output_dir": None,
                         "monitor.prediction": plan_prediction(plan, steps)})


def write_plan_config(plan: CPTPlan, cfg: CPTConfig, path: str | Path) -> CPTConfig:
    """Write [`planned_config`] to `path` (atomically), with a comment saying where it came from; returns it."""
    from ..config import write_yaml

    new = planned_config(plan, cfg)
    c = plan.recommended
    header = (f"# planned by `hf-cpt plan` from {len(plan.fit.pilots)} pilots: {c.schedule}, peak LR {c.peak_lr:g}, "
              f"replay_ratio {c.replay_ratio:g}, {plan.budget_steps} steps; `monitor.prediction` holds the predicted "
              "losses `hf-cpt train` checks at every evaluation\n")
    write_yaml(new, path, header)
    return new


def pilot_config(run_dir: str | Path) -> CPTConfig:
    """The recipe of a pilot run directory (or of the run a checkpoint directory belongs to)."""
    run_dir = Path(run_dir)
    cfg_dir = run_dir if (run_dir / CONFIG_FILE).is_file() else run_dir.parent
    if not (cfg_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no {CONFIG_FILE}: pass output directories written by "
                                "`hf-cpt train`")
    return CPTConfig.from_pretrained(cfg_dir)


def pilot_run_configs(cfg: CPTConfig, pilot_steps: int, schedules: Sequence[str] = ("constant", "cosine"),
                      replay_ratios: Sequence[float] | None = None) -> dict[str, CPTConfig]:
    """The pilots `hf-cpt plan --run` trains: `cfg` for `pilot_steps` updates, evaluated >= 8 times, at each replay
    ratio (default: `cfg`'s) with each candidate schedule at `cfg`'s peak LR, by directory name."""
    evals = max(1, pilot_steps // 8)
    out = {}
    for r in replay_ratios if replay_ratios is not None else [cfg.data.replay_ratio]:
        for sched in schedules:
            block = asdict(candidate_schedule(sched, pilot_steps))
            out[f"pilot-{sched}-r{r:g}"] = cfg.override({
                "train.max_steps": pilot_steps, "train.eval_steps": evals, "train.warmup_steps": 0,
                "train.lr_scheduler_type": None, "schedule": block, "data.replay_ratio": float(r),
                "data.replay_stages": [], "output_dir": None, "monitor.prediction": None,
                "merge_base": None})  # a pilot measures the trained model's curve, not a merge
    return out


def run_plan(cfg: CPTConfig, budget_steps: int, tolerance: float, output_dir: str | Path,
             pilot_steps: int | None = None, replay_ratios: Sequence[float] | None = None,
             pilot_schedules: Sequence[str] = ("constant", "cosine"), overwrite: bool = False,
             **kwargs: Any) -> tuple[CPTPlan, Any]:
    """Pilots -> fit -> plan -> the planned run, in one call (`hf-cpt plan --run`): trains
    [`pilot_run_configs`] (default `pilot_steps`: 10 % of the budget, at least 8) into `<output_dir>.pilots/`,
    plans from them ([`plan_cpt`], `**kwargs`), writes the planned config as `<output_dir>.planned.yaml` and trains
    it into `output_dir` (`overwrite`: replace it). Returns the plan and the run's `CPTResult`."""
    from .train import run_cpt

    output_dir = Path(output_dir)
    steps = pilot_steps if pilot_steps is not None else max(8, budget_steps // 10)
    root = output_dir.with_name(f"{output_dir.name}.pilots")
    configs = pilot_run_configs(cfg, steps, pilot_schedules, replay_ratios)
    dirs = []
    for i, (name, pilot) in enumerate(configs.items()):
        logger.info("plan pilot %d/%d: %s, %d steps", i + 1, len(configs), name, steps)
        with training_bar_label(f"pilot {i + 1}/{len(configs)} {name}"):  # one bar per pilot, named
            dirs.append(run_cpt(pilot, output_dir=root / name, overwrite=True).output_dir)
    plan = plan_cpt(dirs, budget_steps, tolerance, **kwargs)
    planned = write_plan_config(plan, cfg, output_dir.with_name(f"{output_dir.name}.planned.yaml"))
    logger.info("planned run: %s", planned.monitor.prediction.source)
    return plan, run_cpt(planned, output_dir=output_dir, overwrite=overwrite)


def plan_cpt(run_dirs: Sequence[str | Path], budget_steps: int, tolerance: float, tolerance_mode: str = "relative",
             **kwargs: Any) -> CPTPlan:
    """Read pilot runs written by `hf-cpt train`, fit the learning-dynamics law and recommend a run.

    Args:
        run_dirs: pilot output directories from one starting model: at each replay ratio >= 2 LR schedules (e.g.
            constant and cosine); to choose a replay ratio, >= 2 replay ratios.
        budget_steps: updates of the planned run (>= the longest pilot).
        tolerance: allowed rise of the general held-out loss at the end of the run over its step-0 value
            (relative: 0.05 = 5%; absolute: nats).
        tolerance_mode: `relative` or `absolute`.
        **kwargs: `schedules`, `peak_lrs`, `replay_ratios` (candidate grids; within the pilots' range),
            `warmup_steps`, `min_lr_ratio`, `decay_fraction` (candidate shapes), `bootstrap`, `level`, `seed`,
            `pretrain_area`, `lr_before`, `shared_curve` (see [`fit_dynamics`]).

    Raises:
        ValueError / FileNotFoundError: unreadable pilots, pilots the law cannot be fitted to, a budget below the
            pilots, candidates outside the pilots' range.
    """
    if not run_dirs:
        raise ValueError("no pilot runs given: pass >= 2 output directories of `hf-cpt train`")
    read = [read_pilot(d) for d in run_dirs]
    tokens = {t for _, t in read}
    return plan_from_pilots([p for p, _ in read], budget_steps, tolerance, tolerance_mode,
                            tokens_per_step=tokens.pop() if len(tokens) == 1 else None, **kwargs)


def write_plan(plan: CPTPlan, path: str | Path) -> Path:
    """The plan as JSON (fit, candidates, recommendation, curves), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(plan.to_dict(), indent=1, default=float), encoding="utf-8")
    tmp.replace(path)
    return path


def plot_plan(plan: CPTPlan, path: str | Path) -> Path:
    """PNG: each pilot's measured general/domain losses (points) with the fitted law (lines), and the recommended
    run's predicted curves with the band and the tolerance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, p in enumerate(plan.fit.pilots):
        color = f"C{i % 10}"
        g, d = plan.fit.predict(p.lrs, p.domain_share)
        label = f"{p.schedule} r={1 - p.domain_share:g} ({len(p.lrs)} st)"
        for ax, measured, pred in ((axes[0], p.general, g), (axes[1], p.domain, d)):
            ax.plot(np.arange(len(pred)), pred, color=color, lw=1, label=label)
            ax.scatter(p.steps, measured, color=color, s=8)
    if plan.recommended is not None and plan.curves:
        c = plan.recommended
        x = np.arange(plan.budget_steps + 1)
        label = f"plan: {c.schedule}, lr {c.peak_lr:g}, replay {c.replay_ratio:g}"
        for ax, key in ((axes[0], "general"), (axes[1], "domain")):
            ax.plot(x, plan.curves[key], color="k", lw=2, label=label)
            if f"{key}_lo" in plan.curves:
                ax.fill_between(x, plan.curves[f"{key}_lo"], plan.curves[f"{key}_hi"], color="k", alpha=0.15,
                                label=f"{plan.level:.0%} band")
    axes[0].axhline(plan.general_bound, color="C3", ls="--", lw=1, label="tolerance")
    axes[0].set(title="general held-out loss", xlabel="step", ylabel="loss")
    axes[1].set(title="domain held-out loss", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=6)
    fig.tight_layout()
    from ..plotting import save_figure

    return save_figure(fig, path)
