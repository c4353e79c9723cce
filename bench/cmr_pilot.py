"""Real CMR pilot on the embedded default (SmolLM2-135M, Python docs vs KJV replay), CPU-sized, then the fit.

    python bench/cmr_pilot.py [--steps 40] [--budgets 5] [--ratios 0.25,0.5,0.75,1.0] [--out docs/cmr]

1. `run_cmr_pilot` on the quickstart template: one run per domain share, held-out losses at every budget.
2. Held-out check: fit on every budget but the largest, predict the losses at the largest budget, print the error.
3. Fit on everything, predict the CMR for a 10x larger run, write the plot and a JSON summary.
Prints the wall time of the pilot grid (goal: <= 30 minutes on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from hf_cpt.mixers.cmr import fit_cmr_law, plot_cmr, predict_cmr, read_records  # noqa: E402
from hf_cpt.recipe.cmr_pilot import run_cmr_pilot  # noqa: E402
from hf_cpt.config import CPTConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--budgets", type=int, default=5)
    p.add_argument("--ratios", default="0.25,0.5,0.75,1.0")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--out", type=Path, default=Path("docs/cmr"))
    p.add_argument("--reuse", action="store_true", help="fit the existing records instead of rerunning pilots")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    csv = a.out / "records.csv"
    cfg = CPTConfig.from_yaml(Path(__file__).with_name("quickstart_round2.yaml"))  # the recipe measured
    cfg.train.max_steps = a.steps
    t0 = time.perf_counter()
    if not a.reuse:
        run_cmr_pilot(cfg, [float(x) for x in a.ratios.split(",")], a.budgets, csv)
    wall = time.perf_counter() - t0
    records = read_records(csv)
    budgets = sorted({r.tokens for r in records if r.tokens > 0})
    print(f"pilot grid: {len(set(r.ratio for r in records))} ratios x {len(budgets)} budgets "
          f"({len(records)} records) in {wall / 60:.1f} min")

    held = budgets[-1]
    fit_part = fit_cmr_law([r for r in records if r.tokens < held], a.tolerance)
    errs = {"general": [], "domain": []}
    print(f"\nheld-out check: fitted on budgets < {held:.0f} tokens, predicting the losses at {held:.0f}")
    print(f"{'ratio':>6} {'general obs':>12} {'pred':>8} {'domain obs':>11} {'pred':>8}")
    for r in sorted((r for r in records if r.tokens == held), key=lambda r: r.ratio):
        pg, pd = float(fit_part.law.general_loss(held, r.ratio)), float(fit_part.law.domain_loss(held, r.ratio))
        errs["general"].append(pg - r.general_loss)
        errs["domain"].append(pd - r.domain_loss)
        print(f"{r.ratio:6.2f} {r.general_loss:12.4f} {pg:8.4f} {r.domain_loss:11.4f} {pd:8.4f}")
    summary = {k: float(np.max(np.abs(v))) for k, v in errs.items()}
    print("max abs error at the held-out budget: " + ", ".join(f"{k} {v:.4f} nats" for k, v in summary.items()))

    fit = fit_cmr_law(records, a.tolerance)
    target = 10 * held
    pred = predict_cmr(fit, target, bootstrap=100)
    plot_cmr(fit, pred, a.out / "cmr.png")
    print(f"\nCMR (tolerance {a.tolerance} relative) at pilot budgets: "
          + ", ".join(f"{b:.0f}: {c:.3f}" for b, c in zip(fit.budgets, fit.cmr_at_budgets)))
    print(f"predicted CMR at {target:.0f} tokens: {pred.cmr:.3f} (90% interval {pred.interval[0]:.3f}-"
          f"{pred.interval[1]:.3f}); replay_ratio {pred.replay_ratio:.3f}; paper's power law: {pred.power_law_cmr}")
    print(f"fit rmse: general {fit.rmse_general:.4f}, domain {fit.rmse_domain:.4f}")
    out = {"pilot_minutes": wall / 60, "heldout_budget": held, "heldout_max_abs_error": summary,
           "fit": fit.to_dict(), "prediction": vars(pred)}
    (a.out / "cmr_summary.json").write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
