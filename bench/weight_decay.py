"""Weight decay on everything vs hf-cpt's groups (none on embeddings, norms, biases), side by side.

Both arms run the same recipe on a tiny Llama built from config (the tiny tokenizer of `hf_cpt.testing`, Python
docs as domain, KJV replayed at 25 %): same seed, same data, same AdamW; only the decay groups differ.

* `everything`: every parameter decays (what a hand-rolled `AdamW(model.parameters(), weight_decay=wd)` does).
* `groups`: hf-cpt's default (`train.decay_embeddings: false`): weight matrices decay; embeddings, the tied head,
  norm gains and biases do not (OLMo's groups).

Reported per arm: held-out domain and general loss at the end; the RMS of the embedding matrix, and of the rows of
tokens that never occur in the training stream (decay shrinks them towards 0; with a tied head, as here, the softmax
also moves them, pushing unseen tokens' logits down, so they are not moved by decay alone); the mean norm gain (decay
pulls gains towards 0 too). A small setting: minutes on a CPU, not a claim about a 135M+ model.

    python bench/weight_decay.py [--steps 150] [--weight-decay 0.1] [--lr 3e-3] [--out docs/weight_decay.json]
"""

from __future__ import annotations

import argparse
import itertools
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

import torch  # noqa: E402

from hf_cpt.config import CPTConfig  # noqa: E402
from hf_cpt.recipe.train import build_data, build_model, build_trainer, build_training_args, preflight  # noqa: E402
from hf_cpt.testing import make_tiny_llama, make_tiny_tokenizer  # noqa: E402


def make_model_dir(root: Path) -> Path:
    tokenizer = make_tiny_tokenizer()
    out = root / "tiny"
    make_tiny_llama(len(tokenizer), hidden_size=64, num_layers=2).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run(arm: str, model_dir: Path, steps: int, wd: float, lr: float, workdir: Path) -> dict:
    cfg = CPTConfig.from_dict({
        "model": {"name_or_path": str(model_dir)},
        "data": {"block_size": 64, "max_eval_blocks": 8, "replay_ratio": 0.25, "dedup": None, "decontaminate": None},
        "train": {"max_steps": steps, "learning_rate": lr, "weight_decay": wd, "lr_scheduler_type": "constant",
                  "per_device_train_batch_size": 4, "eval_steps": steps, "logging_steps": steps, "seed": 0},
        "monitor": {"tolerance": 10.0},
    })
    args = build_training_args(cfg, workdir / arm)
    model, tokenizer, _ = build_model(cfg)
    preflight(cfg, model, args)
    data = build_data(cfg, model, tokenizer, args)
    seen = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    stream = build_data(cfg, model, tokenizer, args).train_set  # the exact stream the run reads (it cycles)
    for block in itertools.islice(stream, steps * cfg.train.per_device_train_batch_size):
        seen[torch.as_tensor(block["input_ids"])] = True
    trainer = build_trainer(cfg, args, model, tokenizer, data)
    if arm == "everything":  # what a plain AdamW over model.parameters() decays
        trainer.get_decay_parameter_names = lambda m: [n for n, _ in m.named_parameters()]
    emb = model.get_input_embeddings().weight
    rms0 = emb.detach()[~seen].pow(2).mean(dim=1).sqrt().mean().item()
    all0 = emb.detach().pow(2).mean().sqrt().item()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = trainer.evaluate()
    gains = [p.detach().mean().item() for n, p in model.named_parameters() if n.endswith("norm.weight")]
    return {
        "arm": arm, "domain_loss": losses["eval_domain_loss"], "general_loss": losses["eval_general_loss"],
        "unseen_rows": int((~seen).sum()), "unseen_row_rms_before": rms0,
        "unseen_row_rms_after": emb.detach()[~seen].pow(2).mean(dim=1).sqrt().mean().item(),
        "embedding_rms_before": all0, "embedding_rms_after": emb.detach().pow(2).mean().sqrt().item(),
        "mean_norm_gain": sum(gains) / len(gains), "train_s": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp))
        rows = [run(arm, model_dir, a.steps, a.weight_decay, a.lr, Path(tmp)) for arm in ("everything", "groups")]
    ev, gr = rows
    print(f"tiny Llama (hidden 64, 2 layers), {a.steps} updates, lr {a.lr}, weight decay {a.weight_decay}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'':28}{'everything':>12}{'groups':>12}{'groups/everything':>20}")
    for key in ("domain_loss", "general_loss", "embedding_rms_before", "embedding_rms_after",
                "unseen_row_rms_before", "unseen_row_rms_after", "mean_norm_gain", "train_s"):
        print(f"{key:28}{ev[key]:>12.4f}{gr[key]:>12.4f}{gr[key] / ev[key]:>20.4f}")
    print(f"unseen embedding rows: {ev['unseen_rows']} of the vocabulary")
    shrink_ev = 1 - ev["unseen_row_rms_after"] / ev["unseen_row_rms_before"]
    shrink_gr = 1 - gr["unseen_row_rms_after"] / gr["unseen_row_rms_before"]
    print(f"verdict: unseen embedding rows changed RMS by {-100 * shrink_ev:+.2f} % with decay on everything, "
          f"{-100 * shrink_gr:+.2f} % with the groups; embedding RMS ratio (groups/everything) "
          f"{gr['embedding_rms_after'] / ev['embedding_rms_after']:.4f}; domain loss {gr['domain_loss'] - ev['domain_loss']:+.4f}, general loss "
          f"{gr['general_loss'] - ev['general_loss']:+.4f} (groups - everything)")
    if a.out:
        a.out.write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
