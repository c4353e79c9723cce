"""Tokens/s, MFU and peak memory of CPT training steps on a Llama-3.2-1B-shaped model: the plain `Trainer`, the
`Trainer` with Liger, and hf-cpt's paths, one fresh process per variant (so each peak is its own), same tokens.

Variants (issue 31):

    trainer         (a) plain `Trainer` (its default optimizer, the model's own loss)
    trainer_liger   (b) `Trainer(use_liger_kernel=True)` (Liger's RMSNorm, RoPE, SwiGLU, fused linear CE)
    hfcpt           (c) hf-cpt's default path: `PreparedMixer` + `ReplayMixerCallback`, the rewarming schedule and
                        its optimizer (`make_rewarm_optimizers`), the loss `choose_loss` picks (Liger on CUDA)
    hfcpt_chunked   (d) (c) with hf-cpt's chunked loss forced (`use_liger: false, chunked_loss: true`)
    hfcpt_distill   (e) (c) + distillation replay (`train.distill` defaults: weight 1, `tokens: replay`, top-64,
                        precomputed targets): 25 % of the blocks come from a second random "general" source and are
                        distilled, so the chunked loss carries the KL term (distillation needs it)
    hfcpt_packing   (f) (c) with `data.packing: documents` (issue 29; skipped until that field exists): the same
                        token stream cut into documents of random length (mean ~ seq/4), `position_ids` per document

The model is built from a config (random weights, nothing downloaded), bf16 on CUDA (fp32 on the CPU), with
sdpa attention. (a)-(d) and (f) read the very same token blocks; the Trainers get them as a list of dicts, hf-cpt
from a prepared store (the layout `hf-cpt prepare` writes) holding them as documents. MFU is 6 N tokens/s over
790 TFLOP/s (N and the attention FLOPs: see `gpu_common.py`); `mfu_attn` adds attention's products. Peak is
`torch.cuda.max_memory_allocated` over the training steps (weights and optimizer state included).

    python bench/gpu_throughput.py [--shape 1b] [--seqs 2048,4096] [--tokens-per-step 16384] [--steps 10]
                                   [--warmup 3] [--variants trainer,...] [--variant-timeout 120] [--json PATH]
    python bench/gpu_throughput.py --tiny      # CPU smoke shape (CI runs it so the script cannot rot)

Batch: `--tokens-per-step` // seq sequences (8 x 2048, 4 x 4096: well inside 139 GiB for the plain Trainer at
128k vocabulary). Prints one line per variant and hf-cpt's ratios to Trainer + Liger (goal: tokens/s >= 1, peak
memory <= 1); `--json` keeps every number, rewritten after each variant so a run cut short keeps what it had.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gpu_common import (LLAMA3_VOCAB, PEAK_FLOPS, build_llama, device_line, random_blocks, read_json,  # noqa: E402
                        train_flops_per_token, use_cuda, write_json)

VARIANTS = {
    "trainer": "(a) Trainer",
    "trainer_liger": "(b) Trainer+Liger",
    "hfcpt": "(c) hf-cpt",
    "hfcpt_chunked": "(d) hf-cpt chunked",
    "hfcpt_distill": "(e) hf-cpt+distill",
    "hfcpt_packing": "(f) hf-cpt packing",
}


class Skip(Exception):
    """A variant that cannot run here; the message says why."""


@dataclass
class Setup:
    """What a variant hands the Trainer."""

    train_set: Any
    loss: str
    collator: Any = None
    callbacks: list = field(default_factory=list)
    schedule: Any = None  # a RewarmConfig: the recipe's optimizer and rewarming scheduler
    args: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # extra facts for the record (e.g. the masking probe)


def make_step_timer(warmup: int) -> Any:
    """A TrainerCallback keeping the wall time of each optimizer step (CUDA synchronised) after `warmup` steps
    (built here, not at import, so the driver process never imports transformers)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step > warmup:
                self.times.append(time.perf_counter() - self._t)

    return StepTimer()


# --- data -------------------------------------------------------------------------------------------------------
def block_list(blocks: Any) -> list[dict[str, Any]]:
    """The blocks as a plain Trainer user feeds them (grouped text: ids, all-ones mask, labels = ids)."""
    import numpy as np

    return [{"input_ids": b, "attention_mask": np.ones_like(b), "labels": b.copy()} for b in blocks]


def write_token_store(path: Path, sources: dict[str, list[Any]], vocab: int) -> Path:
    """A prepared store (the layout `prepare_sources` writes) holding `sources[name]` as that source's documents,
    in order: with `shuffle=False` the mixer's stream is their concatenation."""
    import datasets
    import numpy as np

    from hf_cpt.mixers.prepared import MANIFEST, STORE_VERSION

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    info = {}
    for name, docs in sources.items():
        ds = datasets.Dataset.from_dict({"input_ids": [np.asarray(d, np.int32).tolist() for d in docs]},
                                        features=features)
        ds.save_to_disk(str(path / name))
        info[name] = {"dir": name, "documents": len(docs), "tokens": int(sum(len(d) for d in docs))}
    manifest = {"fingerprint": {"version": STORE_VERSION, "tokenizer": "random-tokens", "sources": {}},
                "vocab_size": vocab, "sources": info}
    write_json(path / MANIFEST, manifest)
    return path


def split_documents(blocks: Any, seed: int = 0) -> list[Any]:
    """The blocks' token stream cut into documents of random length in [seq/16, seq/2] (mean ~ seq/4)."""
    import numpy as np

    flat, seq = blocks.reshape(-1), blocks.shape[1]
    rng = np.random.default_rng(seed)
    docs, at = [], 0
    while at < len(flat):
        n = int(rng.integers(max(seq // 16, 2), seq // 2 + 1))
        docs.append(flat[at:at + n])
        at += n
    return docs


def packing_fields(mode: str) -> dict[str, Any]:
    """Mixer settings for `packing` mode, on trees before and after `data.packing` (issue 29) landed."""
    from hf_cpt.config import DataConfig
    from hf_cpt.mixers.replay import ReplayMixerConfig

    if "packing" not in DataConfig.__dataclass_fields__:
        if mode != "concat":
            raise Skip("document packing (`data.packing`, issue 29) is not in this tree yet")
        return {}
    if "packing" not in ReplayMixerConfig.__dataclass_fields__:
        if mode != "concat":
            raise Skip("`data.packing` exists but ReplayMixerConfig has no `packing` field: update "
                       "bench/gpu_throughput.py to the mixer's packing API")
        return {}
    return {"packing": mode}


# --- the variants -------------------------------------------------------------------------------------------------
def _trainer(model: Any, blocks: Any, a: Any, tmp: Path, liger: bool) -> Setup:
    if liger:
        import torch

        from hf_cpt.import_utils import is_liger_available

        if not torch.cuda.is_available() or a.tiny:
            raise Skip("needs CUDA (Liger's Triton kernels)")
        if not is_liger_available():
            raise Skip("liger-kernel is not installed")
    return Setup(block_list(blocks), "liger" if liger else "standard", args={"use_liger_kernel": liger})


def _hfcpt(model: Any, blocks: Any, a: Any, tmp: Path, use_liger: str = "auto", chunked: str = "auto",
           distill: bool = False, packing: str = "concat") -> Setup:
    """hf-cpt's causal path as `run_cpt` wires it (`build_data` + `build_trainer`) on a random-token store, less
    what acts only at evaluation (the forgetting monitor, the KL-to-base callback): no evaluation runs here."""
    from hf_cpt.callbacks.replay_mixer import ReplayMixerCallback
    from hf_cpt.callbacks.rewarm import RewarmCallback, RewarmConfig
    from hf_cpt.liger import choose_loss
    from hf_cpt.mixers.prepared import PreparedMixer
    from hf_cpt.mixers.replay import ReplayMixerConfig

    mix = packing_fields(packing)
    n, seq = blocks.shape
    vocab = model.config.vocab_size
    if packing == "documents":
        sources = {"domain": split_documents(blocks)}
    else:
        sources = {"domain": list(blocks)}
    ratios = {"domain": 1.0}
    if distill:  # replay: a quarter of the blocks from a "general" source, the ones distillation targets
        sources["general"] = list(random_blocks(n, seq, vocab, seed=1))
        ratios = {"domain": 0.75, "general": 0.25}
    store = write_token_store(tmp / "store", sources, vocab)
    config = ReplayMixerConfig(ratios=ratios, block_size=seq, shuffle=False, emit_sources=distill, **mix)
    train = PreparedMixer(store, config, num_blocks=n)
    collator = None
    if distill:
        from hf_cpt.collators.distill_replay import DistillCollator, DistillConfig, precompute_distill_targets

        dcfg = DistillConfig()
        targets = precompute_distill_targets((train.block(i) for i in range(n)), model, n, dcfg,
                                             distilled_sources=[1], batch_size=a.batch)
        collator = DistillCollator(dcfg, targets=targets)
    first = train.block(0)
    notes: dict[str, Any] = {"block_keys": sorted(first)}
    if "position_ids" in first:  # documents per block: where the positions restart
        notes["documents_per_block"] = sum(int((train.block(i)["position_ids"] == 0).sum()) for i in range(n)) / n
    if packing == "documents":
        notes.update(guard_document_masking(model))
    loss = choose_loss(model, use_liger, chunked, require_chunked=distill)
    schedule = RewarmConfig(schedule="rewarm", warmup_steps=2, min_lr_ratio=0.1)  # the quickstart's shape
    return Setup(train, loss, collator=collator, callbacks=[ReplayMixerCallback(train), RewarmCallback(schedule)],
                 schedule=schedule,
                 args={"use_liger_kernel": loss == "liger", "train_sampling_strategy": "sequential",
                       "ignore_data_skip": True, "remove_unused_columns": not distill,
                       "prediction_loss_only": True}, notes=notes)


def guard_document_masking(model: Any) -> dict[str, Any]:
    """What `build_trainer` does for `packing: documents`: probe that the model keeps packed documents apart,
    then attach the guard. A failed probe is recorded, not fatal (the step time is still worth having)."""
    from hf_cpt.mixers import packing

    notes: dict[str, Any] = {}
    probe = getattr(packing, "probe_document_masking", None)
    if probe is not None:
        try:
            notes["masking_probe"] = probe(model)
        except ValueError as e:
            notes["masking_probe"] = f"refused: {str(e).splitlines()[0][:200]}"
    guard = getattr(packing, "DocumentMaskingGuard", None)
    if guard is not None:
        guard.attach(model)
    return notes


BUILDERS = {
    "trainer": lambda m, b, a, t: _trainer(m, b, a, t, liger=False),
    "trainer_liger": lambda m, b, a, t: _trainer(m, b, a, t, liger=True),
    "hfcpt": lambda m, b, a, t: _hfcpt(m, b, a, t),
    "hfcpt_chunked": lambda m, b, a, t: _hfcpt(m, b, a, t, use_liger="false", chunked="true"),
    "hfcpt_distill": lambda m, b, a, t: _hfcpt(m, b, a, t, distill=True),
    "hfcpt_packing": lambda m, b, a, t: _hfcpt(m, b, a, t, packing="documents"),
}


def run_variant(name: str, a: Any) -> dict[str, Any]:
    """Train variant `name` for `a.warmup + a.steps` steps and measure it; a skip or failure is a record too."""
    base = {"variant": name, "label": VARIANTS[name], "seq": a.seq, "batch": a.batch}
    try:
        with tempfile.TemporaryDirectory(prefix=f"hfcpt-gpu-{name}-") as tmp:
            return {**base, **_measure(name, a, Path(tmp))}
    except Skip as e:
        return {**base, "skipped": str(e)}
    except Exception as e:  # one variant's failure (OOM, an API change) must not cost the others their numbers
        import torch

        traceback.print_exc()
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        return {**base, "error": f"CUDA out of memory at batch {a.batch}" if oom else
                f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def _measure(name: str, a: Any, tmp: Path) -> dict[str, Any]:
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_cpt.callbacks.rewarm import make_rewarm_optimizers

    cuda = use_cuda(a.tiny)
    model = build_llama(a.shape, a.vocab, a.seq, torch.bfloat16 if cuda else torch.float32,
                        "cuda" if cuda else "cpu")
    steps = a.warmup + a.steps
    blocks = random_blocks(steps * a.batch, a.seq, a.vocab)
    setup = BUILDERS[name](model, blocks, a, tmp)
    timer = make_step_timer(a.warmup)
    kwargs = dict(output_dir=str(tmp / "out"), max_steps=steps, per_device_train_batch_size=a.batch,
                  learning_rate=1e-5, report_to="none", save_strategy="no", disable_tqdm=True,
                  logging_steps=10**6, bf16=cuda, use_cpu=not cuda, seed=0, dataloader_pin_memory=cuda)
    args = TrainingArguments(**{**kwargs, **setup.args})
    optimizers: tuple = (None, None)
    if setup.schedule is not None:  # as run_cpt does: AdamW with an embedding group + the rewarming scheduler
        optimizers = make_rewarm_optimizers(model, setup.schedule, args)
    trainer = Trainer(model=model, args=args, train_dataset=setup.train_set,
                      data_collator=setup.collator or default_data_collator, callbacks=[timer, *setup.callbacks],
                      optimizers=optimizers)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    profile = None
    if a.profile:
        profile = make_profiler(trainer, a.warmup, min(2, a.steps))
        with profile.prof:
            trainer.train()
        setup.notes["top_ops"] = profile.top()
    else:
        trainer.train()
    step = statistics.median(timer.times)
    tokens_per_s = a.batch * a.seq / step
    six_n, with_attn = train_flops_per_token(model, a.seq)
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)  # accelerate wraps it
    return {
        "loss": setup.loss, "step_s": step, "step_s_all": timer.times, "tokens_per_s": tokens_per_s,
        "mfu": six_n * tokens_per_s / PEAK_FLOPS if cuda else None,
        "mfu_attn": with_attn * tokens_per_s / PEAK_FLOPS if cuda else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "optimizer": f"{type(opt).__name__}(fused={opt.defaults.get('fused')}, "
                     f"foreach={opt.defaults.get('foreach')})",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "matmul_params": six_n / 6, "final_train_loss": _last_loss(trainer), **setup.notes,
    }


@dataclass
class Profile:
    prof: Any
    active: int
    cuda: bool

    def top(self, n: int = 15) -> list[dict[str, Any]]:
        """The `n` ops/kernels with the most self time (device time on CUDA), per profiled step."""
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        rows = []
        for e in self.prof.key_averages():
            if e.key.startswith("ProfilerStep"):  # the step itself, not an op
                continue
            us = getattr(e, key, None)
            if us is None:  # older torch: the CUDA name
                us = getattr(e, "self_cuda_time_total", 0.0)
            rows.append({"name": e.key[:90], "self_ms_per_step": us / 1e3 / self.active,
                         "calls_per_step": e.count / self.active})
        return sorted(rows, key=lambda r: -r["self_ms_per_step"])[:n]


def make_profiler(trainer: Any, warmup: int, active: int) -> Profile:
    """A `torch.profiler` over `active` steps after `warmup` (stepped by a callback added to `trainer`)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts, schedule=schedule(wait=max(warmup - 1, 0), warmup=1, active=active, repeat=1))

    class Step(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            prof.step()

    trainer.add_callback(Step())
    return Profile(prof, active, cuda)


def _last_loss(trainer: Any) -> float | None:
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    return losses[-1] if losses else None


# --- the driver ----------------------------------------------------------------------------------------------------
def describe(r: dict[str, Any]) -> str:
    lines = []
    if r.get("top_ops"):
        lines.append(f"  profile of {r['label']} at seq {r['seq']} (self time per step, top {len(r['top_ops'])}):")
        lines += [f"      {op['self_ms_per_step']:9.3f} ms x{op['calls_per_step']:<6.0f} {op['name']}"
                  for op in r["top_ops"]]
    head = f"  seq {r['seq']:>5} batch {r['batch']:>2} {r['label']:<19}"
    if "skipped" in r:
        return "\n".join(lines + [f"{head} skipped: {r['skipped']}"])
    if "error" in r:
        return "\n".join(lines + [f"{head} FAILED: {r['error']}"])
    peak = f"{r['peak_gib']:6.2f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
    mfu = f"MFU {100 * r['mfu']:5.1f}% ({100 * r['mfu_attn']:5.1f}% w/ attn)" if r["mfu"] is not None else "MFU n/a"
    return "\n".join(lines + [f"{head} loss={r['loss']:<8} step {r['step_s'] * 1e3:8.1f} ms "
                              f"{r['tokens_per_s']:>10.0f} tokens/s  {mfu}  peak {peak}"])


def compare(rows: dict[str, dict[str, Any]], seq: int) -> str | None:
    ok = {k: r for k, r in rows.items() if "tokens_per_s" in r}
    if "hfcpt" not in ok or not ({"trainer_liger", "trainer"} & set(ok)):
        return None
    base = ok.get("trainer_liger") or ok["trainer"]
    ours = ok["hfcpt"]
    mem = f", peak memory x{ours['peak_gib'] / base['peak_gib']:.3f}" if base["peak_gib"] else ""
    speed = ours["tokens_per_s"] / base["tokens_per_s"]
    return f"  seq {seq:>5} hf-cpt vs {base['label'][4:]}: tokens/s x{speed:.3f}{mem}"


def run_child(name: str, a: Any, timeout: float) -> dict[str, Any]:
    """Variant `name` in a fresh Python process (its own CUDA context and memory peak), at most `timeout` s."""
    with tempfile.TemporaryDirectory(prefix="hfcpt-gpu-child-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", name, "--child-out", str(out), "--shape", a.shape,
               "--vocab", str(a.vocab), "--seq", str(a.seq), "--batch", str(a.batch), "--steps", str(a.steps),
               "--warmup", str(a.warmup)] + (["--tiny"] if a.tiny else []) + (["--profile"] if a.profile else [])
        base = {"variant": name, "label": VARIANTS[name], "seq": a.seq, "batch": a.batch}
        try:
            proc = subprocess.run(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**base, "error": f"timed out after {timeout:.0f} s"}
        r = read_json(out)
        if r is None:
            return {**base, "error": f"the child process exited {proc.returncode} without a result"}
        return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke shape: hidden 64, 2 layers, seq 64, vocab 1024")
    p.add_argument("--shape", default=None, choices=["1b", "3b", "tiny"], help="model shape (default 1b)")
    p.add_argument("--vocab", type=int, default=None, help=f"vocabulary size (default {LLAMA3_VOCAB}, tiny 1024)")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 2048,4096; tiny 64)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="batch = this // seq (default 16384, tiny 128)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton compilation, allocator)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--variant-timeout", type=float, default=120.0, help="seconds one variant's process may take")
    p.add_argument("--isolate", choices=["process", "none"], default="process",
                   help="`process`: each variant in a fresh process (clean memory peaks); `none`: all in this one")
    p.add_argument("--profile", action="store_true",
                   help="profile 2 steps after the warmup and keep the top ops/kernels (timings then include the "
                        "profiler's overhead)")
    p.add_argument("--json", default=None, help="write every number here (rewritten after each variant)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.shape = a.shape or ("tiny" if a.tiny else "1b")
    a.vocab = a.vocab or (1024 if a.tiny else LLAMA3_VOCAB)
    if a.child:
        write_json(a.child_out, run_variant(a.child, a))
        return
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    seqs = [int(s) for s in (a.seqs or ("64" if a.tiny else "2048,4096")).split(",")]
    per_step = a.tokens_per_step or (128 if a.tiny else 16384)
    print(f"device: {device_line()}; shape {a.shape}, vocab {a.vocab}, {per_step} tokens per step, {a.steps} timed "
          f"steps after {a.warmup}, isolation: {a.isolate}", flush=True)
    results = {"shape": a.shape, "vocab": a.vocab, "device": device_line(), "peak_flops": PEAK_FLOPS, "runs": {}}
    for seq in seqs:
        a.seq, a.batch = seq, max(1, per_step // seq)
        rows = results["runs"][f"seq{seq}"] = {}
        for name in names:
            rows[name] = run_child(name, a, a.variant_timeout) if a.isolate == "process" else run_variant(name, a)
            print(describe(rows[name]), flush=True)
            if a.json:
                write_json(a.json, results)
        line = compare(rows, seq)
        if line:
            print(line, flush=True)


if __name__ == "__main__":
    main()
