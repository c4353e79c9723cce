"""Loading, tokenizing and packing text corpora with `datasets`, and building the mixed training set."""

from __future__ import annotations

import glob
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import DataConfig, SourceConfig
from ..mixers.core import pack_blocks
from ..mixers.replay import ReplayMixer, ReplayMixerConfig

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


def tokenize_and_pack(ds, tokenizer, text_field: str, block_size: int, desc: str = ""):
    """Tokenize a text dataset and pack it into `block_size` blocks with `input_ids`, `attention_mask`, `labels`.

    Works on map-style and streaming datasets alike (lazily on the latter). Documents are separated by the
    tokenizer's EOS token, the usual pretraining layout.
    """
    import datasets

    sep = tokenizer.eos_token_id
    is_map = isinstance(ds, datasets.Dataset)
    columns = ds.column_names

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch[text_field] if isinstance(t, str) and t.strip()]
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []}

    def group(batch: dict[str, list]) -> dict[str, list]:
        blocks = pack_blocks(batch["input_ids"], block_size, sep)
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks],
                "labels": [list(b) for b in blocks]}

    extra: dict[str, Any] = {"desc": f"Tokenizing {desc}"} if is_map else {}
    ds = ds.map(tokenize, batched=True, remove_columns=columns, **extra)
    if is_map:
        extra["desc"] = f"Packing {desc} into {block_size}-token blocks"
    # 1000 documents per batch: the dropped tail per batch is < 1 block, negligible next to ~1000 documents
    return ds.map(group, batched=True, batch_size=1000, remove_columns=["input_ids"], **extra)


def build_eval_sets(cfg: DataConfig, tokenizer) -> dict[str, Any]:
    """Held-out block sets keyed `domain` / `general`, each capped at `max_eval_blocks`."""
    out = {}
    for name in ("general", "domain"):
        source: SourceConfig | None = getattr(cfg, name)
        if source is None or source.eval is None:
            continue
        ds = load_split(source.eval, source, f"data.{name}.eval")
        blocks = tokenize_and_pack(ds, tokenizer, source.text_field, cfg.block_size, f"{name} held-out")
        if len(blocks) == 0:
            raise ValueError(f"`data.{name}.eval`: the held-out text is shorter than one block "
                             f"(`data.block_size`={cfg.block_size}); add text or lower `data.block_size`")
        if cfg.max_eval_blocks:
            blocks = blocks.select(range(min(cfg.max_eval_blocks, len(blocks))))
        out[name] = blocks
    return out


def build_train_set(cfg: DataConfig, tokenizer, total_blocks: int | None = None) -> ReplayMixer:
    """The training stream: a [`ReplayMixer`] of `domain` and `general` (share `cfg.replay_ratio` of tokens).

    Args:
        cfg: the data settings.
        tokenizer: tokenizes documents on the fly (EOS between documents).
        total_blocks: blocks in the whole run (all processes); places `cfg.replay_stages`.

    Streaming sources (`streaming: true`) are read lazily; the others are loaded as `datasets.Dataset`s and read
    in a seeded random document order per pass.
    """
    r = cfg.replay_ratio if cfg.general is not None else 0.0
    names = ["domain"] + (["general"] if cfg.general is not None and (r > 0 or cfg.replay_stages) else [])
    sources: dict[str, Any] = {}
    for name in names:
        src: SourceConfig = getattr(cfg, name)
        ds = load_split(src.train, src, f"data.{name}.train", streaming=src.streaming)
        if not src.streaming and len(ds) == 0:
            raise ValueError(f"`data.{name}.train`: {src.train!r} holds no documents; point it at your text")
        sources[name] = ds
    ratios = {"domain": 1.0 - r, "general": r} if len(names) == 2 else {"domain": 1.0}
    stages = list(cfg.replay_stages) if len(names) == 2 else []
    if stages and total_blocks is None:
        raise ValueError("`data.replay_stages` needs the run length: pass `total_blocks`")
    mixer_cfg = ReplayMixerConfig(
        ratios=ratios, block_size=cfg.block_size, granularity=cfg.granularity, on_exhausted=cfg.on_exhausted,
        stages=stages, total_blocks=total_blocks if stages else None, seed=cfg.shuffle_seed,
        text_field={n: getattr(cfg, n).text_field for n in names},
    )
    return ReplayMixer(sources, tokenizer, mixer_cfg)


def check_data_paths(cfg: DataConfig) -> None:
    """Resolve every data path of `cfg` and check the held-out splits the monitor needs, without loading data.

    Raises:
        FileNotFoundError / ValueError: naming the field (`data.domain.train`, ...).
    """
    for name in ("domain", "general"):
        source = getattr(cfg, name)
        if source is None:
            continue
        for split in ("train", "eval"):
            spec = getattr(source, split)
            if spec is not None and not spec.startswith("hub:"):
                resolve_data_files(spec, f"data.{name}.{split}")
    for name in ("domain", "general"):
        source = getattr(cfg, name)
        if source is None or source.eval is None:
            raise ValueError(f"`data.{name}.eval` is not set: the forgetting monitor needs a held-out split "
                             f"of the {name} text")
