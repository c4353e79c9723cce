"""Loading, tokenizing and packing text corpora with `datasets`, and building the mixed training set."""

from __future__ import annotations

import codecs
import csv
import glob
import json
import logging
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import SELF, DataConfig, SourceConfig
from ..mixers.core import document_indices, pack_blocks
from ..mixers.packing import bos_for, pack_documents
from ..mixers.prepared import (MANIFEST, STORE_VERSION, PreparedMixer, PreparedStore, document_separator,
                               files_fingerprint, tokenizer_fingerprint)
from ..mixers.replay import ReplayMixer, ReplayMixerConfig
from ..validation import ConfigTypeError

if TYPE_CHECKING:
    from ..callbacks.progress import PhaseBar

logger = logging.getLogger(__name__)

EMBEDDED_CORPORA = {
    "python-docs": "Python 3.11 documentation sources (PSF License 2.0): technical domain text",
    "kjv": "King James Bible, one document per chapter (public domain): general English text",
}
_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet",
             ".csv": "csv"}


def embedded_corpus_path(spec: str) -> Path:
    """Path of an embedded corpus split, `embedded:NAME/SPLIT` (e.g. `embedded:kjv/validation`)."""
    body = spec.split(":", 1)[1]
    name, _, split = body.partition("/")
    split = split or "train"
    if name not in EMBEDDED_CORPORA or split not in ("train", "validation"):
        raise ValueError(
            f"unknown embedded corpus {spec!r}; known: "
            + ", ".join(f"embedded:{n}/train, embedded:{n}/validation" for n in EMBEDDED_CORPORA)
        )
    return Path(str(resources.files("hf_cpt") / "data" / name / f"{split}.jsonl.gz"))


def _builder_for(path: str) -> str:
    stem = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(stem)[1].lower()
    if ext not in _BUILDERS:
        raise ValueError(f"cannot read {path!r}: use .jsonl/.json, .txt, .parquet or .csv (optionally .gz)")
    return _BUILDERS[ext]


def resolve_data_files(spec: str, field: str) -> tuple[str, list[str]]:
    """Resolve a split spec to a `datasets` builder name and a list of files.

    Raises:
        FileNotFoundError: naming `field`, when nothing matches.
    """
    if spec.startswith("embedded:"):
        try:
            path = embedded_corpus_path(spec)
        except ValueError as e:
            raise ValueError(f"`{field}`: {e}") from None
        return "json", [str(path)]
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        files = sorted(
            str(p) for p in Path(expanded).rglob("*") if p.is_file() and _try_builder(str(p)) is not None
        )
    elif any(c in expanded for c in "*?["):
        files = sorted(glob.glob(expanded, recursive=True))
    else:
        files = [expanded] if os.path.isfile(expanded) else []
    if not files:
        raise FileNotFoundError(f"`{field}`: no data file found at {spec!r}; check the path (globs are allowed)")
    builders = {_try_builder(f) for f in files}
    if None in builders or len(builders) > 1:
        raise ValueError(f"`{field}`: {spec!r} must match files of one format (.jsonl/.txt/.parquet/.csv), got "
                         + ", ".join(sorted({os.path.basename(f) for f in files})[:5]))
    return builders.pop(), files


def _try_builder(path: str) -> str | None:
    try:
        return _builder_for(path)
    except ValueError:
        return None


def load_split(spec: str, source: SourceConfig, field: str, streaming: bool = False):
    """Load one split as a `datasets.Dataset` (or `IterableDataset` when `streaming`) with a text column."""
    import datasets

    if spec.startswith("hub:"):
        repo, _, split = spec[4:].partition(":")
        ds = datasets.load_dataset(repo, split=split or "train", streaming=streaming)
    else:
        builder, files = resolve_data_files(spec, field)
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming)
        except datasets.exceptions.DatasetGenerationError as e:  # e.g. an empty file: no schema to infer
            raise ValueError(f"`{field}`: {spec!r} could not be read as {builder} ({e.__cause__ or e}); check "
                             "that it holds documents") from None
    columns = ds.column_names
    if columns is not None and source.text_field not in columns:
        parent = field.rsplit(".", 1)[0]
        raise ValueError(
            f"`{parent}.text_field`: column {source.text_field!r} not found in {spec!r} (columns: {columns}); "
            "set `text_field` to the column holding the text"
        )
    return ds


def tokenize_and_pack(ds, tokenizer, text_field: str, block_size: int, desc: str = "", packing: str = "documents",
                      add_bos: str = "auto", bar: PhaseBar | None = None):
    """Tokenize a text dataset and pack it into `block_size` blocks.

    `packing="documents"`: `input_ids`, `position_ids` (restarting at every document, which starts with BOS when
    [`bos_for`] says so) and `labels` (-100 where a document starts), the layout the mixers train on;
    `packing="concat"`: `input_ids`, an all-ones `attention_mask`, `labels`. Works on map-style and streaming
    datasets alike (lazily on the latter). Each document ends with the tokenizer's EOS token. `bar`: the
    [`PhaseBar`] of the phase, counting the documents and tokens (map-style datasets; `datasets`' own bars are
    the caller's to turn off, see [`datasets_bars_off`]).
    """
    import datasets

    sep = document_separator(tokenizer)  # EOS, else SEP: as the training mixers
    bos = bos_for(tokenizer, add_bos) if packing == "documents" else None
    is_map = isinstance(ds, datasets.Dataset)
    columns = ds.column_names

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        # past the rows checked up front (`check_data_rows`): a non-string text is refused, never dropped
        texts = [batch[text_field][i] for i in document_indices(batch[text_field], desc or "the corpus")]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        if bar is not None:
            bar.update(len(batch[text_field]), sum(len(x) for x in ids))
        return {"input_ids": ids}

    def group(batch: dict[str, list]) -> dict[str, list]:
        if packing == "documents":
            packed = pack_documents(batch["input_ids"], block_size, bos, sep)
            return {k: [b[k] for b in packed] for k in ("input_ids", "position_ids", "labels")}
        blocks = pack_blocks(batch["input_ids"], block_size, sep)
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks],
                "labels": [list(b) for b in blocks]}

    extra: dict[str, Any] = {"desc": f"Tokenizing {desc}"} if is_map else {}
    counted, documents = (bar.documents, len(ds)) if bar is not None and is_map else (0, 0)
    ds = ds.map(tokenize, batched=True, remove_columns=columns, **extra)
    if bar is not None and bar.documents - counted < documents:  # read from `datasets`' cache: count it now
        bar.update(documents - (bar.documents - counted), count_token_ids(ds))
    if is_map:
        extra["desc"] = f"Packing {desc} into {block_size}-token blocks"
    # 1000 documents per batch: the dropped tail per batch is < 1 block, negligible next to ~1000 documents
    return ds.map(group, batched=True, batch_size=1000, remove_columns=["input_ids"], **extra)



def count_token_ids(ds: Any) -> int:
    """Token ids in the `input_ids` column of a map-style dataset, from its Arrow offsets (no row is read)."""
    column = ds.data.column("input_ids")
    return int(sum(int(c.offsets[-1].as_py()) - int(c.offsets[0].as_py()) for c in column.chunks))


# --- data cleaning (issue 34): the held-out texts the training text is decontaminated against ---
def held_out_texts(data: DataConfig, extra: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """`{set name: texts}` of every set the run evaluates on: `domain` / `general` (their `eval` splits), the named
    `eval_sets` and
    `extra` (e.g. `general_self`, lm-eval tasks from [`downstream_texts`]), only when decontamination is on."""
    from .cleaning import iter_texts

    if data.decontaminate is None or not data.decontaminate.enabled:
        return {}
    out: dict[str, list[str]] = {}
    files = data.held_out_files()
    for name in sorted(files, key=lambda n: n != "domain"):  # `domain` first: a text in both is reported by it
        spec, where = files[name]
        out[name] = list(iter_texts(load_split(spec.path, spec, where), spec.text_field))
    for name, texts in (extra or {}).items():
        out[name] = [t for t in iter_texts(texts, "text")] if not isinstance(texts, list) else list(texts)
    return out
# --- end data cleaning ---


def build_eval_sets(cfg: DataConfig, tokenizer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Held-out block sets by name: `general` / `domain` (their `eval` splits), every named `eval_sets` entry, plus
    `extra` text datasets (e.g. `general_self`), each capped at `max_eval_blocks`."""
    from ..callbacks.progress import PhaseBar, datasets_bars_off

    texts: dict[str, tuple[Any, str, str]] = {}
    with datasets_bars_off():  # small sets: no `datasets` bar per set while they load either
        for name, (spec, where) in cfg.held_out_files().items():
            texts[name] = (load_split(spec.path, spec, where), spec.text_field, where)
    for name, ds in (extra or {}).items():
        texts[name] = (ds, "text", "data.synth.eval_tokens")
    out = {}
    total = sum(len(ds) for ds, _, _ in texts.values())
    with datasets_bars_off(), PhaseBar("Tokenizing held-out sets", total=total) as bar:  # one bar, all sets
        for name, (ds, text_field, where) in texts.items():
            blocks = tokenize_and_pack(ds, tokenizer, text_field, cfg.block_size, f"{name} held-out", cfg.packing,
                                       cfg.add_bos, bar=bar)
            if len(blocks) == 0:
                raise ValueError(f"`{where}`: the held-out text is shorter than one block "
                                 f"(`data.block_size`={cfg.block_size}); add text or lower `data.block_size`")
            if cfg.max_eval_blocks:
                blocks = blocks.select(range(min(cfg.max_eval_blocks, len(blocks))))
            out[name] = blocks
    return out


def build_train_set(cfg: DataConfig, tokenizer, total_blocks: int | None = None,
                    sources: dict[str, Any] | None = None, emit_sources: bool = False,
                    held_out: Mapping[str, Any] | None = None) -> ReplayMixer | PreparedMixer:
    """The training stream: a [`ReplayMixer`] of `domain` and `general` (share `cfg.replay_ratio` of tokens), or
    with `cfg.prepared_dir` a [`PreparedMixer`] giving the same blocks from the pretokenized store (checked
    against this config's files and `tokenizer` first; refused when stale).

    Args:
        cfg: the data settings.
        tokenizer: tokenizes documents on the fly (EOS between documents).
        total_blocks: blocks in the whole run (all processes); places `cfg.replay_stages`.
        sources: text datasets to use instead of loading a source's `train` split (e.g. self-synthesised
            `general` text when `data.general.train` is `self`).
        emit_sources: tag blocks with their index and each token with its source (distillation replay).
        held_out: held-out sets besides `cfg`'s own `eval` splits that the training text is decontaminated
            against (`{name: texts}`: `general_self`, lm-eval task documents; see `hf_cpt.recipe.cleaning`).

    Streaming sources (`streaming: true`) are read lazily; the others are loaded as `datasets.Dataset`s and read
    in a seeded random document order per pass.
    Before mixing, the sources are deduplicated and decontaminated as `cfg.dedup` / `cfg.decontaminate` say (the
    token shares are shares of the cleaned text); the report is the mixer's `cleaning` attribute.
    """
    r = cfg.replay_ratio if cfg.general is not None else 0.0
    names = ["domain"] + (["general"] if cfg.general is not None and (r > 0 or cfg.replay_stages) else [])
    given = sources or {}
    if cfg.prepared_dir is not None and not given:
        return _prepared_train_set(cfg, tokenizer, names, total_blocks, emit_sources, held_out)
    loaded: dict[str, Any] = {}
    for name in names:
        src: SourceConfig = getattr(cfg, name)
        if name in given:
            loaded[name] = given[name]
            continue
        if src.train == SELF:
            raise ValueError(f"`data.{name}.train` is `self`: pass the synthesised text in `sources` (run_cpt does)")
        ds = load_split(src.train, src, f"data.{name}.train", streaming=src.streaming)
        if not src.streaming and len(ds) == 0:
            raise ValueError(f"`data.{name}.train`: {src.train!r} holds no documents; point it at your text")
        loaded[name] = ds
    # --- data cleaning (issue 34): dedup + decontamination of the loaded sources, before mixing ---
    from .cleaning import clean_train_sources

    fields = {n: "text" if n in given else getattr(cfg, n).text_field for n in names}
    loaded, cleaning = clean_train_sources(cfg.dedup, cfg.decontaminate, loaded, fields,
                                           held_out_texts(cfg, held_out), tokenizer)
    # --- end data cleaning ---
    ratios = {"domain": 1.0 - r, "general": r} if len(names) == 2 else {"domain": 1.0}
    stages = list(cfg.replay_stages) if len(names) == 2 else []
    if stages and total_blocks is None:
        raise ValueError("`data.replay_stages` needs the run length: pass `total_blocks`")
    mixer_cfg = ReplayMixerConfig(
        ratios=ratios, block_size=cfg.block_size, packing=cfg.packing, add_bos=cfg.add_bos,
        granularity=cfg.granularity, on_exhausted=cfg.on_exhausted, stages=stages,
        total_blocks=total_blocks if stages else None, seed=cfg.shuffle_seed,
        text_field={n: "text" if n in given else getattr(cfg, n).text_field for n in names},
        emit_sources=emit_sources,
    )
    mixer = ReplayMixer(loaded, tokenizer, mixer_cfg)
    mixer.cleaning = cleaning  # data cleaning (issue 34): the report, read into metrics.json and the card
    return mixer


def _prepared_train_set(cfg: DataConfig, tokenizer, names: list[str], total_blocks: int | None,
                        emit_sources: bool, held_out: Mapping[str, Any] | None = None) -> PreparedMixer:
    from accelerate import PartialState

    if total_blocks is None:
        raise ValueError("`data.prepared_dir` needs the run length (blocks in the whole run): pass `total_blocks`")
    r = cfg.replay_ratio if len(names) == 2 else 0.0
    mixer_cfg = ReplayMixerConfig(
        ratios={"domain": 1.0 - r, "general": r} if len(names) == 2 else {"domain": 1.0},
        block_size=cfg.block_size, packing=cfg.packing, add_bos=cfg.add_bos, granularity=cfg.granularity,
        on_exhausted=cfg.on_exhausted, stages=list(cfg.replay_stages) if len(names) == 2 else [],
        total_blocks=total_blocks if cfg.replay_stages and len(names) == 2 else None, seed=cfg.shuffle_seed,
        emit_sources=emit_sources)
    store = open_config_store(cfg, tokenizer, held_out)
    with PartialState().main_process_first():  # the main process plans (and caches) the schedule, the others read it
        mixer = PreparedMixer(store, mixer_cfg, num_blocks=total_blocks)
    mixer.cleaning = store.manifest.get("cleaning")  # data cleaning (issue 34): what `hf-cpt prepare` removed
    if mixer.cleaning:
        from ..data_clean import summary_line

        logger.info("%s (prepared store %s)", summary_line(mixer.cleaning), store.path)
    return mixer


def check_data_paths(cfg: DataConfig, store: bool = True) -> None:
    """Resolve every data path of `cfg`, check each local file row by row ([`check_data_rows`]) and, with `store`,
    that `prepared_dir` holds a store, without loading data or a model.

    Raises:
        FileNotFoundError / ValueError: naming the field (`data.domain.train`, ...).
    """
    for name in ("domain", "general"):
        source = getattr(cfg, name)
        if source is None:
            continue
        for split in ("train", "eval"):
            spec = getattr(source, split)
            if spec is not None and spec.startswith("hub:"):
                check_hub_dataset(spec, f"data.{name}.{split}")
            elif spec is not None and spec != SELF:
                builder, files = resolve_data_files(spec, f"data.{name}.{split}")
                if not spec.startswith("embedded:"):
                    budget = [_SCANNED_BYTES]  # what is left of the split's row-by-row scan
                    for i, path in enumerate(files):
                        check_data_file(path, builder, f"data.{name}.{split}", f"data.{name}.text_field",
                                        source.text_field, peek=i < _PEEKED_FILES)
                        if budget[0] > 0:
                            budget[0] -= check_data_rows(path, builder, f"data.{name}.{split}",
                                                         f"data.{name}.text_field", source.text_field, budget[0])
    for name, spec in cfg.eval_sets.items():
        where = f"data.eval_sets.{name}"
        if spec.path.startswith("hub:"):
            check_hub_dataset(spec.path, f"{where}.path")
        else:
            builder, files = resolve_data_files(spec.path, f"{where}.path")
            if not spec.path.startswith("embedded:"):
                budget = [_SCANNED_BYTES]
                for i, path in enumerate(files):
                    check_data_file(path, builder, f"{where}.path", f"{where}.text_field", spec.text_field,
                                    peek=i < _PEEKED_FILES)
                    if budget[0] > 0:
                        budget[0] -= check_data_rows(path, builder, f"{where}.path", f"{where}.text_field",
                                                     spec.text_field, budget[0])
    if store and cfg.prepared_dir is not None and not (Path(cfg.prepared_dir).expanduser() / MANIFEST).is_file():
        PreparedStore(cfg.prepared_dir, field="data.prepared_dir")  # raises: no store there, run `hf-cpt prepare`


_PEEKED_FILES = 100  # files of a split whose first bytes are read up front (all are checked for emptiness)
_PEEK_BYTES = 1 << 16
# bytes of a split read row by row before the model loads (a few seconds of JSON parsing); rows past it are
# checked by type when tokenized (`tokenize_and_pack`), without a line number
_SCANNED_BYTES = 256 << 20


def check_hub_dataset(spec: str, field: str) -> None:
    """Refuse, naming `field`, a `hub:ID[:SPLIT]` dataset that cannot be reached or found (offline and not in the
    cache, a wrong id), before the model loads; the split itself is checked when it is loaded."""
    import datasets

    repo = spec[4:].partition(":")[0]
    try:
        datasets.load_dataset_builder(repo)
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError, ValueError) as e:
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = ("it is not in the local cache and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set; load it once online "
               "or point at local files" if offline else
               f"{type(e).__name__}: {' '.join(str(e).split())[:200]}; check the id and your connection")
        raise ValueError(f"`{field}`: the Hub dataset {repo!r} cannot be loaded ({why})") from None


def check_data_rows(path: str, builder: str, field: str, text_field_name: str, text_field: str,
                    budget: int = _SCANNED_BYTES) -> int:
    """Read a data file row by row (up to `budget` bytes) and refuse, naming the file, the line and the field, a row
    that is not UTF-8, not JSON, not an object, lacks the text column, holds a non-string text, or a CSV with a
    header and no rows; also a damaged gzip stream. Returns the bytes read. Parquet is checked by its schema
    (`_check_parquet`): a text column that is not of string type."""
    import gzip
    import zlib

    name = os.path.basename(path)
    if builder == "parquet":
        return 0
    opener = gzip.open if path.endswith(".gz") else open
    seen, texts, lineno = 0, 0, 0
    try:
        with opener(path, "rb") as fh:
            if builder == "json" and not path.endswith((".jsonl", ".jsonl.gz")):
                head = fh.read(_PEEK_BYTES).lstrip(b"\xef\xbb\xbf \t\r\n")
                if head.startswith(b"["):  # one JSON array of records
                    return _check_json_array(head + fh.read(), name, field, text_field_name, text_field)
                fh.seek(0)
            reader = _rows(fh, name, field)
            header: list[str] | None = None
            for lineno, line in reader:
                seen += len(line)
                if seen > budget:
                    return seen
                if builder == "text":
                    texts += bool(line.strip())
                elif builder == "csv":
                    if header is None:
                        header = next(csv.reader([line]), None) if line.strip() else None
                    elif line.strip():
                        texts += 1
                elif line.strip():
                    texts += _check_json_row(line, lineno, name, field, text_field_name, text_field)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"`{field}`: {name!r} is damaged after line {lineno} ({e}); the file is truncated or not "
                         f"{'gzip' if path.endswith('.gz') else builder}: create it again") from None
    if builder == "csv" and header is not None and not texts:
        raise ValueError(f"`{field}`: {name!r} holds a header ({', '.join(header[:8])}) and no rows; point it at "
                         "a file holding documents")
    if builder == "json" and lineno and not texts:
        raise ValueError(f"`{text_field_name}`: every {text_field!r} in {name!r} is blank; point it at a file "
                         "holding documents")
    return seen


def _rows(fh: Any, name: str, field: str):
    """`(line number, text)` of a binary file's lines, refusing a line that is not UTF-8."""
    for lineno, raw in enumerate(fh, 1):
        try:
            yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"`{field}`: {name!r} line {lineno} is not UTF-8 text (byte {e.start} of the line); "
                             "re-encode the file as UTF-8") from None


def _check_json_row(line: str, lineno: int, name: str, field: str, text_field_name: str, text_field: str) -> int:
    """1 when the JSON Lines row holds a non-blank text, 0 for a blank one; raises for a malformed row."""
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ValueError(f"`{field}`: {name!r} line {lineno} is not valid JSON ({getattr(e, 'msg', e)}); JSON Lines "
                         "files hold one object per line") from None
    return _check_record(record, f"line {lineno}", name, field, text_field_name, text_field)


def _check_record(record: Any, where: str, name: str, field: str, text_field_name: str, text_field: str) -> int:
    if not isinstance(record, dict):
        raise ValueError(f"`{field}`: {name!r} {where} is a JSON {type(record).__name__}, not an object with a "
                         f"{text_field!r} key")
    if text_field not in record:
        raise ValueError(f"`{text_field_name}`: {name!r} {where} has no {text_field!r} key (keys: "
                         f"{list(record)[:8]}); every row needs the text column")
    value = record[text_field]
    if not isinstance(value, str):
        shown = "null" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"
        raise ValueError(f"`{text_field_name}`: {name!r} {where}: {text_field!r} is {shown}, not a string; every "
                         "row's text must be a string (fix or drop that row)")
    return int(bool(value.strip()))


def _check_json_array(content: bytes, name: str, field: str, text_field_name: str, text_field: str) -> int:
    try:
        records = json.loads(content.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"`{field}`: {name!r} is not UTF-8 text (byte {e.start}); re-encode it as UTF-8") from None
    except ValueError as e:
        raise ValueError(f"`{field}`: {name!r} is not valid JSON ({e}); fix it, or write one object per line as "
                         ".jsonl") from None
    texts = sum(_check_record(r, f"item {i}", name, field, text_field_name, text_field) for i, r in enumerate(records))
    if not texts:
        raise ValueError(f"`{text_field_name}`: every {text_field!r} in {name!r} is blank; point it at a file "
                         "holding documents")
    return len(content)


def check_data_file(path: str, builder: str, field: str, text_field_name: str, text_field: str,
                    peek: bool = True) -> None:
    """Refuse, naming `field`, a data file that is empty, binary, not UTF-8, or lacks the text column, reading
    only its first bytes, so a bad file fails in a second instead of inside `datasets` after the model loads."""
    import gzip
    import zlib

    name = os.path.basename(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"`{field}`: {name!r} is empty; point it at a file holding documents")
    if not peek:
        return
    if builder == "parquet":
        _check_parquet(path, field, text_field_name, text_field)
        return
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            head = fh.read(_PEEK_BYTES)
    except (OSError, EOFError, zlib.error) as e:
        what = "a damaged or truncated gzip file" if path.endswith(".gz") else "unreadable"
        raise ValueError(f"`{field}`: {name!r} is {what} ({e}); create it again as {builder}"
                         + (" compressed with gzip" if path.endswith(".gz") else "")) from None
    if b"\0" in head:
        raise ValueError(f"`{field}`: {name!r} is binary (NUL bytes), not {builder} text; point it at a text corpus")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _PEEK_BYTES)
    except UnicodeDecodeError as e:
        raise ValueError(f"`{field}`: {name!r} is not UTF-8 text (byte {e.start}); re-encode it as UTF-8") from None
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise ValueError(f"`{field}`: {name!r} holds only whitespace; point it at a file holding documents")
    first = next(line for line in text.splitlines(keepends=True) if line.strip())
    whole_line = first.endswith(("\n", "\r")) or len(head) < _PEEK_BYTES  # a long first document may not fit
    if builder == "text" and text_field != "text":
        raise ValueError(f"`{text_field_name}`: plain-text files have one column, `text`, got {text_field!r}; set "
                         "`text_field: text`")
    if builder == "csv" and whole_line:
        header = next(csv.reader([first.rstrip("\r\n")]))
        if text_field not in header:
            raise ValueError(f"`{text_field_name}`: column {text_field!r} not found in {name!r} (columns: "
                             f"{header[:8]}); set `text_field` to the column holding the text")
    if builder == "json" and whole_line and path.endswith((".jsonl", ".jsonl.gz")):
        try:
            record = json.loads(first)
        except ValueError:
            raise ValueError(f"`{field}`: the first line of {name!r} is not a JSON object; JSON Lines files hold "
                             "one object per line") from None
        if isinstance(record, dict) and text_field not in record:
            raise ValueError(f"`{text_field_name}`: column {text_field!r} not found in {name!r} (columns: "
                             f"{list(record)[:8]}); set `text_field` to the column holding the text")


def _check_parquet(path: str, field: str, text_field_name: str, text_field: str) -> None:
    import pyarrow.parquet as pq

    name = os.path.basename(path)
    try:
        columns = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
        raise ValueError(f"`{field}`: {name!r} is not a readable parquet file ({type(e).__name__}); check the "
                         "path") from None
    if text_field not in columns:
        raise ValueError(f"`{text_field_name}`: column {text_field!r} not found in {name!r} (columns: "
                         f"{columns[:8]}); set `text_field` to the column holding the text")
    import pyarrow as pa

    kind = pq.read_schema(path).field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"`{text_field_name}`: column {text_field!r} of {name!r} holds {kind}, not strings; "
                         "store the text as a string column")


def synthesize_general(cfg: DataConfig, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Self-synthesised general text as `datasets.Dataset`s: `{"train": ...}` when `general.train` is `self`,
    `{"eval": ...}` when `synth.eval_tokens` > 0 (disjoint sampling seeds). Sampled from `model` (the base, before
    any training) and cached on disk; under several processes the main one generates and the others read its
    cache, so the text is generated once per run."""
    import datasets
    from accelerate import PartialState

    from ..synth import load_or_synthesize, split_seeds

    synth = cfg.synth
    if synth is None:
        return {}
    train_seed, eval_seed = split_seeds(synth.seed)
    wanted = {}
    if cfg.general is not None and cfg.general.train == SELF and synth.train_tokens:
        wanted["train"] = (synth.train_tokens, train_seed)
    if synth.eval_tokens:
        wanted["eval"] = (synth.eval_tokens, eval_seed)
    out = {}
    with PartialState().main_process_first():  # the main process fills the cache; the others read it
        for split, (n_tokens, seed) in wanted.items():
            docs = load_or_synthesize(model, tokenizer, synth, n_tokens, seed)
            out[split] = datasets.Dataset.from_dict({"text": docs})
    return out


def store_fingerprint(sources: Mapping[str, str], tokenizer: Any, text_field: str | Mapping[str, str] = "text",
                      field: str = "sources", suffix: str = "", packing: str = "documents",
                      add_bos: str = "auto", cleaning: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a store prepared from `sources` with `tokenizer` must match: tokenizer hash, per source its path
    spec, text column and files (path, size, mtime), the store format version and the document-start token
    (`bos`: [`bos_for`] under `packing="documents"`, else None).

    Raises:
        FileNotFoundError / ValueError: a source path that resolves to no readable files, naming
        `<field>.<name><suffix>` (e.g. `data.domain.train`).
    """
    bos = bos_for(tokenizer, add_bos) if packing == "documents" else None
    out: dict[str, Any] = {"version": STORE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer), "bos": bos,
                           "sources": {}}
    for name, spec in sources.items():
        where = f"{field}.{name}{suffix}"
        if not isinstance(spec, str):
            raise ConfigTypeError(f"`{where}` must be a data path (file, directory, glob or embedded:NAME/SPLIT), "
                                  f"got {type(spec).__name__}")
        if spec.startswith("hub:") or spec == SELF:
            raise ValueError(f"`{where}`: {spec!r} cannot be prepared (only local files and embedded "
                             "corpora); leave `data.prepared_dir` unset to read it on the fly")
        _, files = resolve_data_files(spec, where)
        tf = text_field.get(name, "text") if isinstance(text_field, Mapping) else text_field
        out["sources"][name] = {"spec": spec, "text_field": tf, "files": files_fingerprint(files)}
    out["cleaning"] = dict(cleaning) if cleaning is not None else {"dedup": None, "decontaminate": None, "held_out": {}}
    return out


def config_sources(data: DataConfig) -> tuple[dict[str, str], dict[str, str]]:
    """The training sources of a config that a store holds (`domain`, and `general` when configured) and their
    text columns."""
    sources, fields = {"domain": data.domain.train}, {"domain": data.domain.text_field}
    if data.general is not None:
        sources["general"] = data.general.train
        fields["general"] = data.general.text_field
    return sources, fields


def open_config_store(data: DataConfig, tokenizer: Any, held_out: Mapping[str, Any] | None = None) -> PreparedStore:
    """The store `data.prepared_dir` names, checked against the config's sources, `tokenizer` and cleaning
    (`data.dedup`, `data.decontaminate` against the `eval` splits and the extra `held_out` sets).

    Raises:
        FileNotFoundError: no store there (run `hf-cpt prepare CONFIG`). ValueError: stale, truncated or damaged.
    """
    sources, fields = config_sources(data)
    from .cleaning import cleaning_fingerprint

    cleaning = cleaning_fingerprint(data.dedup, data.decontaminate, held_out_texts(data, held_out))
    expected = store_fingerprint(sources, tokenizer, fields, field="data", suffix=".train", packing=data.packing,
                                 add_bos=data.add_bos, cleaning=cleaning)
    return PreparedStore(data.prepared_dir, expected, field="data.prepared_dir")
