"""Forgetting study on the embedded default: how much forgetting each hf-cpt defence saves, measured from the model.

Goal (issue "Forgetting you can see"): the best hf-cpt recipe shows >= 50% less forgetting than naive CPT — both
the KL from the base model and the rise of the loss on text the base model wrote itself (`general_self`) — while
keeping >= 90% of naive CPT's domain gain (the fall of the Python-docs held-out loss).

Runs (SmolLM2-135M, Python docs as domain, 128-token blocks, batch 4, the same domain tokens in every run):
  (a) naive CPT: constant LR, no replay;
  (b) rewarm + cosine re-decay, no replay;
  (c) (b) + 25% King James Bible replay;
  (d) (b) + 25% self-synthesised replay (text the base model wrote; disjoint from the held-out `general_self`);
  (e) (d) + distillation replay (KL to the base on the replay tokens, precomputed top-64 targets).
Replay runs take 1 / (1 - 0.25) times the updates, so every run sees the same domain tokens.

Each run is `hf_cpt.run_cpt` on the quickstart template with overrides; results are cached in
`<out>/tmp/<run>/metrics.json`, so a rerun only re-draws the table and the plot.

    python examples/forgetting_study.py --out docs/forgetting_study --steps 24   # ~35 min on 2 CPU cores

This script reproduces the recorded study on the embedded default. For defences x seeds on any config of your own
(any held-out sets, the Pareto front on shared axes, a verdict), use `hf-cpt study CONFIG ... --defences ...
--seeds ...` (hf_cpt/recipe/study.py; docs/forgetting.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hf_cpt import CPTConfig, run_cpt

GOAL_REDUCTION, GOAL_GAIN = 0.5, 0.9


def runs(steps: int, lr: float) -> dict[str, dict]:
    """Overrides of the quickstart template per run."""
    replay_steps = round(steps / 0.75)
    warm = max(1, steps // 10)
    rewarm = {"schedule": "rewarm", "warmup_steps": warm, "decay": "cosine", "min_lr_ratio": 0.1}
    no_replay = {"data.replay_ratio": 0.0}
    kjv = {"data.replay_ratio": 0.25, "train.max_steps": replay_steps, "schedule": {**rewarm, "warmup_steps":
                                                                                     round(warm / 0.75)}}
    self_replay = {**kjv, "data.general": {"train": "self", "eval": "embedded:kjv/validation"},
                   "data.synth.train_tokens": 4096}
    return {
        "a naive (constant LR, no replay)": {**no_replay, "schedule": {"schedule": "constant", "warmup_steps": 0}},
        "b rewarm + re-decay": {**no_replay, "schedule": rewarm},
        "c b + KJV replay 25%": kjv,
        "d b + self-synth replay 25%": self_replay,
        "e d + distillation replay": {**self_replay, "train.distill": {"weight": 1.0, "tokens": "replay", "top_k": 64}},
    }


def run_all(out: Path, steps: int, lr: float) -> dict[str, dict]:
    # the round-two quickstart recipe the study in docs/benchmarks.md was measured with
    base = CPTConfig.from_yaml(Path(__file__).resolve().parents[1] / "bench" / "quickstart_round2.yaml").override({
        "train.max_steps": steps, "train.learning_rate": lr, "train.eval_steps": 10, "train.logging_steps": 10,
        "data.max_eval_blocks": 16, "data.synth.eval_tokens": 2048, "monitor.action": "none",
    })
    results = {}
    for name, changes in runs(steps, lr).items():
        cached = out / "tmp" / name.split()[0] / "metrics.json"
        if cached.is_file():
            results[name] = json.loads(cached.read_text())
            print(f"{name}: cached", flush=True)
            continue
        cfg = base.override(changes)
        t0 = time.perf_counter()
        metrics = run_cpt(cfg, output_dir=cached.parent, overwrite=True).metrics
        metrics["wall_s"] = time.perf_counter() - t0
        cached.write_text(json.dumps(metrics, indent=1))
        results[name] = metrics
        print(f"{name}: {metrics['wall_s']:.0f} s", flush=True)
    return results


def summarise(results: dict[str, dict]) -> dict[str, dict]:
    rows = {}
    for name, m in results.items():
        f = m["forgetting"]
        rows[name] = {
            "domain_delta": f["domain_delta"],
            "general_self_delta": f["general_self_delta"],
            "kjv_delta": f["general_delta"],
            "kl_self": f["general_self_kl_end"],
            "kl_kjv": f["general_kl_end"],
            "top1_self": f["general_self_top1_agree_end"],
            "domain_tokens": m["train_tokens"]["domain"],
            "updates": m["global_step"],
            "wall_s": m.get("wall_s", m.get("total_runtime_s")),
        }
    return rows


def verdict(rows: dict[str, dict]) -> tuple[str, dict]:
    naive = rows[next(iter(rows))]
    scores = {}
    for name, r in list(rows.items())[1:]:
        scores[name] = {
            "kl_reduction": 1 - r["kl_self"] / naive["kl_self"],
            "self_loss_reduction": 1 - r["general_self_delta"] / naive["general_self_delta"],
            "domain_gain_kept": r["domain_delta"] / naive["domain_delta"],
        }
        s = scores[name]
        s["met"] = (s["kl_reduction"] >= GOAL_REDUCTION and s["self_loss_reduction"] >= GOAL_REDUCTION
                    and s["domain_gain_kept"] >= GOAL_GAIN)
    eligible = [n for n, s in scores.items() if s["domain_gain_kept"] >= GOAL_GAIN] or list(scores)
    best = max(eligible, key=lambda n: min(scores[n]["kl_reduction"], scores[n]["self_loss_reduction"]))
    s = scores[best]
    status = "MET" if s["met"] else "MISSED"
    text = (f"Verdict: goal {status}. Best recipe: {best}: KL to base (general_self) {s['kl_reduction']:.0%} lower "
            f"and general_self loss rise {s['self_loss_reduction']:.0%} lower than naive CPT (goal >= "
            f"{GOAL_REDUCTION:.0%} each), keeping {s['domain_gain_kept']:.0%} of its domain gain (goal >= "
            f"{GOAL_GAIN:.0%}).")
    if not s["met"]:
        short = [f"{k} short by {GOAL_REDUCTION - s[k]:.0%}" for k in ("kl_reduction", "self_loss_reduction")
                 if s[k] < GOAL_REDUCTION]
        if s["domain_gain_kept"] < GOAL_GAIN:
            short.append(f"domain gain kept short by {GOAL_GAIN - s['domain_gain_kept']:.0%}")
        text += " Missed: " + "; ".join(short) + "."
    return text, scores


def table(rows: dict[str, dict]) -> str:
    lines = ["| run | updates | domain tokens | Δ domain loss | Δ general_self loss | Δ KJV loss | KL self | KL KJV "
             "| top-1 agree self | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['updates']} | {r['domain_tokens']:,} | {r['domain_delta']:+.4f} | "
                     f"{r['general_self_delta']:+.4f} | {r['kjv_delta']:+.4f} | {r['kl_self']:.4f} | "
                     f"{r['kl_kjv']:.4f} | {r['top1_self']:.1%} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), constrained_layout=True)
    panels = (("domain_loss", "domain (Python docs) held-out loss"),
              ("general_self_loss", "general_self loss (text the base wrote)"),
              ("general_self_kl", "KL(base ‖ model) on general_self"))
    for ax, (key, title) in zip(axes, panels):
        for name, m in results.items():
            pts = [(r["step"], r[key]) for r in m["eval_history"] if key in r]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="updates of the no-replay runs")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak (and constant) learning rate")
    parser.add_argument("--out", type=Path, default=Path("runs/forgetting_study"))
    a = parser.parse_args()
    (a.out / "tmp").mkdir(parents=True, exist_ok=True)
    results = run_all(a.out, a.steps, a.lr)
    rows = summarise(results)
    text, scores = verdict(rows)
    (a.out / "forgetting_study.json").write_text(json.dumps({"rows": rows, "scores": scores, "verdict": text,
                                                             "steps": a.steps, "lr": a.lr}, indent=1))
    plot(results, a.out / "forgetting_study.png")
    print("\n" + table(rows) + "\n")
    for name, s in scores.items():
        print(f"- {name}: KL -{s['kl_reduction']:.0%}, general_self rise -{s['self_loss_reduction']:.0%}, "
              f"domain gain kept {s['domain_gain_kept']:.0%}")
    print("\n" + text)


if __name__ == "__main__":
    main()
