"""Document-aware packing vs concatenation on the embedded default: held-out loss scored per document, KL to
the base, and step time, side by side in one process.

Each run is the quickstart recipe (SmolLM2-135M, Python docs + 25 % KJV replay, 40 steps of 4 x 128 tokens,
rewarm schedule, seed 42) without its lm-eval tasks, with `data.packing` set to `documents` or `concat`, over
`--orders` data orders (`data.shuffle_seed`). Both settings train on exactly the same tokens per source (the
mixer's token accounting does not depend on the packing; checked below); `documents` additionally restarts
positions per document and does not train the first token of each document after the first in a block.

Scoring is the same for both: every held-out document (Python-docs validation, KJV validation, the run's
`general_self` text) is run *alone*, unpacked, through the adapted model — its first `--eval-tokens` tokens plus
EOS — and the loss is the token-weighted mean over documents. KL(base || adapted) is the exact full-vocabulary
KL on the same documents, so it needs no top-k estimate. Step time is the median wall time of an optimizer step
(evaluations excluded), measured by a callback inside each run; runs of the two settings alternate.

    python bench/packing.py [--orders 0,1] [--eval-tokens 256] [--out docs/packing_bench.json]
    python bench/packing.py --tiny      # tiny model, 4 steps: a smoke test of the script (CI)

Prints a table per run, the means over orders and the verdict against the goal: `documents` held-out loss <=
`concat` (per set, averaged over orders) at <= 5 % more step time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402

import hf_cpt.recipe.train as train_mod  # noqa: E402
from hf_cpt.config import SELF_EVAL_SET, CPTConfig  # noqa: E402
from hf_cpt.mixers.packing import bos_for  # noqa: E402
from hf_cpt.recipe import run_cpt  # noqa: E402
from hf_cpt.recipe.data import synthesize_general  # noqa: E402
from hf_cpt.recipe.models import resolve_model_path  # noqa: E402
from hf_cpt.testing import read_embedded  # noqa: E402

STEP_TIME_GOAL = 1.05


class StepTimer(TrainerCallback):
    """Wall and process-CPU time of every optimizer step (the Trainer's evaluations run outside these brackets;
    CPU time is the steadier clock on a shared machine)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._t = self._c = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)


def timed_build_trainer(timer: StepTimer):
    original = train_mod.build_trainer

    def build(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(timer)
        return trainer

    return original, build


def run_config(packing: str, order: int, tiny_dir: str | None) -> CPTConfig:
    raw = yaml.safe_load(Path(__file__).with_name("quickstart_round2.yaml").read_text(encoding="utf-8"))
    raw.pop("downstream", None)
    raw["data"].update(packing=packing, shuffle_seed=order)
    if tiny_dir is not None:
        raw["model"] = {"name_or_path": tiny_dir}
        raw["data"].update(block_size=32, max_eval_blocks=4, synth={"eval_tokens": 96, "max_new_tokens": 24,
                                                                     "batch_size": 8})
        raw["train"].update(max_steps=4, eval_steps=2, logging_steps=1, per_device_eval_batch_size=4)
        raw["schedule"]["warmup_steps"] = 1
        raw["monitor"]["kl_top_k"] = 16
    return CPTConfig.from_dict(raw)


@torch.no_grad()
def score_documents(model, base, tok, texts: list[str], max_tokens: int) -> dict[str, float]:
    """Token-weighted mean loss and exact KL(base || model) over `texts`, each document run alone."""
    bos = bos_for(tok)
    loss_sum = kl_sum = 0.0
    count = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
        ids = ([bos] if bos is not None else []) + ids + [tok.eos_token_id]
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        base_logits = base(input_ids=x).logits[0, :-1].float()
        target = x[0, 1:]
        logp = torch.log_softmax(logits, -1)
        base_logp = torch.log_softmax(base_logits, -1)
        loss_sum += float(-logp.gather(-1, target[:, None]).sum())
        kl_sum += float((base_logp.exp() * (base_logp - logp)).sum())
        count += len(target)
    return {"loss": loss_sum / count, "kl": kl_sum / count, "tokens": count}


def held_out_texts(cfg: CPTConfig, base, tok, tiny: bool) -> dict[str, list[str]]:
    """The held-out documents: the two validation splits and the run's `general_self` text (the same cached
    synthesis the run used: keyed by the base weights and the sampling settings)."""
    limit = 8 if tiny else None
    return {"domain": read_embedded("python-docs", "validation", limit),
            "general": read_embedded("kjv", "validation", limit),
            SELF_EVAL_SET: list(synthesize_general(cfg.data, base, tok)["eval"]["text"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orders", default="0,1", help="data orders (data.shuffle_seed), comma-separated")
    ap.add_argument("--eval-tokens", type=int, default=256, help="tokens of each held-out document scored")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--tiny", action="store_true", help="tiny random model, 4 steps (CPU smoke test)")
    a = ap.parse_args()
    orders = [int(x) for x in a.orders.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="hf-cpt-packing-"))
    tiny_dir = None
    if a.tiny:
        from hf_cpt.testing import make_tiny_llama, make_tiny_tokenizer

        tok = make_tiny_tokenizer()
        tiny_dir = str(work / "tiny")
        make_tiny_llama(len(tok)).save_pretrained(tiny_dir)
        tok.save_pretrained(tiny_dir)
    base_path = tiny_dir or resolve_model_path("embedded:smollm2-135m")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base_path)
    print(f"document start token for {type(tok).__name__}: {bos_for(tok)!r} (auto)")
    rows = []
    for order in orders:
        for packing in ("documents", "concat"):
            cfg = run_config(packing, order, tiny_dir)
            timer = StepTimer()
            original, build = timed_build_trainer(timer)
            train_mod.build_trainer = build
            try:
                result = run_cpt(cfg, output_dir=work / f"{packing}-{order}", overwrite=True)
            finally:
                train_mod.build_trainer = original
            model = AutoModelForCausalLM.from_pretrained(result.output_dir, dtype=torch.float32).eval()
            texts = held_out_texts(cfg, base, tok, a.tiny)
            scores = {name: score_documents(model, base, tok, docs, a.eval_tokens) for name, docs in texts.items()}
            step = statistics.median(timer.times[1:] or timer.times)  # the first step warms up
            cpu = statistics.median(timer.cpu[1:] or timer.cpu)
            row = {"packing": packing, "order": order, "step_s": step, "step_cpu_s": cpu,
                   "tokens": result.metrics["train_tokens"],
                   **{f"{n}_{k}": v[k] for n, v in scores.items() for k in ("loss", "kl")}}
            rows.append(row)
            print(json.dumps(row))
            del model
    sets = [k[:-5] for k in rows[0] if k.endswith("_loss")]
    mean = {p: {k: statistics.mean(r[k] for r in rows if r["packing"] == p)
                for k in rows[0] if k.endswith(("_loss", "_kl")) or k.startswith("step_")}
            for p in ("documents", "concat")}
    same_tokens = all(r["tokens"] == next(q["tokens"] for q in rows if q["order"] == r["order"]) for r in rows)
    print(f"\nsame training tokens per source in both settings: {same_tokens}")
    print(f"{'set':<14}{'documents loss':>16}{'concat loss':>13}{'diff':>9}{'doc KL':>9}{'concat KL':>11}"
          f"   per-order loss diffs")
    for s in sets:
        diffs = [next(r for r in rows if r["order"] == o and r["packing"] == "documents")[f"{s}_loss"]
                 - next(r for r in rows if r["order"] == o and r["packing"] == "concat")[f"{s}_loss"] for o in orders]
        d, c = mean["documents"], mean["concat"]
        print(f"{s:<14}{d[f'{s}_loss']:>16.4f}{c[f'{s}_loss']:>13.4f}{d[f'{s}_loss'] - c[f'{s}_loss']:>+9.4f}"
              f"{d[f'{s}_kl']:>9.4f}{c[f'{s}_kl']:>11.4f}   {', '.join(f'{x:+.4f}' for x in diffs)}")
    ratio = mean["documents"]["step_s"] / mean["concat"]["step_s"]
    cpu_ratio = mean["documents"]["step_cpu_s"] / mean["concat"]["step_cpu_s"]
    print(f"step time (median per run, mean over orders): documents {mean['documents']['step_s'] * 1e3:.0f} ms, "
          f"concat {mean['concat']['step_s'] * 1e3:.0f} ms, ratio {ratio:.3f}; process CPU time ratio "
          f"{cpu_ratio:.3f} (goal <= {STEP_TIME_GOAL})")
    loss_ok = all(mean["documents"][f"{s}_loss"] <= mean["concat"][f"{s}_loss"] for s in sets)
    print(f"verdict: held-out loss documents <= concat on every set: {'met' if loss_ok else 'missed'}; "
          f"step time: {'met' if ratio <= STEP_TIME_GOAL else 'missed'}")
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows, "mean": mean, "step_ratio": ratio,
                                           "step_cpu_ratio": cpu_ratio}, indent=1))


if __name__ == "__main__":
    main()
