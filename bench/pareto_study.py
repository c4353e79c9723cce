"""The issue-33 Pareto study: forgetting defences x 2 domains x seeds, on SmolLM2-135M, through `hf-cpt study`.

Needs Debian packages (not CI material): `apt-get install linux-doc-6.1 debian-reference-en`.

* Domain 1, Python docs: the embedded corpus of the quickstart.
* Domain 2, Linux kernel docs: the reStructuredText files of Debian's `linux-doc-6.1`, one document per file, split
  90 / 10 into training and held-out documents by a hash of the file's path (so the split does not depend on the
  order files are listed in); `--max-train-files` of the training files are kept (the run reads far fewer tokens).
* General text no run trains on or replays and that is not from the replay sampler: the English Debian Reference
  (`debian_ref`, its paragraphs), plus `general_self` (text the base model writes, from a seed disjoint from the
  replay text's). `monitor.general` is `debian_ref`; the KL to the base is the largest over both sets.

The two configs differ only in `data.domain`; both are written next to the runs (`OUT/configs/*.yaml`) so the study
can be re-run or extended with `hf-cpt study`. Runs are cached under `OUT`: an interrupted study continues.

    python bench/pareto_study.py --out runs/study33 [--seeds 0,1,2] [--defences ...] [--steps 32]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

LINUX_DOC = Path("/usr/share/doc/linux-doc-6.1/Documentation")
DEBIAN_REF = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
DEFENCES = "naive,rewarm,self_replay,distill,average,lora,freeze,merge,merge:rewarm,merge:distill"


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    tmp.replace(path)
    return path


def linux_doc_split(max_train_files: int) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): one per `.rst.gz` file; held out when the path's hash says so."""
    train, held = [], []
    for p in sorted(LINUX_DOC.rglob("*.rst.gz")):
        with gzip.open(p, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        if len(text) < 400:
            continue
        h = int(hashlib.sha256(str(p.relative_to(LINUX_DOC)).encode()).hexdigest(), 16)
        (held if h % 10 == 0 else train).append((h, text))
    train = [t for _, t in sorted(train)[:max_train_files]]  # a hash-ordered sample, not the first directories
    return train, [t for _, t in sorted(held)]


def debian_ref_paragraphs() -> list[str]:
    with gzip.open(DEBIAN_REF, "rt", encoding="utf-8") as f:
        text = f.read()
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paras if len(p) > 200 and "+---" not in p and "|" not in p]


def write_configs(out: Path, steps: int, lr: float, max_train_files: int) -> list[Path]:
    for need in (LINUX_DOC, DEBIAN_REF):
        if not need.exists():
            raise SystemExit(f"Error: {need} is missing: `apt-get install linux-doc-6.1 debian-reference-en`")
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, held = linux_doc_split(max_train_files)
    ref = _write_jsonl(data / "debian_ref.jsonl", debian_ref_paragraphs())
    ltrain = _write_jsonl(data / "linux_doc_train.jsonl", train)
    lheld = _write_jsonl(data / "linux_doc_heldout.jsonl", held)
    print(f"linux-doc: {len(train)} training / {len(held)} held-out files; debian_ref: "
          f"{len(ref.read_text(encoding='utf-8').splitlines())} paragraphs")
    base = {
        "model": {"name_or_path": "embedded:smollm2-135m", "dtype": "float32"},
        "data": {"general": None, "replay_ratio": 0.0, "block_size": 128, "packing": "documents",
                 "max_eval_blocks": 12, "eval_sets": {"debian_ref": str(ref.resolve())},
                 "dedup": {"exact": True, "near": True, "threshold": 0.8},
                 "decontaminate": {"action": "drop", "ngram": 13},
                 "synth": {"eval_tokens": 1536, "max_new_tokens": 128, "batch_size": 16}},
        "train": {"max_steps": steps, "learning_rate": lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
                  "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16, "eval_steps": steps,
                  "logging_steps": 4, "seed": 0},
        "monitor": {"general": "debian_ref", "kl": True, "kl_top_k": 64, "action": "none",
                    "guards": [{"set": "general_self", "metric": "kl", "tolerance": 0.2}]},
        "downstream": None,
    }
    domains = {
        "python-docs": {"train": "embedded:python-docs/train", "eval": "embedded:python-docs/validation"},
        "linux-doc": {"train": str(ltrain.resolve()), "eval": str(lheld.resolve())},
    }
    paths = []
    (out / "configs").mkdir(exist_ok=True)
    for name, domain in domains.items():
        cfg = {**base, "domain": name, "data": {**base["data"], "domain": {**domain, "text_field": "text"}}}
        path = out / "configs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/study33"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--defences", default=DEFENCES)
    ap.add_argument("--steps", type=int, default=32, help="updates of the runs without replay (replay: / 0.75)")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak (rewarm) or constant (naive) LR; the quickstart's")
    ap.add_argument("--max-train-files", type=int, default=400)
    ap.add_argument("--configs", default="python-docs,linux-doc", help="which of the two configs to run, in order")
    args = ap.parse_args()

    from hf_cpt.recipe.study import run_study, study_table

    paths = {p.stem: p for p in write_configs(args.out, args.steps, args.lr, args.max_train_files)}
    chosen = [paths[c] for c in args.configs.split(",")]
    t0 = time.perf_counter()
    result = run_study(chosen, args.defences.split(","), [int(s) for s in args.seeds.split(",")], args.out)
    print("\n" + study_table(result.summary) + "\n")
    for line in result.verdict:
        print(line)
    print(f"plot: {result.plot}; {time.perf_counter() - t0:.0f} s on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")


if __name__ == "__main__":
    main()
