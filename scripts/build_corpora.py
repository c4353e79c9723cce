"""Rebuild the embedded corpora shipped in ``hf_cpt/data/`` from Debian packages.

The corpora are small on purpose: they make the quickstart run offline on a CPU in minutes.

* ``kjv`` (general / replay text): the King James Version of the Bible, whose copyright expired long ago
  (public domain outside the UK), as shipped by Debian's ``bible-kjv`` package. One document per chapter.
* ``python-docs`` (domain text): the reStructuredText sources of the Python 3.11 documentation
  (PSF License Version 2), as shipped by Debian's ``python3.11-doc`` package. One document per file.

Held-out (``validation``) documents are chosen by a stable hash of the document id, so rebuilding gives
the same split. Usage (needs ``apt-get install bible-kjv python3.11-doc``)::

    python scripts/build_corpora.py
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "hf_cpt" / "data"
PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
# Budgets in characters: enough text for the quickstart and the tests, small enough to ship in the wheel.
TRAIN_CHARS = 1_500_000
VALIDATION_CHARS = 60_000


def _is_heldout(doc_id: str, every: int = 20) -> bool:
    return int(hashlib.sha1(doc_id.encode()).hexdigest(), 16) % every == 0


def kjv_documents() -> list[tuple[str, str]]:
    raw = subprocess.run(["bible", "Ge1:1-Re22:21"], check=True, capture_output=True, text=True).stdout
    docs: list[tuple[str, str]] = []
    title, verses = None, []
    for line in raw.splitlines():
        if re.fullmatch(r"[1-3A-Z][A-Za-z ]* \d+", line.strip()) and not line.startswith(" "):
            if title:
                docs.append((title, title + "\n\n" + "\n".join(verses)))
            title, verses = line.strip(), []
        elif re.match(r"^\s+\d+ ", line):
            verses.append(line.strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    if title:
        docs.append((title, title + "\n\n" + "\n".join(verses)))
    return docs


def python_doc_documents() -> list[tuple[str, str]]:
    docs = []
    for path in sorted(PY_DOCS.rglob("*.rst.txt")):
        rel = str(path.relative_to(PY_DOCS))
        if rel.startswith(("whatsnew/", "c-api/", "distutils/")):
            continue  # changelogs and the C API are a different register; keep the domain coherent
        text = path.read_text(encoding="utf-8").strip()
        if len(text) > 200:
            docs.append((rel, text))
    return docs


def write_split(name: str, docs: list[tuple[str, str]]) -> None:
    train = [d for d in docs if not _is_heldout(d[0])]
    val = [d for d in docs if _is_heldout(d[0])]
    for split, items, budget in (("train", train, TRAIN_CHARS), ("validation", val, VALIDATION_CHARS)):
        path = OUT / name / f"{split}.jsonl.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        total = 0
        # mtime=0 keeps the gzip bytes reproducible
        with gzip.GzipFile(path, "wb", mtime=0) as fh:
            for doc_id, text in items:
                if total >= budget:
                    break
                # held-out text: a slice of many documents rather than all of a few
                text = text[: min(6_000, budget - total)] if split == "validation" else text
                fh.write((json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n").encode())
                total += len(text)
        print(f"{path.relative_to(OUT.parent.parent)}: {total:,} chars")


if __name__ == "__main__":
    write_split("kjv", kjv_documents())
    write_split("python-docs", python_doc_documents())
