"""Choosing the merge strength: the Pareto front of (KL to the base, domain loss) over the alphas of a sweep,
its knee, and `--pick` rules. Pure functions on plain rows, plus the plot.

A sweep row is ``{"alpha", "domain_loss", "kl": max KL over the general sets, "<set>_loss", "<set>_kl", ...}``.
Both coordinates are to be minimised: a row is on the front when no other row is at least as good on both and
better on one. The knee is the front point farthest from the straight line joining the front's two ends, with
both axes scaled to [0, 1] over the front (the "kneedle" idea: where trading more KL stops buying much domain
loss).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PICK_RULES = ("knee", "kl<=X", "alpha=A")
_KL_RULE = re.compile(r"^\s*kl\s*<=\s*([0-9.eE+-]+)\s*$")
_ALPHA_RULE = re.compile(r"^\s*alpha\s*=\s*([0-9.eE+-]+)\s*$")


def pareto_front(rows: Sequence[dict[str, Any]], x: str = "kl", y: str = "domain_loss") -> list[int]:
    """Indices of the rows no other row dominates on (`x`, `y`), both minimised, sorted by `x`."""
    points = [(float(r[x]), float(r[y])) for r in rows]
    front = [i for i, (a, b) in enumerate(points)
             if not any((c <= a and d <= b) and (c < a or d < b) for c, d in points)]
    return sorted(front, key=lambda i: points[i])


def knee_point(rows: Sequence[dict[str, Any]], x: str = "kl", y: str = "domain_loss") -> int:
    """Index of the knee of the Pareto front (see the module docstring); with one or two front points, the one
    with the lower `x` (less drift from the base)."""
    front = pareto_front(rows, x, y)
    if len(front) <= 2:
        return front[0]
    xs = [float(rows[i][x]) for i in front]
    ys = [float(rows[i][y]) for i in front]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    pts = [((a - min(xs)) / span_x, (b - min(ys)) / span_y) for a, b in zip(xs, ys)]
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    norm = math.hypot(x1 - x0, y1 - y0) or 1.0
    dist = [abs((y1 - y0) * px - (x1 - x0) * py + x1 * y0 - y1 * x0) / norm for px, py in pts]
    return front[max(range(len(front)), key=lambda j: (dist[j], -j))]


def parse_pick(rule: str) -> tuple[str, float | None]:
    """`knee`, `kl<=X` or `alpha=A` as `(kind, number)`.

    Raises:
        ValueError: any other text, naming the accepted forms.
    """
    text = str(rule).strip()
    if text == "knee":
        return "knee", None
    for kind, pattern in (("kl", _KL_RULE), ("alpha", _ALPHA_RULE)):
        match = pattern.match(text)
        if match:
            try:
                value = float(match.group(1))
            except ValueError:
                break
            if not math.isfinite(value) or (kind == "kl" and value < 0):
                break
            return kind, value
    raise ValueError(f"`pick` must be `knee`, `kl<=X` (X >= 0 nats/token) or `alpha=A`, got {rule!r}")


def pick_row(rows: Sequence[dict[str, Any]], rule: str) -> int:
    """The row `rule` chooses: `knee`; `kl<=X`, the lowest domain loss among rows whose KL (the maximum over the
    general sets) is at most X; `alpha=A`, that alpha.

    Raises:
        ValueError: no row satisfies the rule (naming the closest one).
    """
    if not rows:
        raise ValueError("no sweep rows to pick from")
    kind, value = parse_pick(rule)
    if kind == "knee":
        return knee_point(rows)
    if kind == "alpha":
        found = [i for i, r in enumerate(rows) if math.isclose(float(r["alpha"]), value, abs_tol=1e-9)]
        if not found:
            listed = ", ".join(f"{r['alpha']:g}" for r in rows)
            raise ValueError(f"`pick` {rule!r}: alpha {value:g} is not in the sweep ({listed})")
        return found[0]
    ok = [i for i, r in enumerate(rows) if float(r["kl"]) <= value]
    if not ok:
        best = min(range(len(rows)), key=lambda i: float(rows[i]["kl"]))
        raise ValueError(f"`pick` {rule!r}: no alpha keeps the KL to the base at or below {value:g} (the lowest is "
                         f"{float(rows[best]['kl']):.4g}, at alpha {rows[best]['alpha']:g}): raise X or add smaller "
                         "alphas")
    return min(ok, key=lambda i: (float(rows[i]["domain_loss"]), float(rows[i]["kl"])))


def sweep_table(rows: Sequence[dict[str, Any]], picked: int | None = None) -> str:
    """The sweep as aligned text: alpha, domain loss, each general set's loss and KL, downstream scores; `*` marks
    the Pareto front, `<-` the picked row."""
    if not rows:
        return ""
    front = set(pareto_front(rows))
    extra = [k for k in rows[0] if k not in ("alpha", "domain_loss", "kl") and not k.endswith("_stderr")]
    header = ["alpha", "domain loss", "KL (max)"] + [k if "/" in k else k.replace("_", " ") for k in extra] + ["front", ""]
    lines = [[f"{r['alpha']:g}", f"{r['domain_loss']:.4f}", f"{r['kl']:.4f}"]
             + [_cell(r.get(k)) for k in extra] + ["*" if i in front else "", "<- picked" if i == picked else ""]
             for i, r in enumerate(rows)]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
                     + [fmt.format(*line).rstrip() for line in lines])


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def plot_merge_sweep(rows: Sequence[dict[str, Any]], path: str | Path, picked: int | None = None,
                     title: str = "") -> Path:
    """Write a PNG: domain held-out loss against KL to the base for every alpha (labelled), the Pareto front as a
    line, the picked alpha circled."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .plotting import save_figure

    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    xs, ys = [float(r["kl"]) for r in rows], [float(r["domain_loss"]) for r in rows]
    ax.scatter(xs, ys, color="tab:gray", zorder=2, label="alpha")
    for r, a, b in zip(rows, xs, ys):
        ax.annotate(f"{r['alpha']:g}", (a, b), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front(rows)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:orange", marker="o", zorder=3,
            label="Pareto front")
    if picked is not None:
        ax.scatter([xs[picked]], [ys[picked]], s=160, facecolors="none", edgecolors="tab:red", linewidths=2,
                   zorder=4, label=f"picked: alpha {rows[picked]['alpha']:g}")
    ax.set_xlabel("KL(base ‖ merged) on general held-out text (nats/token, max over sets)")
    ax.set_ylabel("domain held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "merging with the base: alpha sweep")
    return save_figure(fig, path)


__all__ = ["knee_point", "pareto_front", "parse_pick", "pick_row", "plot_merge_sweep", "sweep_table"]
