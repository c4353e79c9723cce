"""Vocabulary extension on the embedded default: distill vs ofa vs subword_mean vs mean vs random, side by side.

Each init runs the same recipe (the quickstart template: SmolLM2-135M, Python docs as domain, KJV as general
replay) with a `vocab:` block adding `--n-new` subwords learnt from the domain corpus; only `vocab.init` differs,
and every run gets the same extended tokenizer, so the per-token losses are comparable across inits. Reported per
init: seconds to learn the tokens, to build the OFA word vectors and to grow+initialise the model; held-out domain
and general loss at step 0 (before any training) and after `--steps` updates. A row with the base tokenizer
(no extension) is printed for reference: its losses are per *base* token, so compare them only loosely.

`--n-new` counts tokens the merged tokenizer uses on the domain corpus; the embedded Python docs support 3,783 of
them at `min_frequency: 2`, so 5,000 needs `--min-frequency 1` (the default here). Reported too: used tokens, BPE
intermediates and fertility on held-out domain and general text, and fertility reduction per 1,000 added rows.

    python bench/vocab_init.py [--n-new 5000] [--min-frequency 1] [--steps 30] [--inits distill,subword_mean]
                               [--out docs/vocab_init.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_cpt.config import CPTConfig  # noqa: E402
from hf_cpt.recipe.train import run_cpt  # noqa: E402

INITS = ["distill", "ofa", "subword_mean", "mean", "random"]


def run(init: str | None, n_new: int, steps: int, workdir: Path, min_frequency: int = 1) -> dict:
    cfg = CPTConfig.from_yaml(Path(__file__).with_name("quickstart_round2.yaml")).to_dict()
    cfg["train"].update(max_steps=steps, eval_steps=steps, logging_steps=steps)
    cfg["schedule"]["warmup_steps"] = min(cfg["schedule"]["warmup_steps"], steps)
    # losses per init only: no self-synthesised set (the extended model would sample its own) and no KL pass, so
    # the KJV loss is the general set and its guard (a benchmark: a loose bound, never stopping early)
    cfg["data"]["synth"] = None
    cfg["monitor"].update(kl=False, general="general", action="none",
                          guards=[{"set": "general", "metric": "loss", "tolerance": 10.0}])
    if init is not None:
        cfg["vocab"] = {"n_new_tokens": n_new, "init": init, "min_frequency": min_frequency}

    t0 = time.perf_counter()
    res = run_cpt(CPTConfig.from_dict(cfg), output_dir=workdir / (init or "base"))
    f, v = res.metrics["forgetting"], res.metrics.get("vocab") or {}
    return {
        "init": init or "(base tokenizer)",
        "added": v.get("added", 0),
        "learn_s": v.get("learn_seconds"),
        "extend_init_s": v.get("seconds"),
        "vocab_total_s": v.get("total_seconds"),
        "ofa_coverage": v.get("ofa_coverage"),
        "used": v.get("used"), "intermediates": v.get("intermediates"),
        "fertility": [v.get("fertility_before"), v.get("fertility_after")],
        "general_fertility": [v.get("general_fertility_before"), v.get("general_fertility_after")],
        "distill_mse_first_pass": v.get("distill_mse_first_pass"),
        "domain_step0": f["domain_loss_start"], "domain_end": f["domain_loss_end"],
        "general_step0": f["general_loss_start"], "general_end": f["general_loss_end"],
        "run_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-new", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--min-frequency", type=int, default=1)
    ap.add_argument("--inits", default=",".join(INITS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    inits = args.inits.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for init in inits + [None]:
            rows.append(run(init, args.n_new, args.steps, Path(tmp), args.min_frequency))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{__import__('torch').get_num_threads()}")
    fb, fa = rows[0]["fertility"]
    gb, ga = rows[0]["general_fertility"]
    print(f"+{rows[0]['added']} rows ({rows[0]['used']} used, {rows[0]['intermediates']} intermediates); domain "
          f"held-out fertility {fb:.3f} -> {fa:.3f} tokens/word ({1000 * (fb - fa) / rows[0]['added']:.4f} per 1,000 "
          f"rows); general {gb:.3f} -> {ga:.3f}\n")
    print(f"| init | learn tokens s | word vectors + extend/init s | domain loss step 0 | domain loss step "
          f"{args.steps} | general loss step 0 | general loss step {args.steps} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ext = "" if r["extend_init_s"] is None else f"{r['vocab_total_s'] - r['learn_s']:.1f} ({r['extend_init_s']:.1f})"
        learn = "" if r["learn_s"] is None else f"{r['learn_s']:.1f}"
        print(f"| {r['init']} | {learn} | {ext} | {r['domain_step0']:.4f} | {r['domain_end']:.4f} | "
              f"{r['general_step0']:.4f} | {r['general_end']:.4f} |")
    by = {r["init"]: r["domain_step0"] for r in rows}
    gen = {r["init"]: r["general_step0"] for r in rows}
    print(f"\nstep-0 domain loss order: {' <= '.join(sorted(inits, key=by.get))}")
    if "distill" in by and "subword_mean" in by:
        d, g = by["distill"] - by["subword_mean"], gen["distill"] - gen["subword_mean"]
        ok = d < 0 and g <= 0.02
        print(f"verdict: distill - subword_mean step-0 domain loss {d:+.4f}, general {g:+.4f}: "
              f"{'met' if ok else 'missed'}")
    if args.out:
        args.out.write_text(json.dumps({"n_new": args.n_new, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
