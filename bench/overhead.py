"""Overhead of hf-cpt's Trainer glue: step time of a plain `Trainer` vs the same run with hf-cpt's callback.

Both runs train the same tiny Llama (built from config) on the same packed blocks, evaluate the same held-out
sets at the same steps, and differ only in `callbacks=[ForgettingMonitorCallback(...)]`. Runs alternate
(plain, hf-cpt, plain, ...) so drift on the machine hits both; the ratio is of the median training time per
optimizer step, excluding evaluation (both do the same evaluation work).

    python bench/overhead.py [--steps 60] [--repeats 5]

Goal: ratio <= 1.03.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from hf_cpt import DataConfig, ForgettingMonitorCallback, build_eval_sets, build_train_set
from hf_cpt.testing import make_tiny_llama, make_tiny_tokenizer


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (on_step_begin -> on_step_end); evaluation falls outside."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def run(with_hf_cpt: bool, train, evals, vocab: int, steps: int, out: str) -> float:
    timer = StepTimer()
    # the timer goes last so that hf-cpt's own step hooks run inside the measured window
    callbacks = ([ForgettingMonitorCallback(tolerance=1.0)] if with_hf_cpt else []) + [timer]
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=1e-3, eval_strategy="steps", eval_steps=20, eval_on_start=True, logging_steps=10,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_pin_memory=False,
    )
    trainer = Trainer(model=make_tiny_llama(vocab, hidden_size=128, num_layers=4), args=args, train_dataset=train,
                      eval_dataset=evals, data_collator=default_data_collator, callbacks=callbacks)
    trainer.train()
    return statistics.median(timer.times[2:])  # skip warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=9)
    a = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tok = make_tiny_tokenizer()
    data = DataConfig(block_size=128, max_eval_blocks=16)
    train = build_train_set(data, tok)
    evals = build_eval_sets(data, tok)
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as out:
        for i in range(a.repeats):
            # alternate which goes first, so a warm-up or drift effect does not favour one side
            for with_hf_cpt in ((False, True) if i % 2 == 0 else (True, False)):
                (ours if with_hf_cpt else plain).append(run(with_hf_cpt, train, evals, len(tok), a.steps, out))
    p, o = statistics.median(plain), statistics.median(ours)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"plain Trainer      median step: {p * 1e3:8.2f} ms  (runs: {', '.join(f'{x*1e3:.1f}' for x in plain)})")
    print(f"Trainer + hf-cpt   median step: {o * 1e3:8.2f} ms  (runs: {', '.join(f'{x*1e3:.1f}' for x in ours)})")
    print(f"overhead ratio (hf-cpt / plain): {o / p:.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
