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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpt_lab as lab_mod  # noqa: E402

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
    a = p.parse_args()
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


if __name__ == "__main__":
    main()
