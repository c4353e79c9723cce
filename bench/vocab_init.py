"""Vocabulary extension on the embedded default: ofa vs subword_mean vs mean vs random, side by side.

Each init runs the same recipe (the quickstart template: SmolLM2-135M, Python docs as domain, KJV as general
replay) with a `vocab:` block adding `--n-new` subwords learnt from the domain corpus; only `vocab.init` differs,
and every run gets the same extended tokenizer, so the per-token losses are comparable across inits. Reported per
init: seconds to learn the tokens, to build the OFA word vectors and to grow+initialise the model; held-out domain
and general loss at step 0 (before any training) and after `--steps` updates. A row with the base tokenizer
(no extension) is printed for reference: its losses are per *base* token, so compare them only loosely.

    python bench/vocab_init.py [--n-new 5000] [--steps 30] [--out docs/vocab_init.json]
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

from hf_cpt.templates import load_template  # noqa: E402
from hf_cpt.recipe.train import run_cpt  # noqa: E402

INITS = ["ofa", "subword_mean", "mean", "random"]


def run(init: str | None, n_new: int, steps: int, workdir: Path) -> dict:
    cfg = load_template("quickstart").to_dict()
    cfg["train"].update(max_steps=steps, eval_steps=steps, logging_steps=steps)
    cfg["schedule"]["warmup_steps"] = min(cfg["schedule"]["warmup_steps"], steps)
    cfg["monitor"]["tolerance"] = 10.0  # a benchmark: never stop early
    if init is not None:
        cfg["vocab"] = {"n_new_tokens": n_new, "init": init}
    from hf_cpt.config import CPTConfig

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
        "fertility": [v.get("fertility_before"), v.get("fertility_after")],
        "domain_step0": f["domain_loss_start"], "domain_end": f["domain_loss_end"],
        "general_step0": f["general_loss_start"], "general_end": f["general_loss_end"],
        "run_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-new", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for init in INITS + [None]:
            rows.append(run(init, args.n_new, args.steps, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{__import__('torch').get_num_threads()}")
    fb, fa = rows[0]["fertility"]
    print(f"+{rows[0]['added']} tokens; domain held-out fertility {fb:.3f} -> {fa:.3f} tokens/word\n")
    print(f"| init | learn tokens s | word vectors + extend/init s | domain loss step 0 | domain loss step "
          f"{args.steps} | general loss step 0 | general loss step {args.steps} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ext = "" if r["extend_init_s"] is None else f"{r['vocab_total_s'] - r['learn_s']:.1f} ({r['extend_init_s']:.1f})"
        learn = "" if r["learn_s"] is None else f"{r['learn_s']:.1f}"
        print(f"| {r['init']} | {learn} | {ext} | {r['domain_step0']:.4f} | {r['domain_end']:.4f} | "
              f"{r['general_step0']:.4f} | {r['general_end']:.4f} |")
    by = {r["init"]: r["domain_step0"] for r in rows}
    order = " <= ".join(sorted(INITS, key=by.get))
    print(f"\nstep-0 domain loss order: {order}")
    print(f"ratio random/ofa step-0 domain loss excess over ofa: "
          f"{(by['random'] - by['ofa']):.3f} nats; subword_mean - ofa: {(by['subword_mean'] - by['ofa']):+.3f}")
    if args.out:
        args.out.write_text(json.dumps({"n_new": args.n_new, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
