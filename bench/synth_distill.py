"""Self-synthesis throughput and the step-time cost of distillation replay, on the real SmolLM2-135M.

1. `synthesize_text`: tokens/s of kept text (batch 16, 128 new tokens, top-p 0.95), plus `weights_fingerprint` time.
2. One training step (forward + backward + AdamW) with the chunked loss, batch 4 x seq 256, with vs without
   distillation to precomputed top-64 base targets on every token (the worst case: replay tokens only in
   practice). The two kinds of step alternate so load drift hits both; medians after warm-up, in wall-clock
   and in this process's CPU time (steadier on a shared machine; run with `--threads 1` there, as busy-waiting
   BLAS threads inflate both clocks when cores are oversubscribed).

    python bench/synth_distill.py [--synth-tokens 2000] [--steps 6] [--k 64] [--threads N]

Prints both numbers, the step-time ratio and the goal (<= 1.10).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_cpt.base_targets import compute_base_targets  # noqa: E402
from hf_cpt.losses import apply_chunked_loss  # noqa: E402
from hf_cpt.synth import synthesize_text, weights_fingerprint  # noqa: E402
from hf_cpt.testing import read_embedded  # noqa: E402

GOAL = 1.10


def load():
    try:
        from hf_cpt.recipe.models import resolve_model_path
    except ImportError:  # before the recipe layer
        from hf_cpt.models import resolve_model_path
    path = resolve_model_path("embedded:smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def bench_synthesis(model, tok, n_tokens: int) -> None:
    t = time.perf_counter()
    weights_fingerprint(model)
    fp = time.perf_counter() - t
    synthesize_text(model, tok, 16, batch_size=2, max_new_tokens=8, progress=False)  # warm-up
    t, c = time.perf_counter(), time.process_time()
    docs = synthesize_text(model, tok, n_tokens, batch_size=16, max_new_tokens=128, seed=0, progress=False)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    kept = sum(len(x) for x in tok(docs, add_special_tokens=False)["input_ids"])
    print(f"synthesis: {kept} tokens in {len(docs)} documents, {dt:.1f} s -> {kept / dt:.0f} tokens/s wall, "
          f"{kept / dc:.0f} tokens per CPU-second (batch 16, 128 new tokens); weights_fingerprint {fp:.2f} s")
    print(f"  sample: {docs[0][:160]!r}")


def make_batch(tok, batch: int, seq: int) -> torch.Tensor:
    ids = tok("\n\n".join(read_embedded("python-docs", limit=40)), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: batch * seq]).view(batch, seq)


def step(model, opt, ids, targets=None) -> float:
    extra = {}
    if targets is not None:
        extra = {"base_topk_ids": targets["ids"], "base_topk_logprobs": targets["logprobs"],
                 "distill_weights": torch.ones(ids.shape)}
    t, c = time.perf_counter(), time.process_time()
    loss = model(input_ids=ids, labels=ids, **extra).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t, time.process_time() - c


def bench_steps(model, tok, steps: int, k: int, batch: int = 4, seq: int = 256) -> None:
    ids = make_batch(tok, batch, seq)
    t = time.perf_counter()
    targets = compute_base_targets(model, ids, k=k, batch_size=batch)
    t_targets = time.perf_counter() - t
    mb = (targets["ids"].nbytes + targets["logprobs"].nbytes) / 2**20
    apply_chunked_loss(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for _ in range(2):  # warm-up: allocator, optimizer state
        step(model, opt, ids)
        step(model, opt, ids, targets)
    plain, distill = [], []
    for _ in range(steps):
        plain.append(step(model, opt, ids))
        distill.append(step(model, opt, ids, targets))
    print(f"targets: top-{k} for {batch}x{seq} tokens in {t_targets:.2f} s, {mb:.2f} MiB "
          f"({8 * k} bytes/token)")
    ratios = {}
    for i, clock in enumerate(("wall", "cpu")):
        p, d = statistics.median(x[i] for x in plain), statistics.median(x[i] for x in distill)
        ratios[clock] = d / p
        print(f"train step ({clock} time), chunked loss, batch {batch} x seq {seq}: plain {p:.3f} s, with top-{k} "
              f"distillation {d:.3f} s (medians of {steps}); ratio {d / p:.3f}")
        print(f"  plain:   {' '.join(f'{x[i]:.2f}' for x in plain)}")
        print(f"  distill: {' '.join(f'{x[i]:.2f}' for x in distill)}")
    ratio = ratios["cpu"]
    print(f"step-time ratio distill / plain = {ratio:.3f} (CPU time; wall {ratios['wall']:.3f}), goal <= "
          f"{GOAL:.2f}: {'met' if ratio <= GOAL else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synth-tokens", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}")
    model, tok = load()
    bench_synthesis(model, tok, args.synth_tokens)
    bench_steps(model, tok, args.steps, args.k)


if __name__ == "__main__":
    main()
