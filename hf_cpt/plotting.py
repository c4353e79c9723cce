"""The forgetting plot: general vs domain held-out loss over training steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_forgetting(
    history: list[dict[str, float]],
    path: str | Path,
    general: str = "general",
    domain: str = "domain",
    tolerance: float | None = None,
    tolerance_mode: str = "relative",
    tolerance_metric: str = "loss",
    title: str = "",
    downstream: list[dict[str, float]] | None = None,
    guards: list[dict[str, Any]] | None = None,
    domain_sets: tuple[str, ...] | list[str] = (),
    prediction: dict[str, Any] | None = None,
) -> Path:
    """Write a PNG: general held-out losses (every general set), domain loss, the KL to the base model with
    top-1 agreement when measured, and downstream (lm-eval) task scores when given; Δ vs step 0 in the legends.

    Args:
        history: records ``{"step", "<name>_loss", "<name>_kl", ...}`` as kept by [`ForgettingMonitorCallback`].
        path: output PNG path.
        tolerance: one guard on `general` (its `tolerance_mode` and `tolerance_metric`), when `guards` is not given.
        downstream: records ``{"step", "<task>/<metric>": value, ...}`` as kept by [`DownstreamEvalCallback`].
        guards: the monitor's guards (`metrics.json` `forgetting.guards`: `guarded_set`, `tolerance_metric`,
            `tolerance_bound`, `tolerance_breached`, ...): each bound is a dashed line in its set's colour on the
            panel of what it guards (that set's loss, or the KL panel), labelled with the set, the bound and
            whether it was breached.
        domain_sets: more domain sets (named `data.eval_sets` of kind domain), drawn beside `domain`; every other set
            is drawn as general.
        prediction: predicted vs measured (`metrics.json` `forgetting.prediction`, from
            [`hf_cpt.prediction.compare_prediction`]): the predicted curve and its band are drawn under the measured
            `general` and `domain` curves, measurements outside the band marked with a red x.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: never needs a display
    import matplotlib.pyplot as plt

    from .monitoring import tolerance_bound

    if guards is None:
        guards = [] if tolerance is None else [{"guarded_set": general, "tolerance_metric": tolerance_metric,
                                                 "tolerance": tolerance, "tolerance_mode": tolerance_mode}]
    on_domain = {domain, *domain_sets}
    # the weight average's and the merge's copies of a domain set (`avg_<set>`, `merged_<set>`) are domain sets too
    on_domain |= {f"{p}{n}" for p in ("avg_", "merged_") for n in list(on_domain)}
    logged = {k[: -len("_loss")] for r in history for k in r if k.endswith("_loss")}
    sets = [general] + sorted(logged - {general} - on_domain) + [domain] + sorted(
        (set(domain_sets) | (on_domain & logged)) - {domain})
    has_kl = any(k.endswith("_kl") for r in history for k in r)
    scores = sorted({k for r in downstream or [] for k in r if k != "step" and "_stderr" not in k})
    panels = 2 + has_kl + bool(scores)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), constrained_layout=True)
    palette = ["tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:gray", "tab:cyan", "tab:olive", "tab:pink"]
    colors = dict(zip([n for n in sets if n not in on_domain], palette * len(sets)))
    colors.update(zip([n for n in sets if n in on_domain], ["tab:orange", "tab:red", "gold", "tab:pink"] * len(sets)))
    axes[0].set_title("general held-out loss")
    axes[1].set_title("domain held-out loss" if len(on_domain) > 1 else f"{domain} held-out loss")
    for ax in axes[:2]:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    for name in sets:
        ax = axes[1] if name in on_domain else axes[0]
        pts = [(r["step"], r[f"{name}_loss"]) for r in history if f"{name}_loss" in r]
        if not pts:
            continue
        steps, losses = zip(*pts)
        delta = losses[-1] - losses[0]
        ax.plot(steps, losses, marker="o", color=colors[name],
                label=f"{name}: {losses[0]:.3f} → {losses[-1]:.3f} (Δ {delta:+.3f})")
        for g in guards:
            if g["guarded_set"] == name and g["tolerance_metric"] == "loss":
                bound = tolerance_bound(losses[0], g["tolerance"], g["tolerance_mode"])
                ax.axhline(bound, ls="--", color=colors[name], label=_guard_label(g, bound))
    if prediction:
        for ax, role in ((axes[0], "general"), (axes[1], "domain")):
            _draw_prediction(ax, prediction, role)
    if has_kl:
        ax = axes[2]
        ax.set_title("KL(base ‖ model) on general sets")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats/token")
        ax.grid(alpha=0.3)
        for name in sets:
            pts = [(r["step"], r[f"{name}_kl"]) for r in history if f"{name}_kl" in r]
            if pts:
                steps, kls = zip(*pts)
                agree = [r.get(f"{name}_top1_agree") for r in history if f"{name}_kl" in r][-1]
                ax.plot(steps, kls, marker="o", color=colors[name],
                        label=f"{name}: KL {kls[-1]:.3f}" + (f", top-1 agree {agree:.0%}" if agree is not None else ""))
                for g in guards:
                    if g["guarded_set"] == name and g["tolerance_metric"] == "kl":
                        bound = tolerance_bound(kls[0], g["tolerance"], g["tolerance_mode"])
                        ax.axhline(bound, ls="--", color=colors[name], label=_guard_label(g, bound))
    if scores:
        ax = axes[-1]
        ax.set_title("downstream tasks (lm-eval)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
        for key in scores:
            pts = [(r["step"], r[key]) for r in downstream if key in r]
            steps, values = zip(*pts)
            ax.plot(steps, values, marker="o",
                    label=f"{key}: {values[0]:.3f} → {values[-1]:.3f} (Δ {values[-1] - values[0]:+.3f})")
    for ax in axes:
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no evaluations", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _draw_prediction(ax: Any, prediction: dict[str, Any], role: str) -> None:
    rows = [e for e in prediction.get("evals", []) if f"{role}_predicted" in e]
    if not rows:
        return
    steps = [e["step"] for e in rows]
    ax.fill_between(steps, [e[f"{role}_lo"] for e in rows], [e[f"{role}_hi"] for e in rows], color="0.6", alpha=0.3,
                    lw=0, zorder=0, label="plan: predicted band")
    ax.plot(steps, [e[f"{role}_predicted"] for e in rows], ls=":", color="0.3", zorder=1, label="plan: predicted")
    out = [(e["step"], e[f"{role}_measured"]) for e in rows if e.get(f"{role}_inside") is False]
    if out:
        ax.scatter(*zip(*out), marker="x", color="red", s=50, zorder=3,
                   label=f"outside the band ({len(out)}/{len(rows)})")


def _guard_label(guard: dict[str, Any], bound: float) -> str:
    status = {True: ", breached", False: ", held"}.get(guard.get("tolerance_breached"), "")
    what = "KL" if guard["tolerance_metric"] == "kl" else "loss"
    return f"guard: {guard['guarded_set']} {what} ≤ {bound:.3f}{status}"


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG at `path` (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_history_table(history: list[dict[str, Any]], general: str = "general", domain: str = "domain") -> str:
    """Markdown table of the held-out losses per evaluated step."""
    rows = ["| step | general loss | domain loss |", "|---:|---:|---:|"]
    for r in history:
        g, d = r.get(f"{general}_loss"), r.get(f"{domain}_loss")
        rows.append(f"| {r['step']} | {'' if g is None else f'{g:.4f}'} | {'' if d is None else f'{d:.4f}'} |")
    return "\n".join(rows)
