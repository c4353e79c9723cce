"""ReplayMixer vs `datasets.interleave_datasets`: packed blocks per second and token-share error, side by side.

Same data, same target (75% domain / 25% general *tokens*), same tokenizer, same block size, both from raw text
with tokenization on the fly. The domain documents are Python-docs paragraphs (~20 words), the general ones KJV
chapters (~880 words): the skewed lengths real CPT corpora have. `interleave_datasets` draws *documents* with
the given probabilities; ReplayMixer allocates *tokens*.

    python bench/mixer.py [--blocks 1500] [--block-size 512] [--repeats 3]

Prints blocks/s of both and their ratio, and the token-share error (whole run and worst 100-block window).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from hf_cpt.mixers import ReplayMixer  # noqa: E402
from hf_cpt.recipe.models import resolve_model_path  # noqa: E402
from hf_cpt.testing import read_embedded  # noqa: E402

RATIOS = {"domain": 0.75, "general": 0.25}


def corpora() -> dict[str, list[str]]:
    paragraphs = [p for doc in read_embedded("python-docs") for p in doc.split("\n\n") if p.strip()]
    return {"domain": paragraphs, "general": read_embedded("kjv")}


def run_mixer(texts, tok, n_blocks: int, block_size: int) -> tuple[float, np.ndarray]:
    sources = {k: datasets.Dataset.from_dict({"text": v}) for k, v in texts.items()}
    start = time.perf_counter()
    mixer = ReplayMixer(sources, tok, ratios=RATIOS, block_size=block_size)
    it = iter(mixer)
    general = np.empty(n_blocks)
    before = 0
    for i in range(n_blocks):
        next(it)
        # tokens handed out so far per source: the exact provenance of this block
        now = mixer.tokens_per_source["general"]
        general[i], before = now - before, now
    return n_blocks / (time.perf_counter() - start), general


def run_interleave(texts, tok, n_blocks: int, block_size: int) -> tuple[float, np.ndarray]:
    sources = [datasets.Dataset.from_dict({"text": v, "is_general": [name == "general"] * len(v)})
               for name, v in texts.items()]
    start = time.perf_counter()
    mixed = datasets.interleave_datasets(
        [s.to_iterable_dataset() for s in sources], probabilities=[RATIOS["domain"], RATIOS["general"]], seed=0,
        stopping_strategy="all_exhausted",
    )
    eos = tok.eos_token_id

    def tokenize(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids], "flags": [[g] * (len(x) + 1) for g, x in
                                                                  zip(batch["is_general"], ids)]}

    def pack(batch):  # the usual group_texts packing, keeping each token's source to measure the share
        ids = [t for x in batch["input_ids"] for t in x]
        flags = [f for x in batch["flags"] for f in x]
        n = len(ids) // block_size * block_size
        return {"input_ids": [ids[i:i + block_size] for i in range(0, n, block_size)],
                "n_general": [sum(flags[i:i + block_size]) for i in range(0, n, block_size)]}

    stream = mixed.map(tokenize, batched=True, remove_columns=["text", "is_general"])
    stream = stream.map(pack, batched=True, batch_size=1000, remove_columns=["input_ids", "flags"])
    general = np.empty(n_blocks)
    for i, row in enumerate(stream):
        if i == n_blocks:
            break
        general[i] = row["n_general"]
    return n_blocks / (time.perf_counter() - start), general


def share_errors(general: np.ndarray, block_size: int) -> tuple[float, float]:
    total = abs(general.sum() / (len(general) * block_size) - RATIOS["general"])
    windows = np.convolve(general, np.ones(100), mode="valid") / (100 * block_size)
    return total, float(np.max(np.abs(windows - RATIOS["general"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1500)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m"))
    texts = corpora()
    for name, docs in texts.items():
        print(f"{name}: {len(docs)} documents, mean {statistics.mean(len(d.split()) for d in docs):.0f} words")
    speeds: dict[str, list[float]] = {"ReplayMixer": [], "interleave_datasets": []}
    errors = {}
    for r in range(a.repeats):
        order = [("ReplayMixer", run_mixer), ("interleave_datasets", run_interleave)]
        for name, fn in order if r % 2 == 0 else order[::-1]:  # alternate, so warm-up favours neither
            speed, general = fn(texts, tok, a.blocks, a.block_size)
            speeds[name].append(speed)
            errors[name] = share_errors(general, a.block_size)
    print(f"\n{a.blocks} blocks of {a.block_size} tokens, target general share {RATIOS['general']:.2f}, "
          f"median of {a.repeats}")
    print(f"{'':22}{'blocks/s':>10}{'share error':>14}{'worst 100-block window':>25}")
    for name in speeds:
        total, window = errors[name]
        print(f"{name:22}{statistics.median(speeds[name]):10.1f}{100 * total:13.3f}%{100 * window:24.3f}%")
    m, i = (statistics.median(speeds[k]) for k in speeds)
    print(f"\nthroughput ratio (ReplayMixer / interleave_datasets): {m / i:.2f}x")
    for what, k in (("whole run", 0), ("worst 100-block window", 1)):
        mix, inter = errors["ReplayMixer"][k], errors["interleave_datasets"][k]
        ratio = f"{inter / mix:.0f}x" if mix > 0 else "inf (ReplayMixer is exact: 0 tokens off)"
        print(f"share error ratio, {what} (interleave_datasets / ReplayMixer): {ratio}")

if __name__ == "__main__":
    main()
