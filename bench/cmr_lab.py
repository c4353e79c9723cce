"""The CPT lab's CMR runs only (bench/cpt_lab.py's model, data and cache), in priority order, and their raw curves
saved to docs/cpt_lab/cmr_curves.json so every CMR estimator can be refitted on them without training again.

    python bench/cmr_lab.py --cache ~/.cache/hf-cpt/cpt_lab --packing concat   # the lab of docs/benchmarks.md
    python bench/cmr_lab.py --stage all                                          # + the finer sweep and 3 orders

Stages: `core` = the 10 % pilots at domain shares 1 and 0.25 (constant LR, 40 steps) and the constant 400-step run
at 0.6; `all` adds data orders 1 and 2 of the 400-step runs at 0.75, 0.6 and 0.5, the shares that bracket the
measured CMR (so it has an error bar). The rest of the sweep (constant 400-step runs at 1, 0.9, 0.75, 0.5, 0.4,
0.25, 0.1, whose first 40 steps are the other pilots) is bench/cpt_lab.py's grid: run it first (`--runs-only`).
Every run is cached by bench/cpt_lab.py's key, so a rerun, or bench/cpt_lab.py itself, reuses them; the saved
curves are every constant-LR run in the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpt_lab as lab_mod

CORE = [("constant", 40, 0.25, 0), ("constant", 40, 1.0, 0), ("constant", 400, 0.6, 0)]
MORE = [("constant", 400, 0.6, 1), ("constant", 400, 0.75, 1), ("constant", 400, 0.6, 2), ("constant", 400, 0.75, 2),
        ("constant", 400, 0.5, 1), ("constant", 400, 0.5, 2)]


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("HF_CPT_LAB_CACHE",
                                                                     "~/.cache/hf-cpt/cpt_lab")).expanduser())
    p.add_argument("--out", type=Path, default=Path("docs/cpt_lab/cmr_curves.json"))
    p.add_argument("--packing", choices=("documents", "concat"), default="concat")
    p.add_argument("--stage", choices=("core", "all"), default="all")
    p.add_argument("--analyse-only", action="store_true", help="refit on the saved curves (--out), no training")
    p.add_argument("--bootstrap", type=int, default=100)
    a = p.parse_args()
    if a.analyse_only:
        rows = analyse(json.loads(a.out.read_text()), a.bootstrap)
        target = a.out.with_name("cmr_select.json")
        target.write_text(json.dumps({f"{k:g}": v for k, v in rows.items()}, indent=1, default=float))
        print(f"wrote {target}")
        return
    torch.set_num_threads(int(os.environ.get("LAB_THREADS", "1")))
    lab = lab_mod.LabConfig(packing=a.packing)
    a.cache.mkdir(parents=True, exist_ok=True)
    data = lab_mod.LabData(lab, a.cache)
    model, pt_info = lab_mod.pretrain(lab, data, a.cache)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    specs = CORE + (MORE if a.stage == "all" else [])
    for i, (schedule, steps, share, order) in enumerate(specs):
        t0 = time.perf_counter()
        spec = lab_mod.RunSpec(schedule, steps, share, lab.cpt_lr, order_seed=order)
        lab_mod.run(spec, lab, data, base, pt_info, a.cache)
        print(f"[{i + 1}/{len(specs)}] {spec} {time.perf_counter() - t0:.1f} s", flush=True)
        save(a.out, lab, pt_info, a.cache)


def save(path: Path, lab, pt_info: dict, cache: Path) -> None:
    """Every constant-LR run in the cache (this lab's settings): spec and evaluation history (the raw curves)."""
    runs = [json.loads(f.read_text()) for f in sorted((cache / "runs").glob("*.json"))]
    runs = [r for r in runs if r["spec"]["schedule"] == "constant"]
    out = {"lab": lab_mod._lab_key(lab), "tokens_per_step": lab.batch * lab.block,
           "pretrain": {k: pt_info[k] for k in ("history", "forward_area", "final_lr")},
           "runs": [{"spec": r["spec"], "history": r["history"], "seconds": r["seconds"]} for r in runs]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=0))
    tmp.replace(path)


def pilot_records(curves: dict, pilot_steps: int = 40) -> list:
    """The 10 % pilots: the order-0 constant runs at the lab's 4 main shares, evaluations every 4 updates up to
    `pilot_steps` (a constant-LR run's prefix is the shorter run)."""
    from hf_cpt.mixers.cmr import CMRRecord

    tps = curves["tokens_per_step"]
    out, seen = [], set()
    for r in sorted(curves["runs"], key=lambda r: r["spec"]["steps"]):
        s = r["spec"]
        if s.get("order_seed") or s["domain_share"] not in lab_mod.SHARES or s["domain_share"] in seen:
            continue
        seen.add(s["domain_share"])
        out += [CMRRecord(s["domain_share"], float(h["step"] * tps), h["general_loss"], h["domain_loss"])
                for h in r["history"] if h["step"] <= pilot_steps and h["step"] % 4 == 0]
    return out


def measured(curves: dict, bound: float, steps: int = 400) -> dict:
    """The CMR the sweep measures at `steps` (interpolated between the swept shares), per data order, and the
    spread over the orders that have every share bracketing it."""
    from hf_cpt.mixers.cmr import CMRRecord
    from hf_cpt.mixers.cmr_select import measured_ratio

    order0 = {}
    by_order: dict[int, dict[float, float]] = {}
    for r in curves["runs"]:
        s = r["spec"]
        if s["steps"] != steps:
            continue
        g = r["history"][-1]["general_loss"]
        by_order.setdefault(s.get("order_seed", 0), {})[s["domain_share"]] = g
    order0 = by_order.get(0, {})
    out = {"order0": measured_ratio([CMRRecord(p, steps, g, 0.0) for p, g in order0.items()], steps, bound)[0]}
    per = []
    for k, row in sorted(by_order.items()):
        # other orders were run at the bracketing shares only: the shares outside come from order 0
        full = {**order0, **row}
        per.append(measured_ratio([CMRRecord(p, steps, g, 0.0) for p, g in full.items()], steps, bound)[0])
    out["orders"] = per
    out["mean"] = float(np.mean(per))
    out["sd"] = float(np.std(per, ddof=1)) if len(per) > 1 else float("nan")
    return out


def analyse(curves: dict, bootstrap: int) -> dict:
    from hf_cpt.mixers.cmr_select import (
        PilotSchedule,
        format_selection,
        predict_selected_cmr,
        select_cmr_estimator,
    )

    lab = lab_mod.LabConfig(**{k: v for k, v in curves["lab"].items()})
    tps = curves["tokens_per_step"]
    records = pilot_records(curves)
    base = records[0].general_loss if records[0].tokens == 0 else None
    schedule = PilotSchedule(tps, lab.cpt_warmup, curves["pretrain"]["final_lr"] / lab.cpt_lr)
    pilot_tokens = sum(40 * tps for _ in lab_mod.SHARES)
    rows = {}
    for tol in (0.03, 0.05, 0.08):
        t0 = time.perf_counter()
        sel = select_cmr_estimator(records, tol, schedule=schedule)
        meas = measured(curves, sel.bound)
        print(f"\n## tolerance +{tol:.0%} (bound {sel.bound:.4f}; pre-CPT general {base:.4f})")
        print("\n".join(format_selection(sel)))
        try:
            pred = predict_selected_cmr(sel, 400.0 * tps, bootstrap=bootstrap)
        except ValueError as exc:
            print(f"refused: {exc}; measured {meas['order0']:.3f}")
            rows[tol] = {"selection": sel.to_dict(), "refused": str(exc), "measured": meas}
            continue
        print(f"CMR at {400 * tps:.3g} tokens: domain share {pred.cmr:.3f} (90% interval {pred.interval[0]:.3f}-"
              f"{pred.interval[1]:.3f}); measured {meas['order0']:.3f} (order 0), orders {np.round(meas['orders'], 3)}"
              f" mean {meas['mean']:.3f} sd {meas['sd']:.3f}; error {pred.cmr - meas['order0']:+.3f}; "
              f"{time.perf_counter() - t0:.0f} s")
        rows[tol] = {"selection": sel.to_dict(), "prediction": pred.to_dict(), "measured": meas}
    print(f"\npilot cost: {pilot_tokens:.0f} tokens (4 pilots x 40 updates) / {400 * tps:.0f} planned = "
          f"{pilot_tokens / (400 * tps):.2f} (summed over the 4 pilots; each pilot is 10 % of the run)")
    return rows


if __name__ == "__main__":
    main()
