"""`hf-cpt prepare` / [`prepare_sources`]: tokenize every training source once into a pretokenized store.

The store is a directory holding one `datasets.save_to_disk` Arrow dataset per source (column `input_ids`, one row
per document: its token ids followed by EOS, empty for a blank document) and `hf_cpt_prepared.json`, the manifest
with the fingerprint (tokenizer, source files, text column, cleaning settings and held-out hashes), the
document/token counts and the cleaning report (issue 34: the documents are deduplicated and decontaminated before
they are tokenized, see `hf_cpt.recipe.cleaning`). It is written into a staging directory and renamed into place
with the manifest already inside, so an interrupted prepare leaves no store that looks complete. [`PreparedMixer`] reads it (memory-mapped) to build the training blocks.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import CPTConfig
from ..data_clean import DecontaminateConfig, DedupConfig
from ..mixers.core import document_indices
from ..mixers.packing import document_tokens
from ..mixers.prepared import MANIFEST, PreparedStore, describe_difference, document_separator
from ..utils import commit_staging_dir, make_staging_dir
from .data import check_data_paths, config_sources, count_token_ids, load_split, store_fingerprint

if TYPE_CHECKING:
    from ..callbacks.progress import PhaseBar

logger = logging.getLogger(__name__)


def _check_num_proc(num_proc: object, field: str, what: str = "processes that tokenize") -> int:
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"`{field}` must be an integer >= 1 ({what}), got {num_proc!r}")
    return num_proc


def tokenize_documents(ds: Any, tokenizer: Any, text_field: str, num_proc: int = 1, desc: str = "",
                       cache_file_name: str | None = None, bos_id: int | None = None,
                       bar: PhaseBar | None = None) -> Any:
    """`ds` (a `datasets.Dataset` with a text column) as rows of `input_ids` (int32): each document's ids after
    `bos_id` (when set) and followed by the EOS id, as the on-the-fly mixer reads documents; blank documents
    become empty rows (kept, so row `i` is still document `i` when the documents are shuffled). `cache_file_name`:
    where `datasets` writes the result (default: its cache, where an identical earlier result is reused). `bar`:
    the [`PhaseBar`] of the phase, counting documents and tokens as they go (with `num_proc` > 1, once the
    source is done)."""
    import datasets

    sep = document_separator(tokenizer)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = batch[text_field]
        keep = document_indices(texts, f"{text_field!r} column")
        ids: list[list[int]] = [[] for _ in texts]
        if keep:
            encoded = tokenizer([texts[i] for i in keep], add_special_tokens=False)["input_ids"]
            for i, toks in zip(keep, encoded):
                ids[i] = document_tokens(toks, bos_id, sep)
        if bar is not None:
            bar.update(len(texts), sum(len(x) for x in ids))
        return {"input_ids": ids}

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    counted = bar.documents if bar is not None else 0
    out = ds.map(tokenize, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=ds.column_names, features=features, desc=f"Tokenizing {desc}".strip(),
                 cache_file_name=cache_file_name)
    if bar is not None and bar.documents - counted < len(ds):  # tokenized in workers, or read from the cache
        bar.update(len(ds) - (bar.documents - counted), count_token_ids(out))
    return out


def prepare_sources(sources: Mapping[str, str], tokenizer: Any, output_dir: str | Path, *,
                    text_field: str | Mapping[str, str] = "text", num_proc: int = 1, overwrite: bool = False,
                    field: str = "prepared_dir", packing: str = "documents", add_bos: str = "auto",
                    dedup: DedupConfig | None = None, decontaminate: DecontaminateConfig | None = None,
                    held_out: Mapping[str, Sequence[str]] | None = None, workers: int = 1) -> Path:
    """Tokenize each source once and write a pretokenized store to `output_dir`.

    Args:
        sources: `{name: data path}` (file, directory, glob, or `embedded:NAME/SPLIT`), e.g.
            `{"domain": "data/med/*.jsonl", "general": "embedded:kjv/train"}`.
        tokenizer: the tokenizer training will use (its EOS ends every document).
        output_dir: the store directory.
        text_field: the text column (one name, or one per source).
        num_proc: processes tokenizing in parallel (`datasets.Dataset.map(num_proc=...)`).
        overwrite: replace a store prepared from other data or with another tokenizer (else it is refused).
        field: how errors name `output_dir` (the CLI passes `data.prepared_dir`).
        packing / add_bos: the packing the store is read with (`documents` starts each document with the
            tokenizer's BOS as [`bos_for`] decides; recorded in the fingerprint, a mismatch is refused).
        dedup / decontaminate / held_out: clean the sources first (see `hf_cpt.data_clean`; None: that step is
            off): exact and near duplicates across all sources (first seen kept), and documents sharing an n-gram
            with a `held_out` set (`{name: texts}`). The settings and held-out texts are in the fingerprint and
            the report in the manifest (`cleaning`).
        workers: processes that hash documents for cleaning (the decisions do not depend on it).

    Returns:
        `output_dir`. A store already prepared from the same tokenizer, files and settings is kept as it is.

    Raises:
        ValueError: `num_proc` < 1, a stale store without `overwrite`, a source that cannot be prepared.
        FileExistsError: `output_dir` holds something that is not a store, and `overwrite` is False.
    """
    num_proc = _check_num_proc(num_proc, "num_proc")
    if not sources:
        raise ValueError("`sources` must name at least one source, e.g. {'domain': 'data/*.jsonl'}")
    final = Path(output_dir).expanduser().resolve()
    from .cleaning import cleaning_fingerprint

    held_out = dict(held_out or {})
    expected = store_fingerprint(sources, tokenizer, text_field, field="sources", packing=packing, add_bos=add_bos,
                                 cleaning=cleaning_fingerprint(dedup, decontaminate, held_out))
    if (final / MANIFEST).is_file():
        try:
            stored = json.loads((final / MANIFEST).read_text(encoding="utf-8")).get("fingerprint", {})
        except ValueError:
            stored = {}
        why = describe_difference(stored, expected)
        if why is None and set(stored.get("sources", {})) == set(expected["sources"]):
            try:
                PreparedStore(final, expected, field)  # complete and readable: nothing to do
                logger.info("prepared store %s is up to date", final)
                return final
            except (ValueError, FileNotFoundError) as e:
                if not overwrite:
                    raise ValueError(f"{e}") from None
        elif not overwrite:
            why = why or f"other sources ({sorted(stored.get('sources', {}))})"
            raise ValueError(f"`{field}`: the store at {str(final)!r} was prepared with {why}; pass "
                             "`overwrite=True` (CLI: --overwrite) to rebuild it, or choose another directory")
    elif final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise FileExistsError(f"`{field}`: {str(final)!r} exists and is not a prepared store; choose another "
                              "directory or pass `overwrite=True` (CLI: --overwrite)")
    staging = make_staging_dir(final, overwrite=True)
    try:
        loaded, report = load_and_clean_sources(sources, expected, dedup, decontaminate, held_out, workers)
        manifest = _write_sources(staging, loaded, tokenizer, num_proc, expected, report)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit_staging_dir(staging, final)
    return final


def load_and_clean_sources(sources: Mapping[str, str], fingerprint: dict[str, Any], dedup: DedupConfig | None,
                           decontaminate: DecontaminateConfig | None, held_out: Mapping[str, Sequence[str]],
                           workers: int = 1) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any] | None]:
    """Every source loaded (`datasets.Dataset`), then cleaned across sources (in the order given: the first
    copy is kept). Returns `{name: (kept documents, decisions or None)}` and the cleaning report (None: off)."""
    from ..config import SourceConfig
    from .cleaning import clean_sources, cleaning_enabled

    loaded = {}
    for name, spec in sources.items():
        tf = fingerprint["sources"][name]["text_field"]
        ds = load_split(spec, SourceConfig(train=spec, text_field=tf), f"sources.{name}")
        if len(ds) == 0:
            raise ValueError(f"`sources.{name}`: {spec!r} holds no documents; point it at your text")
        loaded[name] = ds
    if not cleaning_enabled(dedup, decontaminate):
        return {n: (ds, None) for n, ds in loaded.items()}, None
    fields = {n: fingerprint["sources"][n]["text_field"] for n in loaded}
    result = clean_sources(loaded, fields, dedup, decontaminate, held_out, workers)
    out = {}
    for name, ds in loaded.items():
        keep = result.keep(name)
        if not keep.any():
            raise ValueError(f"`sources.{name}`: cleaning removed every document; check the corpus, or relax "
                             "`data.dedup` / `data.decontaminate`")
        out[name] = (ds if keep.all() else ds.select(np.flatnonzero(keep).tolist()), (ds, result.decisions[name]))
    return out, {"result": result, "fields": fields}


def _write_sources(staging: Path, loaded: Mapping[str, tuple[Any, Any]], tokenizer: Any, num_proc: int,
                   fingerprint: dict[str, Any], cleaning: dict[str, Any] | None) -> dict[str, Any]:
    from .cleaning import count_tokens

    from ..callbacks.progress import PhaseBar, datasets_bars_off

    manifest: dict[str, Any] = {"fingerprint": fingerprint, "vocab_size": len(tokenizer), "sources": {}}
    total = sum(len(ds) for ds, _ in loaded.values())
    with datasets_bars_off(), PhaseBar("Tokenizing training sources", total=total) as bar:  # one bar, all sources
        for name, (ds, original) in loaded.items():
            tf = fingerprint["sources"][name]["text_field"]
            # the map output goes to the staging directory (not the `datasets` cache: no second copy of 100 GB,
            # and no stale reuse), then into the store's own layout; the intermediate files are deleted
            work = staging / f".{name}-map"
            work.mkdir()
            tokens = tokenize_documents(ds, tokenizer, tf, num_proc, desc=name,
                                        cache_file_name=str(work / "map.arrow"), bos_id=fingerprint["bos"], bar=bar)
            tokens.save_to_disk(str(staging / name))
            n_docs, n_tokens = len(tokens), count_token_ids(tokens)
            del tokens
            shutil.rmtree(work)
            manifest["sources"][name] = {"dir": name, "documents": n_docs, "tokens": n_tokens}
            logger.info("prepared %s: %d documents, %d tokens", name, n_docs, n_tokens)
            if cleaning is not None:  # the removed documents' tokens, and the kept ones as stored (with BOS/EOS)
                count_tokens(cleaning["result"].report, name, original[0], original[1], tf, tokenizer,
                             kept_tokens=n_tokens)
    if cleaning is not None:
        from ..data_clean import summary_line

        manifest["cleaning"] = cleaning["result"].report.to_dict()
        logger.info(summary_line(manifest["cleaning"]))
    return manifest


def load_tokenizer(cfg: CPTConfig) -> Any:
    """The tokenizer a run of `cfg` trains with (extended first when the config has a `vocab:` block)."""
    if cfg.vocab is not None:
        from .train import build_model

        return build_model(cfg)[1]
    from transformers import AutoTokenizer

    from .models import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision,
                                                  trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"`model.name_or_path`: could not load a tokenizer from {cfg.model.name_or_path!r} "
                                f"({type(e).__name__}); give an existing model directory") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_config(cfg: CPTConfig, tokenizer: Any = None, *, num_proc: int | None = None,
                   overwrite: bool = False, workers: int | None = None, dry_run: bool = False) -> Path | dict:
    """`hf-cpt prepare CONFIG`: prepare the store `data.prepared_dir` of `cfg` (its domain and general training
    splits, with the run's tokenizer and `data.num_proc` processes unless `num_proc` is given), cleaned as
    `data.dedup` / `data.decontaminate` say against the run's held-out sets (the `eval` splits and the
    documents of the `downstream` tasks), hashing in `workers` processes (default: `data.num_proc`).

    Returns:
        the store directory; with `dry_run`, the cleaning report instead (nothing is written; token totals are
        estimated), or None when cleaning is off.
    """
    from .cleaning import clean_train_sources, downstream_texts
    from .data import held_out_texts

    data = cfg.data
    if data.prepared_dir is None and not dry_run:
        raise ValueError("`data.prepared_dir` is not set: add `prepared_dir: path/to/store` under `data:` (CLI: "
                         "--prepared-dir PATH), where the pretokenized store goes")
    check_data_paths(data, store=False)  # every file, row by row, before the tokenizer loads or anything is written
    sources, fields = config_sources(data)
    n = _check_num_proc(num_proc, "num_proc") if num_proc is not None else data.num_proc
    w = _check_num_proc(workers, "workers", "processes that hash documents for cleaning") if workers is not None else n
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    fingerprint = store_fingerprint(sources, tokenizer, fields, field="data", suffix=".train")  # name fields
    decon = data.decontaminate
    extra = downstream_texts(cfg.downstream) if decon is not None and decon.enabled else {}
    held_out = held_out_texts(data, extra)
    if dry_run:
        from ..config import SourceConfig

        loaded = {k: load_split(spec, SourceConfig(train=spec, text_field=fields[k]), f"data.{k}.train")
                  for k, spec in sources.items()}
        return clean_train_sources(data.dedup, data.decontaminate, loaded, fields, held_out, tokenizer, workers=w)[1]
    del fingerprint
    return prepare_sources(sources, tokenizer, data.prepared_dir, text_field=fields, num_proc=n,
                           overwrite=overwrite, field="data.prepared_dir", packing=data.packing,
                           add_bos=data.add_bos, dedup=data.dedup, decontaminate=data.decontaminate,
                           held_out=held_out, workers=w)
