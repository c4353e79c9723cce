"""Cost of downstream (lm-eval) evaluation vs one held-out-loss evaluation, on the embedded SmolLM2-135M.

    python bench/downstream_eval.py [--limit N] [--repeats 2]

Measured side by side in one process on the same model, with the quickstart's settings:
1. one held-out-loss evaluation: `Trainer.evaluate()` on the quickstart's general (KJV) and domain (Python docs)
   held-out sets (12 blocks of 128 tokens each, batch 16) — what the forgetting monitor runs at every evaluation;
2. one downstream call: `DownstreamEvalCallback.evaluate` on the two shipped offline tasks with `--limit`
   documents each (4 choices per document) — what `downstream:` adds to an evaluation.
Prints the seconds per call (best of `--repeats`), the ratio, the base model's scores, and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: the quickstart's `limit`)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the quickstart's")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_cpt.callbacks.downstream import DownstreamConfig, DownstreamEvalCallback
    from hf_cpt.evaluation import OFFLINE_TASKS
    from hf_cpt.recipe.data import build_eval_sets
    from hf_cpt.recipe.models import load_model_and_tokenizer
    from hf_cpt.config import CPTConfig

    cfg = CPTConfig.from_yaml(Path(__file__).with_name("quickstart_round2.yaml"))  # the recipe measured
    a.limit = a.limit or cfg.downstream.limit
    a.batch_size = a.batch_size or cfg.downstream.batch_size
    model, tok = load_model_and_tokenizer(cfg.model)
    evals = build_eval_sets(cfg.data, tok)
    args = TrainingArguments("/tmp/hfcpt-bench-downstream", report_to="none",
                             per_device_eval_batch_size=cfg.train.per_device_eval_batch_size, disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available(), prediction_loss_only=True)
    trainer = Trainer(model=model, args=args, eval_dataset=evals, data_collator=default_data_collator)
    held_out_s, losses = best_of(trainer.evaluate, a.repeats)
    blocks = {k: len(v) for k, v in evals.items()}

    cb = DownstreamEvalCallback(DownstreamConfig(tasks=list(OFFLINE_TASKS), limit=a.limit, batch_size=a.batch_size))
    model.train()  # as inside training: the call must restore it
    downstream_s, scores = best_of(lambda: cb.evaluate(model, tok), a.repeats)
    assert model.training

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    print(f"held-out loss evaluation ({', '.join(f'{k}: {n} blocks' for k, n in blocks.items())}): "
          f"{held_out_s:.2f} s per call; losses " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()
                                                                if k.endswith('_loss')))
    print(f"downstream call ({len(OFFLINE_TASKS)} tasks x {a.limit} documents x 4 choices, batch {a.batch_size}): "
          f"{downstream_s:.2f} s per call")
    print(f"ratio downstream / held-out: {downstream_s / held_out_s:.2f}")
    print("base scores: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    per_doc = downstream_s / (len(OFFLINE_TASKS) * a.limit)
    print(f"verdict: {per_doc:.3f} s per document; at limit {a.limit} a downstream call costs "
          f"{downstream_s / held_out_s:.1f} held-out evaluations")


if __name__ == "__main__":
    main()
