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
    title: str = "",
) -> Path:
    """Write a PNG with one panel per held-out set (their scales differ), Δ vs step 0 in the legend.

    Args:
        history: records ``{"step", "<name>_loss"}`` as kept by [`ForgettingMonitorCallback`].
        path: output PNG path.
        tolerance: if given, draws the general-loss limit as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, name, color in ((axes[0], general, "tab:blue"), (axes[1], domain, "tab:orange")):
        pts = [(r["step"], r[f"{name}_loss"]) for r in history if f"{name}_loss" in r]
        ax.set_title(f"{name} held-out loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "no evaluations", ha="center", va="center", transform=ax.transAxes)
            continue
        steps, losses = zip(*pts)
        delta = losses[-1] - losses[0]
        ax.plot(steps, losses, marker="o", color=color,
                label=f"{losses[0]:.3f} → {losses[-1]:.3f} (Δ {delta:+.3f})")
        if name == general and tolerance is not None:
            limit = losses[0] * (1 + tolerance) if tolerance_mode == "relative" else losses[0] + tolerance
            ax.axhline(limit, ls="--", color="tab:red", label=f"tolerance ({tolerance:g} {tolerance_mode})")
        ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    path = Path(path)
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
