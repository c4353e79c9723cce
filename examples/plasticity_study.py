"""Plasticity study: does pretraining with active forgetting make a new embedding layer faster to learn?

Follows "Improving Language Plasticity via Pretraining with Active Forgetting" (Chen et al., 2023) at toy scale,
offline on a CPU:

1. Pretrain two identical small Llamas from config (same seed, data and budget) on corpus A (King James Bible,
   tokenizer A), one plainly, one with the embeddings reset every K updates (`ActiveForgettingCallback`).
2. Adapt each to corpus B (Python docs) with a NEW tokenizer B: swap in a freshly initialised embedding layer
   (tied head), freeze the body (`relearn_embeddings`) and train only the embeddings on a low-data budget.
3. Report the held-out loss on corpus B during relearning, as a PNG and a Markdown table.

    python examples/plasticity_study.py --out docs/plasticity_study      # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, default_data_collator

import itertools

import datasets

from hf_cpt import (ActiveForgettingCallback, DataConfig, DocumentMaskingGuard, ReplayMixerCallback, SourceConfig,
                    build_eval_sets, build_train_set)
from hf_cpt.callbacks.active_forgetting import relearn_embeddings
from hf_cpt.testing import make_tiny_llama, read_embedded, train_bpe_tokenizer

HIDDEN, LAYERS, VOCAB, BLOCK = 128, 4, 2000, 64


def data_for(corpus: str, tok, num_blocks: int, eval_blocks: int = 32):
    src = SourceConfig(f"embedded:{corpus}/train", f"embedded:{corpus}/validation")
    cfg = DataConfig(domain=src, general=src, replay_ratio=0.0, block_size=BLOCK, max_eval_blocks=eval_blocks)
    train = build_train_set(cfg, tok)
    return train, build_eval_sets(cfg, tok)["domain"]


def args_for(out: Path, steps: int, lr: float, eval_steps: int | None = None) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        learning_rate=lr, warmup_steps=min(100, steps // 10), lr_scheduler_type="constant_with_warmup",
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps, eval_on_start=bool(eval_steps),
        logging_steps=50, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        dataloader_pin_memory=False,
    )


def pretrain(tok_a, k: int | None, steps: int, out: Path):
    model = make_tiny_llama(len(tok_a), seed=0, hidden_size=HIDDEN, num_layers=LAYERS)
    train, _ = data_for("kjv", tok_a, steps * 16)
    callbacks = [ReplayMixerCallback(train)] + ([ActiveForgettingCallback(every_k_updates=k)] if k else [])
    Trainer(model=model, args=args_for(out, steps, 1e-3), train_dataset=train,
            data_collator=default_data_collator, callbacks=callbacks).train()
    return model


def relearn(model, tok_b, steps: int, budget_blocks: int, out: Path) -> list[dict]:
    torch.manual_seed(1)  # the same new embedding init for both models
    emb = torch.nn.Embedding(len(tok_b), HIDDEN)
    torch.nn.init.normal_(emb.weight, std=model.config.initializer_range)
    model.set_input_embeddings(emb)
    model.lm_head.weight = emb.weight  # keep the head tied to the new embeddings
    model.config.vocab_size = len(tok_b)
    relearn_embeddings(model)
    train, held_out = data_for("python-docs", tok_b, budget_blocks)
    # low-data regime: cycle the same `budget_blocks` blocks for `steps` updates
    blocks = list(itertools.islice(iter(train), budget_blocks))
    train = datasets.Dataset.from_list([blocks[i % len(blocks)] for i in range(steps * 16)])
    DocumentMaskingGuard.attach(model)  # document-packed blocks outside a ReplayMixer: keep them per document
    trainer = Trainer(model=model, args=args_for(out, steps, 1e-3, eval_steps=max(steps // 12, 1)),
                      train_dataset=train, eval_dataset=held_out, data_collator=default_data_collator)
    trainer.train()
    return [{"step": h["step"], "loss": h["eval_loss"]} for h in trainer.state.log_history if "eval_loss" in h]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--k", type=int, default=250, help="active forgetting: reset every K updates")
    p.add_argument("--relearn-steps", type=int, default=300)
    p.add_argument("--budget-blocks", type=int, default=128, help="corpus-B blocks available for relearning")
    p.add_argument("--out", type=Path, default=Path("runs/plasticity_study"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    tok_a = train_bpe_tokenizer(read_embedded("kjv", limit=400), VOCAB)
    tok_b = train_bpe_tokenizer(read_embedded("python-docs", limit=150), VOCAB)
    curves = {}
    for name, k in (("standard pretraining", None), (f"active forgetting (K={a.k})", a.k)):
        model = pretrain(tok_a, k, a.pretrain_steps, a.out / "tmp")
        curves[name] = relearn(model, tok_b, a.relearn_steps, a.budget_blocks, a.out / "tmp")
        print(name, [round(c["loss"], 3) for c in curves[name]], flush=True)
    (a.out / "plasticity_study.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                              "curves": curves}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for name, c in curves.items():
        ax.plot([r["step"] for r in c], [r["loss"] for r in c], marker="o", label=name)
    ax.set(title="relearning new embeddings on corpus B (body frozen)", xlabel="update", ylabel="held-out loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(a.out / "plasticity_study.png", dpi=110)
    names = list(curves)
    print("\n| update | " + " | ".join(names) + " |\n|---:|" + "---:|" * len(names))
    for i, r in enumerate(curves[names[0]]):
        print(f"| {r['step']} | " + " | ".join(f"{curves[n][i]['loss']:.4f}" for n in names) + " |")


if __name__ == "__main__":
    main()
