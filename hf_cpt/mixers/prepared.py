"""Mixing from a pretokenized store: block *i* of the [`ReplayMixer`] stream computed from *i* alone.

A prepared store (written by `hf_cpt.recipe.prepare_sources` / `hf-cpt prepare`) holds every source tokenized
once, one Arrow row per document (its token ids followed by EOS, after BOS when the store is prepared for
`packing: documents` with a tokenizer that starts documents with one; empty for a blank document, so row numbers
stay the document numbers the on-the-fly mixer shuffles). [`PreparedMixer`] reads it through Arrow's own list layout
(the flat `int32` value buffer and the row offsets, memory-mapped, zero-copy), so no tokenizer runs while training.

Why the blocks are the on-the-fly mixer's blocks: a source read in passes is one endless token stream (pass *p*
is the documents in the seeded order `permutation([seed, source, p])`, each followed by EOS), and the mix is the
credit allocation of [`allocate_shares`] run block by block. [`build_mix_schedule`] runs that allocation once
(no tokens: a few microseconds per block, once per job, cached next to the store) and records, per block, where
in each source stream it starts and how many tokens it takes. Building block *i* is then two array lookups and a
copy of `block_size` tokens, the same work whatever *i* is (the analogue of Megatron-LM's precomputed blending
indices):

- a rank builds only its own blocks, dataloader workers fetch disjoint blocks by index, and
- resume is a seek: the next block is `start`, nothing is replayed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..registry import Technique, names
from .core import RatioStage, allocate_shares, check_mixer_state, ratios_at
from .packing import make_block
from .replay import ReplayMixerConfig

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)

MANIFEST = "hf_cpt_prepared.json"  # written last into the staging directory: its presence marks a complete store
STORE_VERSION = 2  # 2: rows start with the document-start token (BOS) when prepared for `packing: documents`
_SCHEDULES = "schedules"
_PASS_CACHE = 4  # per-pass document orders kept per source (a block touches at most two consecutive passes)


# --- fingerprints ---------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the token ids: the serialized fast tokenizer (normaliser, pre-tokenizer,
    model, added tokens), or for a slow one its vocabulary and special tokens, plus the EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # without the truncation / padding state, which a call like `tokenizer(x, truncation=True)` leaves behind
        # on the shared backend and the next plain call resets: it is no property of the tokenizer
        body = backend.to_str()
        if backend.truncation is not None or backend.padding is not None:
            from tokenizers import Tokenizer

            plain = Tokenizer.from_str(body)
            plain.no_truncation()
            plain.no_padding()
            body = plain.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items())) + repr(getattr(tokenizer, "all_special_tokens", []))
    body += f"|{type(tokenizer).__name__}|eos={document_separator(tokenizer)}"
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def files_fingerprint(files: Sequence[str]) -> list[list[Any]]:
    """`[path, size, mtime_ns]` per file: a changed, added or removed file changes it (contents are not hashed,
    which would mean reading 100 GB to open a store)."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


def document_separator(tokenizer: Any) -> int | None:
    """The id that ends every document: EOS, else SEP (as the on-the-fly mixer does)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def describe_difference(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """A short phrase naming what differs between two store fingerprints, or None when they match."""
    if stored.get("version") != expected.get("version"):
        return f"store format {stored.get('version')!r}, this hf-cpt reads {expected.get('version')!r}"
    if stored.get("tokenizer") != expected.get("tokenizer"):
        return "another tokenizer"
    old, new = stored.get("sources", {}), expected.get("sources", {})
    for name in new:
        if name not in old:
            return f"no source {name!r} (it holds {sorted(old)})"
        for key in ("spec", "text_field", "files"):
            if old[name].get(key) != new[name].get(key):
                what = {"spec": "another data path", "text_field": "another text column",
                        "files": "other or changed files"}[key]
                return f"{what} for source {name!r}"
    if "cleaning" in expected and stored.get("cleaning") != expected["cleaning"]:  # data cleaning (issue 34)
        return "other cleaning settings or held-out sets (`data.dedup`, `data.decontaminate`, the `eval` splits, " \
               "`downstream` tasks)"
    for key in expected:
        if key not in ("version", "tokenizer", "sources") and stored.get(key) != expected[key]:
            return f"another `{key}` ({stored.get(key)!r}, now {expected[key]!r})"
    return None


# --- the store ----------------------------------------------------------------------------------------------
class PreparedSource:
    """One tokenized source: document lengths, and the Arrow buffers to copy token ranges out of."""

    def __init__(self, name: str, dataset: Any, n_docs: int, n_tokens: int, field: str) -> None:
        column = dataset.data.column("input_ids")
        self.name = name
        self._values: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        lengths = []
        for chunk in column.chunks:
            offsets = chunk.offsets.to_numpy()
            self._offsets.append(offsets.astype(np.int64, copy=False))
            self._values.append(chunk.values.to_numpy(zero_copy_only=True))
            lengths.append(np.diff(offsets))
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        self._chunk_start = np.cumsum([0] + [len(o) - 1 for o in self._offsets])
        self.n_docs, self.pass_tokens = len(self.lengths), int(self.lengths.sum())
        if self.n_docs != n_docs or self.pass_tokens != n_tokens:
            raise ValueError(f"`{field}`: source {name!r} in the store has {self.n_docs} documents / "
                             f"{self.pass_tokens} tokens, its manifest says {n_docs} / {n_tokens}: the store is "
                             "truncated or damaged; prepare it again (`hf-cpt prepare CONFIG --overwrite`)")

    def doc_tokens(self, doc: int, a: int, b: int) -> np.ndarray:
        """Tokens `[a, b)` of document `doc` (a view into the memory-mapped store)."""
        c = int(np.searchsorted(self._chunk_start, doc, side="right")) - 1
        base = self._offsets[c][doc - self._chunk_start[c]]
        return self._values[c][base + a:base + b]


class PreparedStore:
    """A pretokenized store opened read-only (memory-mapped): `sources[name]` is a [`PreparedSource`].

    Args:
        path: the store directory.
        expected: the fingerprint the caller needs (tokenizer, source files, settings); a store written with
            anything else is refused, naming what differs.
        field: how error messages name the setting that points here (e.g. `data.prepared_dir`).

    Raises:
        FileNotFoundError: no complete store at `path`. ValueError: stale (fingerprint differs), truncated or
        damaged store.
    """

    def __init__(self, path: str | os.PathLike, expected: Mapping[str, Any] | None = None,
                 field: str = "prepared_dir") -> None:
        import datasets

        self.path, self.field = Path(path).expanduser(), field
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            what = "does not exist" if not self.path.exists() else f"has no {MANIFEST} (not a complete store)"
            raise FileNotFoundError(f"`{field}`: {str(self.path)!r} {what}; write it with `hf-cpt prepare CONFIG` "
                                    "(or `prepare_sources`)")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            sources = self.manifest["sources"]
            fingerprint = self.manifest["fingerprint"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"`{field}`: {MANIFEST} in {str(self.path)!r} is damaged ({e}); prepare the store "
                             "again (`hf-cpt prepare CONFIG --overwrite`)") from None
        if expected is not None:
            why = describe_difference(fingerprint, expected)
            if why is not None:
                raise ValueError(f"`{field}`: the store at {str(self.path)!r} was prepared with {why}; prepare it "
                                 "again (`hf-cpt prepare CONFIG --overwrite`) or point `prepared_dir` elsewhere")
        self.fingerprint = fingerprint
        if fingerprint.get("version") != STORE_VERSION:
            raise ValueError(f"`{field}`: the store at {str(self.path)!r} has format {fingerprint.get('version')!r}, "
                             f"this hf-cpt reads format {STORE_VERSION} (document-aware packing); prepare it again "
                             "(`hf-cpt prepare CONFIG --overwrite`)")
        self.bos = fingerprint.get("bos")
        self.vocab_size = int(self.manifest.get("vocab_size", 0))
        self.sources: dict[str, PreparedSource] = {}
        for name, info in sources.items():
            try:
                ds = datasets.load_from_disk(str(self.path / info["dir"]))
            except Exception as e:  # pyarrow/datasets raise several error types for a cut or missing file
                raise ValueError(f"`{field}`: source {name!r} of the store at {str(self.path)!r} cannot be read "
                                 f"({type(e).__name__}: {str(e)[:120]}); the store is truncated or damaged: prepare "
                                 "it again (`hf-cpt prepare CONFIG --overwrite`)") from None
            self.sources[name] = PreparedSource(name, ds, int(info["documents"]), int(info["tokens"]), field)


# --- the schedule -----------------------------------------------------------------------------------------------
def build_mix_schedule(ratios: Mapping[str, float], num_blocks: int, pass_tokens: Sequence[int], *,
                       block_size: int, granularity: str = "block", on_exhausted: str = "cycle",
                       stages: Sequence[RatioStage] = (), total_blocks: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Where each of the first `num_blocks` blocks reads each source: the [`ReplayMixer`] allocation, run ahead.

    Args:
        ratios: shares per source (order = source index).
        num_blocks: blocks to plan.
        pass_tokens: tokens in one pass over each source (documents plus their EOS).
        block_size / granularity / on_exhausted / stages / total_blocks: as in [`ReplayMixerConfig`].

    Returns:
        `(starts, taken)`: `starts[i, k]` is the position in source *k*'s endless stream (pass *p* covers
        `[p * pass_tokens[k], (p + 1) * pass_tokens[k])`) where block *i* starts reading it; `taken[i, k]` the
        tokens source *k* gave to blocks `0..i-1` (`num_blocks + 1` rows), so block *i* takes
        `taken[i + 1, k] - taken[i, k]` tokens from it.

    With `on_exhausted="stop"` a block that would read past the end of a source's pass starts the next mix pass
    instead: every source moves to its next (reshuffled) pass and the credits restart, as the on-the-fly mixer does.
    """
    names = list(ratios)
    k_src = len(names)
    if len(pass_tokens) != k_src:
        raise ValueError(f"`pass_tokens` needs one count per source ({k_src}), got {len(pass_tokens)}")
    amount, unit = (1, block_size) if granularity == "block" else (block_size, 1)
    starts = np.zeros((num_blocks, k_src), np.int64)
    taken = np.zeros((num_blocks + 1, k_src), np.int64)
    credits: dict[str, float] = {}
    pos = [0] * k_src
    mix_pass = 0
    total = [0] * k_src

    def plan(block: int, credits: Mapping[str, float]) -> tuple[list[int], dict[str, float]]:
        alloc, new = allocate_shares(credits, ratios_at(block, ratios, stages, total_blocks), amount)
        return [alloc[n] * unit for n in names], new

    for b in range(num_blocks):
        counts, new_credits = plan(b, credits)
        if on_exhausted == "stop":
            over = [k for k in range(k_src) if counts[k] and pos[k] - mix_pass * pass_tokens[k] + counts[k]
                    > pass_tokens[k]]
            if over:  # a source ran out: the next mix pass starts here, every source on its next pass
                mix_pass += 1
                pos = [mix_pass * n for n in pass_tokens]
                counts, new_credits = plan(b, {})
                short = [k for k in range(k_src) if counts[k] > pass_tokens[k]]
                if short:
                    k = short[0]
                    raise ValueError(f"source {names[k]!r} holds {pass_tokens[k]} tokens, fewer than one block "
                                     f"takes ({counts[k]}): with `on_exhausted='stop'` no block can be built; add "
                                     "text or use `on_exhausted='cycle'`")
        starts[b] = pos
        for k in range(k_src):
            pos[k] += counts[k]
            total[k] += counts[k]
        taken[b + 1] = total
        credits = new_credits
    return starts, taken


def _schedule_key(cfg: ReplayMixerConfig, pass_tokens: Sequence[int]) -> str:
    body = {"ratios": cfg.ratios, "stages": [asdict(s) for s in cfg.stages], "total_blocks": cfg.total_blocks,
            "block_size": cfg.block_size, "granularity": cfg.granularity, "on_exhausted": cfg.on_exhausted,
            "pass_tokens": list(pass_tokens), "version": STORE_VERSION}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]


def _load_or_build_schedule(cfg: ReplayMixerConfig, pass_tokens: list[int], num_blocks: int,
                            cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The schedule for at least `num_blocks` blocks: read (memory-mapped) from `cache_dir` when a long enough
    one is there, else built and written there (temp file + rename, so concurrent ranks never see half a file)."""
    k_src = len(pass_tokens)
    path = cache_dir / f"{_schedule_key(cfg, pass_tokens)}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            table = np.load(path, mmap_mode="r")
            if table.ndim == 2 and table.shape[1] == 2 * k_src and table.shape[0] - 1 >= num_blocks:
                return table[:-1, k_src:], table[:, :k_src]
        except (OSError, ValueError):
            pass  # damaged cache: rebuild it
    starts, taken = build_mix_schedule(cfg.ratios, num_blocks, pass_tokens, block_size=cfg.block_size,
                                       granularity=cfg.granularity, on_exhausted=cfg.on_exhausted,
                                       stages=cfg.stages, total_blocks=cfg.total_blocks)
    if path is not None:
        table = np.zeros((num_blocks + 1, 2 * k_src), np.int64)
        table[:, :k_src], table[:-1, k_src:] = taken, starts
        tmp = None
        try:
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, table)
            os.replace(tmp, path)
        except OSError as e:  # a read-only store still works; the schedule is only not shared
            logger.info("prepared mixer: could not cache the schedule in %s (%s)", path.parent, e)
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
    return starts, taken


# --- the mixer ---------------------------------------------------------------------------------------------------
class PreparedMixer(torch.utils.data.Dataset):
    """The [`ReplayMixer`] stream read from a prepared store, as a map-style dataset: item `i` is block
    `start + i` (`start` is 0 until a checkpoint position is loaded), computed from its index alone.

    The blocks are identical to `ReplayMixer(sources, tokenizer, config)` over the same texts and settings
    (token-exact shares, stages, `cycle`/`stop`, a new seeded document order per pass). Use it with a
    sequential sampler (`TrainingArguments(train_sampling_strategy="sequential")`): each DDP rank and each
    dataloader worker then fetches only its own blocks, and [`ReplayMixerCallback`] resumes by setting `start`.

    Args:
        store: a [`PreparedStore`] or its path.
        config: the mixing settings ([`ReplayMixerConfig`]; `text_field` was used when the store was prepared);
            keyword arguments build one when omitted.
        num_blocks: blocks in the run (the dataset's length); later blocks are planned on demand.
        cache_schedule: keep the planned schedule in the store's `schedules/` folder for later runs and ranks.
        strict_resume: refuse a checkpoint written with other mixing settings (False: continue at the
            checkpoint's block index with the new settings).

    Example:
    ```python
    >>> mixer = PreparedMixer("prepared/", ratios={"domain": 0.75, "general": 0.25}, block_size=256,
    ...                       num_blocks=1000)
    >>> sorted(mixer[0])
    ['input_ids', 'labels', 'position_ids']
    ```
    """

    def __init__(self, store: PreparedStore | str | os.PathLike, config: ReplayMixerConfig | None = None, *,
                 num_blocks: int, cache_schedule: bool = True, strict_resume: bool = True, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise TypeError(f"pass either `config` or keyword fields, not both (got {sorted(kwargs)})")
        self.config = config if config is not None else ReplayMixerConfig(**kwargs)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"`num_blocks` must be a positive integer (blocks in the run), got {num_blocks!r}")
        self.store = store if isinstance(store, PreparedStore) else PreparedStore(store)
        self.names = list(self.config.ratios)
        missing = [n for n in self.names if n not in self.store.sources]
        if missing:
            raise ValueError(f"`ratios` names {missing}, which the store at {str(self.store.path)!r} does not hold "
                             f"(it holds {sorted(self.store.sources)}); prepare it with those sources")
        self.sources = [self.store.sources[n] for n in self.names]
        if self.config.packing == "concat" and self.store.bos is not None:
            raise ValueError(f"the store at {str(self.store.path)!r} was prepared for `packing: documents` (each "
                             f"document starts with BOS id {self.store.bos}); prepare it again for `concat`, or "
                             "mix with `packing='documents'`")
        for i, (name, src) in enumerate(zip(self.names, self.sources)):
            used = self.config.ratios[name] > 0 or any(s.ratios[name] > 0 for s in self.config.stages)
            if used and src.pass_tokens == 0:
                raise ValueError(f"source {name!r} produced no text: it is empty or every document is blank")
        self.num_blocks, self.strict_resume = num_blocks, strict_resume
        self._cache_dir = self.store.path / _SCHEDULES if cache_schedule else None
        self._pass_tokens = [s.pass_tokens for s in self.sources]
        # planned a little past the run: after a resume (item i is block start + i) the dataloader prefetches
        # a few batches beyond the last step, which must not trigger a re-plan in every worker
        planned = num_blocks + max(4096, num_blocks // 100)
        self._starts, self._taken = _load_or_build_schedule(self.config, self._pass_tokens, planned,
                                                            self._cache_dir)
        self._orders: list[OrderedDict[int, tuple[np.ndarray, np.ndarray]]] = [OrderedDict() for _ in self.sources]
        c = self.config
        self._fingerprint = {
            "ratios": c.ratios, "stages": [asdict(s) for s in c.stages], "total_blocks": c.total_blocks,
            "block_size": c.block_size, "granularity": c.granularity, "seed": c.seed, "shuffle": c.shuffle,
            "vocab_size": self.store.vocab_size, "packing": c.packing, "bos": self.store.bos}
        self.start = 0
        self.blocks_built = 0  # blocks this process copied out of the store (tests assert each rank builds 1/N)

    # --- map-style dataset -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> dict[str, Any]:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_blocks:
            raise IndexError(f"item index must be an integer in [0, {self.num_blocks}), got {i!r}")
        return self.block(self.start + int(i))

    def block(self, index: int) -> dict[str, Any]:
        """Global block `index` of the stream (independent of `start`): `input_ids`, `labels` and `position_ids`
        (`packing="documents"`) or `attention_mask` (`concat`); `block_index`, `source_ids` with `emit_sources`."""
        self._ensure(index + 1)
        ids = np.empty(self.config.block_size, np.int64)
        source_ids = np.empty(self.config.block_size, np.int64) if self.config.emit_sources else None
        starts: list[int] = []
        at = 0
        for k, src in enumerate(self.sources):
            n = int(self._taken[index + 1, k] - self._taken[index, k])
            if n:
                starts.append(at)
                self._read(k, int(self._starts[index, k]), ids[at:at + n], starts, at)
                if source_ids is not None:
                    source_ids[at:at + n] = k
                at += n
        self.blocks_built += 1
        out: dict[str, Any] = make_block(ids, starts, self.config.packing, as_numpy=True)
        if source_ids is not None:
            out.update(block_index=index, source_ids=source_ids)
        return out

    def iter_blocks(self, start: int = 0, stop: int | None = None, rank: int = 0,
                    world_size: int = 1) -> Iterator[dict[str, Any]]:
        """Blocks `start, start+1, ...` (up to `stop`, exclusive) that belong to `rank` (index % world_size ==
        rank); the others are never built."""
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, world_size={world_size}), got {rank}")
        first = start + (rank - start) % world_size
        i = first
        while stop is None or i < stop:
            yield self.block(i)
            i += world_size

    # --- reading --------------------------------------------------------------------------------------------------
    def _ensure(self, n: int) -> None:
        if n > len(self._taken) - 1:  # past the planned run: plan twice as far
            self._starts, self._taken = _load_or_build_schedule(
                self.config, self._pass_tokens, max(n, 2 * (len(self._taken) - 1)), self._cache_dir)

    def _pass_order(self, k: int, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Document order of pass `p` of source `k`, and the cumulative token counts along it."""
        cache = self._orders[k]
        if p in cache:
            cache.move_to_end(p)
            return cache[p]
        src = self.sources[k]
        if self.config.shuffle:
            order = np.random.default_rng([self.config.seed, k, p]).permutation(src.n_docs)
        else:
            order = np.arange(src.n_docs)
        cum = np.zeros(src.n_docs + 1, np.int64)
        np.cumsum(src.lengths[order], out=cum[1:])
        cache[p] = (order, cum)
        if len(cache) > _PASS_CACHE:
            cache.popitem(last=False)
        return order, cum

    def _read(self, k: int, pos: int, out: np.ndarray, starts: list[int] | None = None, base: int = 0) -> None:
        """Fill `out` with source `k`'s stream from position `pos` (crossing documents and passes); the positions
        (`base` + offset in `out`) where a document starts go into `starts`."""
        src = self.sources[k]
        length = src.pass_tokens
        at, n = 0, len(out)
        while at < n:
            p, u = divmod(pos, length)
            order, cum = self._pass_order(k, p)
            j = int(np.searchsorted(cum, u, side="right")) - 1
            while at < n and j < src.n_docs:
                a = u - int(cum[j])
                take = min(int(cum[j + 1]) - u, n - at)
                if take > 0:
                    if starts is not None and a == 0 and at:
                        starts.append(base + at)
                    out[at:at + take] = src.doc_tokens(int(order[j]), a, a + take)
                    at, u, pos = at + take, u + take, pos + take
                j += 1

    # --- state (the interface ReplayMixerCallback uses) ---------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a checkpoint and its resume (the same keys as [`ReplayMixer`]'s)."""
        return copy.deepcopy(self._fingerprint)

    def state_at(self, block: int) -> dict[str, Any]:
        """The position before global block `block` (any block: computed, not remembered)."""
        self._ensure(block + 1)
        return {"blocks": int(block), "config": self.fingerprint(),
                "sources": {n: {"tokens": int(self._taken[block, k])} for k, n in enumerate(self.names)}}

    def state_dict(self) -> dict[str, Any]:
        """Position before item 0 (block `start`)."""
        return self.state_at(self.start)

    def load_state_dict(self, state: Mapping[str, Any] | None, strict: bool = True) -> None:
        """Make item 0 the block after `state` (None: the first block). Accepts [`ReplayMixer`] states too (same
        blocks, same block numbering). With `strict`, refuse a state written with other mixing settings."""
        if state is None:
            self.start = 0
            return
        check_mixer_state(state, self.names, self.fingerprint(), strict,
                          "build the mixer with `strict_resume=False` to continue at the same block index with the "
                          "new settings")
        self.start = int(state["blocks"])

    def reset(self) -> None:
        """Item 0 is the first block again."""
        self.start = 0

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Tokens per source in the blocks before item 0."""
        return {n: s["tokens"] for n, s in self.state_dict()["sources"].items()}



# --- registry entry ---------------------------------------------------------------------------------------------------
def _check(cfg: CPTConfig) -> None:
    data = cfg.data
    if cfg.masking is None and data.num_workers and data.prepared_dir is None:  # masked data is map-style
        raise ValueError(f"`data.num_workers` ({data.num_workers}) needs `data.prepared_dir`: the on-the-fly mixer "
                         "tokenizes in the training process; prepare a store (`hf-cpt prepare CONFIG`) or set "
                         "`data.num_workers: 0`")
    if data.prepared_dir is not None and cfg.train.distill is not None:
        raise ValueError("`data.prepared_dir` with `train.distill` is not supported yet (distillation targets "
                         "are computed over the on-the-fly stream); remove one of them")


TECHNIQUE = Technique(
    name="data at scale",
    key="data.prepared_dir",
    exports={**names("mixers.prepared", "PreparedMixer", "PreparedStore"),
             **names("recipe.prepare", "prepare_sources", "prepare_config")},
    functional=names("mixers.prepared", "build_mix_schedule"),
    check=_check,
    # a store is a map-style dataset whose item i is block start + i: the Trainer reads it in order
    training_args={"train_sampling_strategy": "sequential"},
)
