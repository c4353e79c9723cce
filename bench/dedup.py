"""Data cleaning (issue 34): which MinHash library, how well, how fast, and what it finds in the embedded corpora.

    python bench/dedup.py [--mb 200] [--parts libraries,planted,embedded,scale] [--out docs/dedup_bench.json]

1. `libraries`: datasketch vs rensa (datatrove when installed) on the embedded corpora: signatures per second and
   MB/s (128 permutations, 5-word shingles), and the error of their Jaccard estimate against the exact Jaccard on
   planted near duplicates of the corpora.
2. `planted`: precision / recall of exact + near dedup at thresholds 0.7 / 0.8 / 0.9 on a corpus of planted
   duplicates (exact, edited, reordered, wrapped in boilerplate) and hard negatives, originals from the embedded
   corpora (themselves deduplicated first, so the truth is the planted one); and of decontamination on planted
   13-gram contamination.
3. `embedded`: what the defaults find in the shipped corpora: repeats within and across them, and overlap of their
   training splits with their held-out splits and the offline lm-eval tasks.
4. `scale`: >= `--mb` MB of text (the embedded corpora under a per-copy word cipher, so copies do not repeat each
   other, with 10% planted duplicates): MB/s of exact, near and decontamination with 1 and 2 workers, peak memory,
   and the SmolLM2 tokenizer's time on the same text as `hf-cpt prepare` runs it (the cost ratio; goal <= 1x).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from hf_cpt.data_clean import (EXACT, DecontaminateConfig, DedupConfig, NearDuplicateIndex, clean_documents,  # noqa: E402
                               jaccard, minhash_function, normalize_words, word_shingles)
from hf_cpt.data_clean.planted import plant_contamination, plant_duplicates, precision_recall  # noqa: E402
from hf_cpt.testing import read_embedded  # noqa: E402


def _mb(texts) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def _peak_mb() -> float:
    """Peak resident memory of this process (a worker's peak is reported by `_peak_children_mb`), MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _peak_children_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def corpora() -> dict[str, list[str]]:
    return {f"{c}/{s}": read_embedded(c, s) for c in ("python-docs", "kjv") for s in ("train", "validation")}


def offline_task_texts() -> dict[str, list[str]]:
    try:
        from hf_cpt.callbacks.downstream import DownstreamConfig
        from hf_cpt.recipe.cleaning import downstream_texts

        return downstream_texts(DownstreamConfig(tasks=["hf_cpt_python_docs_mc", "hf_cpt_kjv_mc"]))
    except ImportError:
        return {}


# --- 1. libraries ------------------------------------------------------------------------------------------
def bench_libraries(c: dict[str, list[str]]) -> dict:
    texts = c["python-docs/train"] + c["kjv/train"]
    shingles = [word_shingles(normalize_words(t), 5) for t in texts]
    n_shingles = sum(len(s) for s in shingles)
    out = {"documents": len(texts), "mb": _mb(texts), "shingles": n_shingles}
    planted = plant_duplicates(texts[:60] + texts[64:124], seed=0, copies=1)
    pairs = []
    originals = {}
    for i, (doc, kind) in enumerate(zip(planted.documents, planted.kind)):
        if kind == "original":
            originals[len(originals)] = doc
    for backend in ("rensa", "datasketch"):
        try:
            sign = minhash_function(backend, 128, 0)
        except ImportError as e:
            out[backend] = {"error": str(e)}
            continue
        t0 = time.perf_counter()
        for s in shingles:
            sign(s)
        dt = time.perf_counter() - t0
        errors = []
        sig_of = {}
        for doc in planted.documents:
            sig_of[doc] = sign(word_shingles(normalize_words(doc), 5))
        # estimate vs exact Jaccard on each planted copy and its original (matched by the planted order)
        sets = [set(word_shingles(normalize_words(d), 5)) for d in planted.documents]
        n_orig = planted.kind.count("original")
        for i in range(n_orig, len(planted.documents)):
            best = max(range(n_orig), key=lambda j: len(sets[i] & sets[j]))
            est = float(np.mean(sig_of[planted.documents[i]] == sig_of[planted.documents[best]]))
            errors.append(abs(est - jaccard(sets[i], sets[best])))
        out[backend] = {"seconds": dt, "docs_per_s": len(texts) / dt, "mb_per_s": out["mb"] / dt,
                        "shingles_per_s": n_shingles / dt, "mean_abs_error": float(np.mean(errors)),
                        "p95_abs_error": float(np.percentile(errors, 95))}
        print(f"  {backend:<11} {out['mb'] / dt:7.2f} MB/s, {n_shingles / dt / 1e6:6.2f} M shingles/s, "
              f"|J est - J| mean {np.mean(errors):.3f} p95 {np.percentile(errors, 95):.3f}", flush=True)
    try:
        import datatrove  # noqa: F401

        out["datatrove"] = {"installed": True}
    except ImportError:
        out["datatrove"] = {"installed": False}
    return out


# --- 2. planted truth -----------------------------------------------------------------------------------------
def clean_originals(c: dict[str, list[str]]) -> list[str]:
    texts = c["python-docs/train"] + c["kjv/train"]
    res = clean_documents({"x": texts}, DedupConfig(threshold=0.5))  # drop anything similar: a clean truth
    return [t for t, k in zip(texts, res.keep("x")) if k and len(normalize_words(t)) >= 100]


def bench_planted(c: dict[str, list[str]]) -> dict:
    originals = clean_originals(c)
    out = {"originals": len(originals)}
    for threshold in (0.7, 0.8, 0.9):
        corpus = plant_duplicates(originals, seed=1, threshold=threshold)
        t0 = time.perf_counter()
        res = clean_documents({"x": corpus.documents}, DedupConfig(threshold=threshold))
        dt = time.perf_counter() - t0
        removed = (res.decisions["x"] >= EXACT).tolist()
        p, r = precision_recall(removed, corpus.duplicate)
        by_kind = {}
        for k in ("exact", "edit", "reorder", "wrap", "hard_negative"):
            idx = [i for i, kk in enumerate(corpus.kind) if kk == k]
            by_kind[k] = {"planted": len(idx), "true_duplicates": sum(corpus.duplicate[i] for i in idx),
                          "removed": sum(removed[i] for i in idx),
                          "jaccard_mean": float(np.mean([corpus.similarity[i] for i in idx]))}
        out[str(threshold)] = {"documents": len(corpus.documents), "true_duplicates": sum(corpus.duplicate),
                               "precision": p, "recall": r, "seconds": dt, "by_kind": by_kind}
        print(f"  threshold {threshold}: precision {p:.3f} recall {r:.3f} ({sum(corpus.duplicate)} true "
              f"duplicates of {len(corpus.documents)} documents)", flush=True)
    held = c["python-docs/validation"] + c["kjv/validation"]
    from hf_cpt.data_clean import NgramIndex

    index = NgramIndex.from_sets({"held": held}, 13)  # originals already sharing a 13-gram would blur the truth
    pure = [t for t in originals if index.first_match(normalize_words(t)) is None]
    train, truth = plant_contamination(pure, held, n=13, seed=2)
    res = clean_documents({"x": train}, None, DecontaminateConfig(), {"held": held})
    p, r = precision_recall((res.decisions["x"] >= EXACT).tolist(), truth)
    out["decontamination"] = {"documents": len(train), "contaminated": sum(truth), "precision": p, "recall": r}
    grams = {tuple(w[i:i + 13]) for h in held for w in [normalize_words(h)] for i in range(len(w) - 12)}
    naive = [any(tuple(w[i:i + 13]) in grams for i in range(len(w) - 12)) for w in map(normalize_words, train)]
    out["decontamination"]["vs_naive_reference"] = precision_recall((res.decisions["x"] >= EXACT).tolist(), naive)
    out["decontamination"]["planted_negatives_really_sharing_a_13gram"] = sum(n and not t for n, t in zip(naive, truth))
    print(f"  decontamination (13-grams): precision {p:.3f} recall {r:.3f} ({sum(truth)} planted)", flush=True)
    print(f"  vs the naive set-intersection reference: precision, recall = {out['decontamination']['vs_naive_reference']}; "
          f"{out['decontamination']['planted_negatives_really_sharing_a_13gram']} planted 12-word spans met a matching "
          "neighbour word (a real 13-gram)", flush=True)
    return out


# --- 3. the embedded corpora ------------------------------------------------------------------------------------
def bench_embedded(c: dict[str, list[str]]) -> dict:
    held = {"python-docs/validation": c["python-docs/validation"], "kjv/validation": c["kjv/validation"],
            **offline_task_texts()}
    sources = {"python-docs/train": c["python-docs/train"], "kjv/train": c["kjv/train"]}
    res = clean_documents(sources, DedupConfig(), DecontaminateConfig(action="report"), held)
    report = res.report.to_dict()
    for e in report["examples"]:
        src = sources[e["source"]][e["document"]]
        e["title"] = src.split("\n", 1)[0][:60]
        if "kept_source" in e:
            e["kept_title"] = sources[e["kept_source"]][e["kept_document"]].split("\n", 1)[0][:60]
    # the shared n-grams themselves (a few), per held-out set
    from hf_cpt.data_clean import NgramIndex

    overlaps = {}
    for name, texts in held.items():
        idx = NgramIndex.from_sets({name: texts}, 13)
        found = []
        for sname, docs in sources.items():
            for i, d in enumerate(docs):
                w = normalize_words(d)
                for j in range(len(w) - 12):
                    if tuple(w[j:j + 13]) in idx._grams:
                        found.append({"source": sname, "document": i, "title": d.split("\n", 1)[0][:60],
                                      "ngram": " ".join(w[j:j + 13])})
                        break
        overlaps[name] = {"training_documents": len(found), "examples": found[:8]}
    out = {"report": report, "overlaps": overlaps, "most_similar": most_similar_pairs(sources)}
    for name, s in report["sources"].items():
        print(f"  {name}: {s['documents']} docs; exact {s['exact']['documents']}, near {s['near']['documents']}, "
              f"contaminated {s['contaminated']['documents']} {s['contaminated']['by_set']}", flush=True)
    for name, o in overlaps.items():
        print(f"  overlap with {name}: {o['training_documents']} training documents", flush=True)
    return out


def most_similar_pairs(sources: dict[str, list[str]], top: int = 8) -> list[dict]:
    """The most similar training document pairs (exact Jaccard of 5-word shingles), across both corpora."""
    docs = [(s, i, d) for s, texts in sources.items() for i, d in enumerate(texts)]
    sets = [set(word_shingles(normalize_words(d), 5)) for _, _, d in docs]
    sign = minhash_function("rensa", 128, 0)
    sigs = np.stack([sign(sorted(s)) for s in sets])
    est = np.zeros((len(docs), len(docs)))
    for i in range(len(docs)):
        est[i] = (sigs == sigs[i]).mean(axis=1)
    np.fill_diagonal(est, 0)
    pairs = sorted(((est[i, j], i, j) for i in range(len(docs)) for j in range(i + 1, len(docs))), reverse=True)
    out = []
    for _, i, j in pairs[:top]:
        out.append({"a": f"{docs[i][0]}: {docs[i][2].split(chr(10), 1)[0][:40]}",
                    "b": f"{docs[j][0]}: {docs[j][2].split(chr(10), 1)[0][:40]}", "jaccard": jaccard(sets[i], sets[j])})
        print(f"  similar: {out[-1]['a']} ~ {out[-1]['b']}: J = {out[-1]['jaccard']:.3f}", flush=True)
    return out


# --- 4. scale ------------------------------------------------------------------------------------------------------
def ciphered_corpus(c: dict[str, list[str]], mb: float, seed: int = 0) -> list[str]:
    """>= `mb` MB: copy k of the training corpora has every word replaced through a seeded permutation of the
    corpora's vocabulary (natural lengths and word frequencies, no cross-copy repeats); then 10% of the documents
    re-planted as exact or edited copies of earlier ones."""
    import re

    base = c["python-docs/train"] + c["kjv/train"]
    vocab = sorted({w for t in base for w in re.findall(r"[A-Za-z]+", t)})
    rng = random.Random(seed)
    out: list[str] = []
    k = 0
    while _mb(out) < mb * 0.9:
        perm = vocab[:]
        rng.shuffle(perm)
        table = dict(zip(vocab, perm))
        sub = re.compile(r"[A-Za-z]+")
        for t in base:
            out.append(sub.sub(lambda m: table[m.group(0)], t))
        k += 1
    n_dup = len(out) // 10
    for _ in range(n_dup):
        src = out[rng.randrange(len(out))]
        words = src.split(" ")
        if rng.random() < 0.5:
            words[rng.randrange(len(words))] = "edited"
        out.append(" ".join(words))
    return out


def _tokenize_seconds(texts: list[str], num_proc: int) -> float:
    import datasets
    from transformers import AutoTokenizer

    from hf_cpt.recipe.models import resolve_model_path
    from hf_cpt.recipe.prepare import tokenize_documents

    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m"))
    ds = datasets.Dataset.from_dict({"text": texts})
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        tokenize_documents(ds, tok, "text", num_proc=num_proc, cache_file_name=f"{d}/map.arrow")
        return time.perf_counter() - t0


def bench_scale(c: dict[str, list[str]], mb: float, workers: list[int], tokenize: bool, clean: bool = True) -> dict:
    texts = ciphered_corpus(c, mb)
    size = _mb(texts)
    print(f"  corpus: {len(texts):,} documents, {size:.0f} MB", flush=True)
    print(f"  load average (1, 5, 15 min): {os.getloadavg()}", flush=True)
    held = {"held": c["python-docs/validation"] + c["kjv/validation"], **offline_task_texts()}
    steps = {"exact": (DedupConfig(near=False), None), "near": (DedupConfig(exact=False), None),
             "decontaminate": (None, DecontaminateConfig()), "all": (DedupConfig(), DecontaminateConfig())}
    out: dict = {"documents": len(texts), "mb": size, "runs": {}}
    for w in (workers if clean else []):
        for name, (dedup, decon) in steps.items():
            gc.collect()
            t0 = time.perf_counter()
            res = clean_documents({"x": texts}, dedup, decon, held, workers=w)
            dt = time.perf_counter() - t0
            removed = int((res.decisions["x"] >= EXACT).sum())
            out["runs"][f"{name}/workers={w}"] = {"seconds": dt, "mb_per_s": size / dt, "removed": removed,
                                                   "index_bytes": res.report.index_bytes,
                                                   "peak_rss_mb": _peak_mb(), "peak_worker_rss_mb": _peak_children_mb()}
            print(f"  {name:<13} workers={w}: {dt:6.1f} s, {size / dt:6.2f} MB/s, removed {removed:,}, "
                  f"peak RSS {_peak_mb():.0f} MB", flush=True)
            del res
    if tokenize:
        for n in workers:
            dt = _tokenize_seconds(texts, n)
            out["runs"][f"tokenize/num_proc={n}"] = {"seconds": dt, "mb_per_s": size / dt}
            print(f"  tokenize (SmolLM2, prepare path) num_proc={n}: {dt:6.1f} s, {size / dt:6.2f} MB/s", flush=True)
    return out


def bench_index_memory(n: int = 200_000) -> dict:
    """Bytes per kept document of the near-duplicate index (dicts + signatures), measured by tracemalloc."""
    import tracemalloc

    rng = np.random.default_rng(0)
    d = DedupConfig()
    tracemalloc.start()
    index = NearDuplicateIndex(d.threshold, d.num_perm, *d.bands)
    for _ in range(n):
        index.add(rng.integers(0, 2**32, d.num_perm, dtype=np.uint32))
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    exact: dict[int, int] = {}
    tracemalloc.start()
    for i in range(n):
        exact[int(rng.integers(0, 2**63))] = i << 40
    cur_exact, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"near_bytes_per_doc": current / n, "exact_bytes_per_doc": cur_exact / n,
           "near_gb_per_million": current / n * 1e6 / 1e9, "exact_mb_per_million": cur_exact / n * 1e6 / 1e6}
    print(f"  index memory: near {current / n:.0f} B/doc ({out['near_gb_per_million']:.2f} GB per million), exact "
          f"{cur_exact / n:.0f} B/doc ({out['exact_mb_per_million']:.0f} MB per million)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=200.0)
    p.add_argument("--parts", default="libraries,planted,embedded,memory,scale")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--no-tokenize", action="store_true")
    p.add_argument("--no-clean", action="store_true", help="scale: only the tokenizer timing")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    parts = a.parts.split(",")
    c = corpora()
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "load_average_at_start": os.getloadavg()}}
    for part, fn in (("libraries", lambda: bench_libraries(c)), ("planted", lambda: bench_planted(c)),
                     ("embedded", lambda: bench_embedded(c)), ("memory", bench_index_memory),
                     ("scale", lambda: bench_scale(c, a.mb, [int(w) for w in a.workers.split(",")],
                                                   not a.no_tokenize, not a.no_clean))):
        if part in parts:
            print(f"{part}:", flush=True)
            result[part] = fn()
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        print(f"written to {a.out}")


if __name__ == "__main__":
    main()
