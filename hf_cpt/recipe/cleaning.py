"""Data cleaning in a run (issue 34): dedup and decontaminate the training sources before they are mixed.

The recipe's side of `hf_cpt.data_clean`: which held-out sets a run evaluates on (the domain and general `eval`
splits, `general_self`, the documents of every lm-eval task in `downstream:`), applying the keep masks to
`datasets` sources (map-style: `select`; streaming: a filtered stream re-decided identically every pass), token
counts for the report, and the part of a prepared store's fingerprint that the cleaning settings decide.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import CPTConfig
from ..data_clean import EXACT, FLAGGED, DocumentCleaner, clean_documents, normalize_words, summary_line
from ..data_clean.clean import DECISION_STEP

if TYPE_CHECKING:
    from ..callbacks.downstream import DownstreamConfig
    from ..data_clean import DecontaminateConfig, DedupConfig

logger = logging.getLogger(__name__)

DOWNSTREAM_PREFIX = "downstream:"  # held-out set names of lm-eval tasks, e.g. `downstream:hf_cpt_kjv_mc`
_TOKEN_SAMPLE = 64  # kept documents tokenized to estimate a source's kept tokens on the fly


def cleaning_enabled(dedup: DedupConfig | None, decon: DecontaminateConfig | None) -> bool:
    """Whether `dedup` (a [`DedupConfig`] or None) or `decon` (a [`DecontaminateConfig`] or None) does anything."""
    return bool((dedup is not None and dedup.enabled) or (decon is not None and decon.enabled))


def iter_texts(ds: Any, text_field: str) -> Iterator[Any]:
    """The text column of a `datasets.Dataset` in batches (bounded memory), or the items of a plain sequence."""
    if hasattr(ds, "iter") and hasattr(ds, "column_names"):
        for batch in ds.iter(batch_size=1000):
            yield from batch[text_field]
        return
    for item in ds:
        yield item[text_field] if isinstance(item, Mapping) else item


def downstream_texts(downstream: DownstreamConfig | None) -> dict[str, list[str]]:
    """The documents of every lm-eval task in `downstream.tasks` (groups and tags expanded), read through
    lm-eval's own task objects (offline tasks included): per document its prompt (`doc_to_text`) followed by its
    answer choices, or by its target for generation tasks. Keyed `downstream:<task>`."""
    from ..evaluation import get_task_manager, quiet_lm_eval

    if downstream is None or not downstream.tasks:
        return {}
    manager = get_task_manager(downstream.tasks, downstream.include_path)
    with quiet_lm_eval():
        tasks = manager.load(list(downstream.tasks))["tasks"]
        out = {}
        for name, task in sorted(tasks.items()):
            out[DOWNSTREAM_PREFIX + name] = [_task_document_text(task, doc) for doc in task.eval_docs]
    return out


def _task_document_text(task: Any, doc: Any) -> str:
    parts = [str(task.doc_to_text(doc))]
    if getattr(task.config, "doc_to_choice", None) is not None:
        parts.extend(str(c) for c in task.doc_to_choice(doc))
    else:
        target = task.doc_to_target(doc)
        parts.extend(str(t) for t in (target if isinstance(target, list) else [target]))
    return "\n".join(parts)


def held_out_fingerprint(held_out: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """`{set name: sha256 of its texts}` (first 16 hex digits): a store is cleaned against exactly these."""
    out = {}
    for name, texts in sorted(held_out.items()):
        h = hashlib.sha256()
        for t in texts:
            h.update(str(t).encode("utf-8"))
            h.update(b"\0")
        out[name] = h.hexdigest()[:16]
    return out


def cleaning_fingerprint(dedup: DedupConfig | None, decontaminate: DecontaminateConfig | None,
                         held_out: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """What a prepared store's cleaning depends on: the settings and the held-out texts (not `workers`)."""
    from dataclasses import asdict

    decon = asdict(decontaminate) if decontaminate is not None and decontaminate.enabled else None
    dedup = asdict(dedup) if dedup is not None and dedup.enabled else None
    return {"dedup": dedup, "decontaminate": decon,
            "held_out": held_out_fingerprint(held_out) if decon is not None else {}}


def clean_train_sources(dedup: DedupConfig | None, decontaminate: DecontaminateConfig | None,
                        sources: Mapping[str, Any], text_fields: Mapping[str, str],
                        held_out: Mapping[str, Sequence[str]], tokenizer: Any = None, workers: int = 1,
                        field: str = "data") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Dedup and decontaminate `sources` (`{name: datasets.Dataset | IterableDataset | sequence}`, in priority
    order) as `dedup` and `decontaminate` say (None: off); returns the kept sources and the report (None when
    both are off). Map-style sources are filtered now (`select`); streaming sources are wrapped in a
    [`CleanedStream`] that decides as it reads. With `tokenizer`, the removed documents' tokens are counted and
    each source's total is estimated from a sample (`tokens_estimated`).

    Raises:
        ValueError: cleaning removed every document of a source (naming `<field>.<name>.train`).
    """
    if not cleaning_enabled(dedup, decontaminate):
        return dict(sources), None
    names = list(sources)
    streaming = [n for n in names if not hasattr(sources[n], "__len__")]
    if streaming:
        return _clean_streams(dedup, decontaminate, sources, text_fields, held_out, streaming, field)
    result = clean_sources(sources, text_fields, dedup, decontaminate, held_out, workers)
    out = {}
    for name, ds in sources.items():
        keep = result.keep(name)
        if not keep.any():
            s = result.report.sources[name]
            raise ValueError(f"`{field}.{name}.train`: cleaning removed every document (exact "
                             f"{s['exact']['documents']}, near {s['near']['documents']}, contaminated "
                             f"{s['contaminated']['documents']}); check the corpus, or relax `data.dedup` / "
                             "`data.decontaminate`")
        out[name] = ds if keep.all() else _select(ds, np.flatnonzero(keep))
        if tokenizer is not None:
            count_tokens(result.report, name, ds, result.decisions[name], text_fields[name], tokenizer)
    report = result.report.to_dict()
    logger.info(summary_line(report))
    return out, report


def clean_sources(sources: Mapping[str, Any], text_fields: Mapping[str, str], dedup: DedupConfig | None,
                  decontaminate: DecontaminateConfig | None, held_out: Mapping[str, Sequence[str]],
                  workers: int = 1) -> Any:
    """[`clean_documents`] over map-style `sources` (`{name: datasets.Dataset | sequence}`) with one progress bar
    for the phase (documents/s)."""
    from ..callbacks.progress import PhaseBar

    with PhaseBar("Cleaning training text", total=sum(len(ds) for ds in sources.values())) as bar:
        return clean_documents({n: iter_texts(ds, text_fields[n]) for n, ds in sources.items()}, dedup,
                               decontaminate, held_out, workers=workers, progress=bar.update)


def _select(ds: Any, idx: np.ndarray) -> Any:
    if hasattr(ds, "select"):
        return ds.select(idx.tolist())
    return [ds[int(i)] for i in idx]


def _text_at(ds: Any, i: int, text_field: str) -> Any:
    item = ds[int(i)]
    return item[text_field] if isinstance(item, Mapping) else item


def _n_tokens(tokenizer: Any, texts: list[Any]) -> int:
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        return 0
    return sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])


def count_tokens(report: Any, name: str, ds: Any, decisions: np.ndarray, text_field: str, tokenizer: Any,
                 kept_tokens: int | None = None) -> None:
    """Add `tokens` to the report of source `name`: per step, the tokens of the documents it removed (or, for
    `contaminated` under `action: report`, flagged), tokenized exactly; the kept tokens are `kept_tokens` when
    known (a prepared store tokenizes them anyway), else estimated from the tokens per word of the first kept
    documents (`tokens_estimated: true`)."""
    s = report.sources[name]
    for code, step in DECISION_STEP.items():
        idx = np.flatnonzero(decisions == code)
        if len(idx) or "tokens" not in s[step]:
            s[step]["tokens"] = s[step].get("tokens", 0) + _n_tokens(tokenizer, [_text_at(ds, i, text_field)
                                                                               for i in idx])
    keep = decisions < EXACT
    if kept_tokens is None:
        sample = [_text_at(ds, int(i), text_field) for i in np.flatnonzero(keep)[:_TOKEN_SAMPLE]]
        sample_words = sum(len(normalize_words(t)) for t in sample) or 1
        kept_tokens = int(round(s["kept"]["words"] * _n_tokens(tokenizer, sample) / sample_words))
        s["tokens_estimated"] = True
    else:
        s["tokens_estimated"] = False
    removed = sum(s[step]["tokens"] for code, step in DECISION_STEP.items() if code != FLAGGED)
    s["kept"]["tokens"] = kept_tokens
    s["tokens"] = kept_tokens + removed


# --- streaming sources ----------------------------------------------------------------------------------------
class CleanedStream:
    """A streaming source read through a [`DocumentCleaner`]. Every pass starts a fresh cleaner, first fed the
    sources listed before this one (their copies are kept first), so a document gets the same decision in every
    pass; memory is the indexes only. `report` is the report of the first complete pass (also logged then)."""

    def __init__(self, name: str, data: Any, text_fields: Mapping[str, str], make_cleaner: Any,
                 before: Mapping[str, Any]) -> None:
        self.name, self.data, self.text_fields = name, data, dict(text_fields)
        self._make, self._before = make_cleaner, dict(before)
        self.report: dict[str, Any] | None = None
        self.column_names = getattr(data, "column_names", None)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        cleaner: DocumentCleaner = self._make()
        for name, texts in self._before.items():
            for t in iter_texts(texts, self.text_fields[name]):
                cleaner.keep(name, t)
        for item in self.data:
            if cleaner.keep(self.name, item[self.text_fields[self.name]] if isinstance(item, Mapping) else item):
                yield item
        if self.report is None:
            self.report = cleaner.report.to_dict()
            logger.info("%s (streaming source %r, first pass)", summary_line(self.report), self.name)


def _clean_streams(dedup: DedupConfig | None, decontaminate: DecontaminateConfig | None, sources: Mapping[str, Any],
                   text_fields: Mapping[str, str],
                   held_out: Mapping[str, Sequence[str]], streaming: list[str], field: str
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sources before the first streaming one are cleaned now; from there on each source is a
    [`CleanedStream`] (a map-style source after a streaming one is read as a stream too)."""
    names = list(sources)
    first = names.index(streaming[0])
    out, report = clean_train_sources(dedup, decontaminate, {n: sources[n] for n in names[:first]}, text_fields,
                                      held_out, field=field) if first else ({}, None)
    report = dict(report or {})
    for i, name in enumerate(names[first:], start=first):
        before = {n: sources[n] for n in names[:i]}
        out[name] = CleanedStream(name, sources[name], text_fields,
                                  lambda: DocumentCleaner(dedup, decontaminate, held_out), before)
    report["streaming"] = {"sources": names[first:], "note": "counted in the log at the end of each stream's "
                                                             "first pass"}
    return out, report


def run_held_out_sets(cfg: CPTConfig, general_self: Any = None) -> dict[str, list[str]]:
    """The held-out sets of a run besides its `eval` splits, for decontamination: `general_self` (the
    self-synthesised held-out text, when sampled) and the documents of every `downstream` task. Empty when
    `data.decontaminate` is off."""
    from ..config import SELF_EVAL_SET

    decon = cfg.data.decontaminate
    if decon is None or not decon.enabled:
        return {}
    out = {SELF_EVAL_SET: list(iter_texts(general_self, "text"))} if general_self is not None else {}
    out.update(downstream_texts(cfg.downstream))
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """The cleaning report as the lines `hf-cpt prepare --dry-run` prints: the summary, per source and step the
    documents / tokens removed and their fractions, the held-out sets, and a few examples."""
    lines = [summary_line(report)]
    settings = report.get("settings", {})
    lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for name, s in report.get("sources", {}).items():
        est = " (estimated)" if s.get("tokens_estimated") else ""
        lines.append(f"  {name}: {s['documents']:,} documents, {s.get('tokens', 'n/a'):,} tokens{est}"
                     if isinstance(s.get("tokens"), int) else f"  {name}: {s['documents']:,} documents")
        for step in ("exact", "near", "contaminated", "kept"):
            d = s[step]
            tok = f", {d['tokens']:,} tokens ({d.get('fraction_tokens', 0):.2%})" if "tokens" in d else ""
            extra = f", across sources {d['across_sources']}" if d.get("across_sources") else ""
            by_set = f", by set {d['by_set']}" if d.get("by_set") else ""
            lines.append(f"    {step:<12} {d['documents']:>8,} documents ({d['fraction_documents']:.2%}){tok}{extra}"
                         f"{by_set}")
    for name, h in report.get("held_out", {}).items():
        lines.append(f"  held-out {name}: {h['documents']:,} documents ({h['shorter_than_ngram']} shorter than "
                     "the n-gram)")
    for e in report.get("examples", [])[:20]:
        lines.append("  example: " + ", ".join(f"{k}={v}" for k, v in e.items()))
    if report.get("streaming"):
        lines.append(f"  streaming sources {report['streaming']['sources']}: {report['streaming']['note']}")
    return "\n".join(lines)


def store_cleaning_line(path: Any) -> str | None:
    """The cleaning summary of the prepared store at `path` (from its manifest), or None."""
    import json
    from pathlib import Path

    from ..mixers.prepared import MANIFEST

    manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    report = manifest.get("cleaning")
    return summary_line(report) if report else None
