"""Rewarming study on the embedded default: constant LR vs re-warming to three maximum LRs.

Reproduces, at toy scale, the setting of "Continual Pre-Training of Large Language Models: How to (re)warm your
model?" (Gupta et al., 2023): continue pretraining a checkpoint on new data (here SmolLM2-135M on the Python
docs, *no replay*) with (a) a constant LR, the low LR a pretraining run typically ends at, and (b) a linear
re-warmup to a new maximum LR followed by cosine re-decay, for three maximum LRs. It records the upstream
(general: KJV) and downstream (domain: Python docs) held-out loss over training, writes a PNG with both curves
per run and prints a Markdown table.

    python examples/rewarm_study.py --out docs/rewarm_study      # ~20 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

from hf_cpt import (
    DataConfig,
    ForgettingMonitorCallback,
    ReplayMixerCallback,
    RewarmConfig,
    build_eval_sets,
    build_train_set,
    make_rewarm_optimizer,
    make_rewarm_scheduler,
)
from hf_cpt.recipe.models import resolve_model_path

RUNS = {  # name -> (peak LR, schedule)
    "constant 1e-5": (1e-5, RewarmConfig(schedule="constant")),
    "rewarm to 3e-5": (3e-5, RewarmConfig(warmup_steps=6, decay="cosine", min_lr_ratio=0.1)),
    "rewarm to 1e-4": (1e-4, RewarmConfig(warmup_steps=6, decay="cosine", min_lr_ratio=0.1)),
    "rewarm to 3e-4": (3e-4, RewarmConfig(warmup_steps=6, decay="cosine", min_lr_ratio=0.1)),
}


def run_one(path: str, peak: float, schedule: RewarmConfig, train, evals, steps: int, out: Path) -> list[dict]:
    model = AutoModelForCausalLM.from_pretrained(path)
    opt = make_rewarm_optimizer(model, schedule, learning_rate=peak)
    monitor = ForgettingMonitorCallback(tolerance=1.0, action="none")
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, per_device_eval_batch_size=16,
        learning_rate=peak, eval_strategy="steps", eval_steps=10, eval_on_start=True, logging_steps=10,
        save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                      data_collator=default_data_collator, callbacks=[monitor, ReplayMixerCallback(train)],
                      optimizers=(opt, make_rewarm_scheduler(opt, schedule, steps)))
    trainer.train()
    return monitor.history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("runs/rewarm_study"))
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    path = resolve_model_path("embedded:smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    data = DataConfig(replay_ratio=0.0, block_size=128, max_eval_blocks=16)  # no replay, as in the paper
    train = build_train_set(data, tok)  # every Trainer run iterates it from the start
    evals = build_eval_sets(data, tok)
    results = {}
    for name, (peak, schedule) in RUNS.items():
        t0 = time.perf_counter()
        results[name] = run_one(path, peak, schedule, train, evals, a.steps, a.out / "tmp")
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    (a.out / "rewarm_study.json").write_text(json.dumps(results, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, hist in results.items():
        steps = [r["step"] for r in hist]
        axes[0].plot(steps, [r["general_loss"] for r in hist], marker="o", label=name)
        axes[1].plot(steps, [r["domain_loss"] for r in hist], marker="o", label=name)
    for ax, title in zip(axes, ("upstream (general, KJV) held-out loss", "downstream (domain, Python docs) loss")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(a.out / "rewarm_study.png", dpi=110)

    print("\n| run | general @0 | general max | general end | domain @0 | domain end |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, hist in results.items():
        g = [r["general_loss"] for r in hist]
        d = [r["domain_loss"] for r in hist]
        print(f"| {name} | {g[0]:.4f} | {max(g):.4f} | {g[-1]:.4f} | {d[0]:.4f} | {d[-1]:.4f} |")


if __name__ == "__main__":
    main()
