"""Tokens/s and peak memory of CPT training steps on a Llama-3.2-1B-shaped model: plain `Trainer`, `Trainer` +
Liger (`use_liger_kernel=True`), and hf-cpt's default path, side by side in one run.

The model is built from a config (random weights, nothing downloaded): Llama-3.2-1B's shape (hidden 2048, 16
layers, 32 heads / 8 KV heads, MLP 8192, tied embeddings), bf16, sequence 2048, with a 128k and a 256k vocabulary
(the output head and its logits dominate memory as the vocabulary grows). The same random token blocks feed every
variant: a pre-packed `datasets.Dataset` for the two `Trainer` baselines, a prepared store read by
`PreparedMixer` (with `ReplayMixerCallback`) for hf-cpt, whose loss is what `choose_loss` picks (Liger where it
applies, else the chunked loss).

    python bench/gpu_throughput.py [--steps 10] [--warmup 3] [--batch 1] [--seq 2048] [--vocabs 128256,256000]
    python bench/gpu_throughput.py --tiny      # CPU smoke shape (CI runs it so the script cannot rot)

Prints per variant: median step time, tokens/s, peak GiB (CUDA only), and hf-cpt's ratios to HF+Liger
(goal: tokens/s >= 1, peak memory <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from hf_cpt.callbacks.replay_mixer import ReplayMixerCallback  # noqa: E402
from hf_cpt.import_utils import is_liger_available  # noqa: E402
from hf_cpt.liger import choose_loss  # noqa: E402
from hf_cpt.mixers.prepared import MANIFEST, STORE_VERSION, PreparedMixer  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (CUDA synchronised), after `warmup` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t)


def write_token_store(path: Path, blocks: np.ndarray, vocab: int) -> Path:
    """A prepared store (the layout `prepare_sources` writes) holding `blocks` as one source `domain`: one
    document per block, so the mixer's blocks are the very same tokens the baselines read."""
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    ds = datasets.Dataset.from_dict({"input_ids": blocks.astype(np.int32).tolist()}, features=features)
    ds.save_to_disk(str(path / "domain"))
    manifest = {"fingerprint": {"version": STORE_VERSION, "tokenizer": "random-tokens", "sources": {}},
                "vocab_size": vocab, "sources": {"domain": {"dir": "domain", "documents": len(blocks),
                                                            "tokens": int(blocks.size)}}}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def run_variant(name: str, vocab: int, shape: dict, a, blocks: np.ndarray, store: Path, out: Path) -> dict:
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and not a.tiny else torch.float32
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=a.seq, **shape)
    model = LlamaForCausalLM(config).to(dtype)
    steps = a.warmup + a.steps
    n_blocks = steps * a.batch
    kwargs = dict(output_dir=str(out / name), max_steps=steps, per_device_train_batch_size=a.batch,
                  learning_rate=1e-5, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10**6,
                  bf16=cuda and not a.tiny, use_cpu=not cuda, seed=0, dataloader_pin_memory=cuda)
    callbacks: list = [StepTimer(a.warmup)]
    mode = "standard"
    if name == "Trainer":
        train = datasets.Dataset.from_dict({"input_ids": blocks[:n_blocks].tolist(),
                                            "labels": blocks[:n_blocks].tolist()})
    elif name == "Trainer + Liger":
        kwargs["use_liger_kernel"] = True
        mode = "liger"
        train = datasets.Dataset.from_dict({"input_ids": blocks[:n_blocks].tolist(),
                                            "labels": blocks[:n_blocks].tolist()})
    else:  # hf-cpt: the loss choose_loss picks, the prepared-data mixer, its callback
        mode = choose_loss(model, "auto", "auto")
        kwargs["use_liger_kernel"] = mode == "liger"
        kwargs["train_sampling_strategy"] = "sequential"
        kwargs["ignore_data_skip"] = True
        train = PreparedMixer(store, ratios={"domain": 1.0}, block_size=a.seq, num_blocks=n_blocks,
                              shuffle=False)
        callbacks.append(ReplayMixerCallback(train))
    if cuda:
        model.to("cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=train,
                      data_collator=default_data_collator, callbacks=callbacks)
    trainer.train()
    step = statistics.median(callbacks[0].times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return {"variant": name, "loss": mode, "step_s": step, "tokens_per_s": a.batch * a.seq / step, "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke shape: hidden 64, 2 layers, seq 64, vocab 1k/2k")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048, tiny 64)")
    p.add_argument("--vocabs", default=None, help="comma-separated vocabulary sizes (default 128256,256000)")
    a = p.parse_args()
    a.seq = a.seq or (64 if a.tiny else 2048)
    vocabs = [int(v) for v in (a.vocabs or ("1024,2048" if a.tiny else "128256,256000")).split(",")]
    shape = TINY if a.tiny else LLAMA_1B
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{os.cpu_count()} cores)"
    print(f"device: {device}; torch {torch.__version__}; shape {'tiny' if a.tiny else 'Llama-3.2-1B'}, seq {a.seq}, "
          f"batch {a.batch}, {a.steps} timed steps after {a.warmup}")
    variants = ["Trainer", "Trainer + Liger", "hf-cpt"]
    tmp = Path(tempfile.mkdtemp(prefix="hfcpt-gpu-throughput-"))
    try:
        for vocab in vocabs:
            rng = np.random.default_rng(0)
            blocks = rng.integers(0, vocab, size=((a.warmup + a.steps) * a.batch, a.seq), dtype=np.int64)
            store = write_token_store(tmp / f"store-{vocab}", blocks, vocab)
            rows = {}
            for name in variants:
                if name == "Trainer + Liger" and not (cuda and is_liger_available()):
                    print(f"  vocab {vocab:>6} {name:<16} skipped: needs CUDA and liger-kernel")
                    continue
                r = rows[name] = run_variant(name, vocab, shape, a, blocks, store, tmp)
                peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
                print(f"  vocab {vocab:>6} {name:<16} loss={r['loss']:<8} step {r['step_s'] * 1e3:8.1f} ms  "
                      f"{r['tokens_per_s']:>10.0f} tokens/s  peak {peak}")
            base = rows.get("Trainer + Liger") or rows["Trainer"]
            ours = rows["hf-cpt"]
            mem = (f", peak memory x{ours['peak_gib'] / base['peak_gib']:.3f}" if base["peak_gib"] else "")
            speed = ours["tokens_per_s"] / base["tokens_per_s"]
            print(f"  vocab {vocab:>6} hf-cpt vs {base['variant']}: tokens/s x{speed:.3f}{mem}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
