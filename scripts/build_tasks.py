"""Build the offline lm-evaluation-harness tasks shipped in ``hf_cpt/data/tasks/`` from the embedded corpora.

Two multiple-choice *continuation* tasks, one per held-out corpus (the ``validation`` splits, never trained on):

* ``hf_cpt_python_docs_mc`` (domain): a passage of prose from the held-out Python documentation and four candidate
  next sentences: the true one and three sentences of similar length taken from *other* held-out documents.
* ``hf_cpt_kjv_mc`` (general): one or two consecutive verses of a held-out King James Bible chapter and four
  candidate next verses (the true one, three verses of similar length from other chapters); verse numbers removed.

Clean of the training text (issue 34): no context, answer or distractor shares a 13-gram of normalised words with
either corpus's *training* split (the text hf-cpt trains on), so decontaminating a run against these tasks removes
no training document on their account.

Scored by lm-eval's ``multiple_choice`` output type: the log-likelihood of each candidate after the passage,
``acc`` (raw) and ``acc_norm`` (per byte). A model that knows the text's style and subject picks the true
continuation more often than chance (25 %). Deterministic: a fixed seed, and the corpora are fixed files.

    python scripts/build_tasks.py [--items 160]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "hf_cpt" / "data"
OUT = DATA / "tasks"
SEED = 1234
N_CHOICES = 4

# one YAML per task: a real lm-eval task config; the rows come from the JSONL next to it through
# `hf_cpt.evaluation.load_offline_task` (lm-eval's `custom_dataset` hook), which resolves the file relative to
# this directory, so the installed package works from any working directory and never downloads
TASK_YAML = """\
# Built by scripts/build_tasks.py from the held-out {corpus} split shipped with hf-cpt ({role} text).
task: {task}
tag: hf_cpt
custom_dataset: !function hf_cpt.evaluation.load_offline_task
dataset_kwargs:
  data_file: {task}.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


LICENSE = """The task files in this directory are derived from the held-out splits of the corpora shipped with hf-cpt:
hf_cpt_python_docs_mc.jsonl from ../python-docs (Python documentation, PSF License Version 2, see
../python-docs/LICENSE) and hf_cpt_kjv_mc.jsonl from ../kjv (King James Version, public domain outside the UK,
see ../kjv/LICENSE). Built by scripts/build_tasks.py.
"""


def read_split(name: str) -> list[str]:
    with gzip.open(DATA / name / "validation.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def prose_units(doc: str) -> list[list[str]]:
    """Runs of running prose in a reStructuredText document (body text and the descriptions under
    `.. function::` directives), each as a list of sentences: consecutive prose paragraphs form one run, a
    heading, directive, code block or list ends it (the task is about the documentation's language)."""
    runs: list[list[str]] = [[]]
    for block in re.split(r"\n\s*\n", doc):
        sentences = _prose_sentences(block)
        if sentences:
            runs[-1].extend(sentences)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if len(r) >= 2]


def _prose_sentences(block: str) -> list[str]:
    """The sentences of one paragraph of prose; [] for anything else."""
    lines = textwrap.dedent(block).strip("\n").split("\n")
    if any(not line or line.startswith((" ", "\t", "..", "*", "-", "=", "#", "+", "|", ">>>", ":"))
           for line in lines):
        return []
    # roles like :func:`x` and *emphasis* read as plain words for a language model; keep their text
    text = re.sub(r":[a-z:]+:`~?([^`<]+?)(?: <[^>]+>)?`", r"\1", _clean(block))
    text = re.sub(r"\*{1,2}([^*]+)\*{1,2}", r"\1", text).replace("``", "")
    words = text.split()
    if len(text) < 60 or not text.endswith((".", "!", "?")) or \
            sum(w.strip(".,;:()'\"").isalpha() for w in words) < 0.75 * len(words):
        return []
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text) if 25 <= len(s) <= 240]


def verse_units(doc: str) -> list[list[str]]:
    """A chapter's verses without their numbers (one unit per chapter)."""
    verses = [re.sub(r"^\d+\s+", "", line).strip() for line in doc.split("\n") if re.match(r"^\d+\s", line)]
    return [[v for v in verses if 20 <= len(v) <= 240]]


def read_train_splits() -> list[str]:
    out = []
    for name in ("python-docs", "kjv"):
        with gzip.open(DATA / name / "train.jsonl.gz", "rt", encoding="utf-8") as fh:
            out += [json.loads(line)["text"] for line in fh]
    return out


def build_items(units_per_doc: list[list[list[str]]], n_items: int, context_sentences: tuple[int, int],
                rng: random.Random, clean: Any = None) -> list[dict]:
    """Items `{context, choices, label}`: context = 1..k consecutive sentences, the true next sentence and
    distractors of similar length (within 40 %) from other documents. With `clean(text) -> bool`, an item whose
    text as lm-eval reads it (context, then the choices, one per line) fails it is skipped."""
    candidates = []  # (doc index, context, answer)
    for d, units in enumerate(units_per_doc):
        for sentences in units:
            for i in range(1, len(sentences)):
                k = min(i, rng.randint(*context_sentences))
                candidates.append((d, " ".join(sentences[i - k:i]), sentences[i]))
    rng.shuffle(candidates)
    pool = [(d, s) for d, units in enumerate(units_per_doc) for sentences in units for s in sentences]
    items, used_answers = [], set()
    for d, context, answer in candidates:
        if answer in used_answers:
            continue
        similar = [s for e, s in pool if e != d and s != answer and 0.6 <= len(s) / len(answer) <= 1.4]
        similar = sorted(set(similar))
        if len(similar) < N_CHOICES - 1:
            continue
        choices = rng.sample(similar, N_CHOICES - 1)
        label = rng.randrange(N_CHOICES)
        choices.insert(label, answer)
        if clean is not None and not clean("\n".join([context, *choices])):
            continue  # repeats training text (e.g. a verse found in two chapters)
        items.append({"context": context, "choices": choices, "label": label})
        used_answers.add(answer)
        if len(items) == n_items:
            break
    return items


def training_text_filter(n: int = 13) -> Any:
    """`clean(text)`: True when the text shares no `n`-gram of normalised words with the training splits."""
    sys.path.insert(0, str(ROOT))
    from hf_cpt.data_clean import NgramIndex, normalize_words

    index = NgramIndex.from_sets({"train": read_train_splits()}, n)
    return lambda s: index.first_match(normalize_words(s)) is None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=160, help="items per task")
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    specs = [
        ("hf_cpt_python_docs_mc", "python-docs", "domain", [prose_units(d) for d in read_split("python-docs")],
         (1, 2)),
        ("hf_cpt_kjv_mc", "kjv", "general", [verse_units(d) for d in read_split("kjv")], (1, 2)),
    ]
    (OUT / "LICENSE").write_text(LICENSE, encoding="utf-8")
    clean = training_text_filter()
    for task, corpus, role, units, ctx in specs:
        items = build_items(units, a.items, ctx, random.Random(f"{SEED}-{task}"), clean)
        with open(OUT / f"{task}.jsonl", "w", encoding="utf-8") as fh:
            for item in items:
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
        (OUT / f"{task}.yaml").write_text(TASK_YAML.format(task=task, corpus=corpus, role=role), encoding="utf-8")
        print(f"{task}: {len(items)} items from the held-out {corpus} split -> {OUT / (task + '.jsonl')}")


if __name__ == "__main__":
    main()
