"""`ReplayMixer`: packed fixed-length blocks from N named text sources at token-exact shares; streaming,
deterministic, resumable from a Trainer checkpoint, and shardable across ranks.

Paper context: replaying general data is the main defence against forgetting in continual pretraining
("Simple and Scalable Strategies to Continually Pre-train Large Language Models", Ibrahim et al. 2024:
1-5% replay for a weak distribution shift, ~25% for a new language). Unlike `datasets.interleave_datasets`,
which draws *documents* with the given probabilities (so a source with 10x longer documents gets ~10x the
tokens), the shares here are shares of *tokens*: blocks are all `block_size` tokens and are allocated by credit
(see [`allocate_shares`]), so the error after any prefix is below one block (or one token with
`granularity="token"`).
"""

from __future__ import annotations

import copy
import itertools
import logging
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..registry import Technique, names
from ..validation import check_choice, check_int
from .core import RatioStage, allocate_shares, check_mixer_state, check_ratios, document_indices, ratios_at
from .packing import ADD_BOS, PACKINGS, bos_for, document_tokens, make_block

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)

GRANULARITIES = ("block", "token")
ON_EXHAUSTED = ("cycle", "stop")
_HISTORY = 8192  # block states kept for checkpointing: covers the dataloader's prefetch with room to spare


class _Exhausted(Exception):
    pass


@dataclass
class ReplayMixerConfig:
    """How a [`ReplayMixer`] mixes its sources.

    Args:
        ratios: share of training tokens per source name, summing to 1, e.g. `{"domain": 0.75, "general": 0.25}`.
        block_size: tokens per packed block (each document ends with the EOS token, as in pretraining).
        packing: `documents` (each block carries `position_ids` restarting at every document, no attention
            across documents, no target predicted from another document; see `hf_cpt.mixers.packing`) or
            `concat` (an all-ones `attention_mask`: documents attend to the ones before them in the block).
        add_bos: with `documents`, start each document with BOS: `auto` (when the tokenizer itself adds one),
            `always` (whenever it declares one) or `never`.
        granularity: `block` (each block comes from one source; share error < 1 block over any prefix) or
            `token` (each block is filled from every source by token credit; error < 1 token per source).
        on_exhausted: `cycle` (a source that runs out starts another pass, reshuffled) or `stop` (the mix ends
            when any source runs out).
        stages: optional [`RatioStage`]s changing the shares later in the run (needs `total_blocks`).
        total_blocks: blocks in the whole run (global, all ranks), to place `stages`.
        seed: seed of the per-pass document order.
        shuffle: shuffle documents of map-style sources (streaming sources keep their order; shuffle them
            upstream with `IterableDataset.shuffle`, which is re-seeded per pass through `set_epoch`).
        text_field: column holding the text (one name, or one per source).
        emit_sources: also yield `block_index` (the block's global position in the stream) and `source_ids` (per
            token, the index of its source in `ratios`), e.g. to attach per-block distillation targets.
    """

    ratios: dict[str, float]
    block_size: int = 2048
    packing: str = "documents"
    add_bos: str = "auto"
    granularity: str = "block"
    on_exhausted: str = "cycle"
    stages: list[RatioStage] = field(default_factory=list)
    total_blocks: int | None = None
    seed: int = 0
    shuffle: bool = True
    text_field: str | dict[str, str] = "text"
    emit_sources: bool = False

    def __post_init__(self) -> None:
        self.ratios = check_ratios(self.ratios, "ratios")
        check_int("block_size", self.block_size)
        check_choice("packing", self.packing, PACKINGS)
        check_choice("add_bos", self.add_bos, ADD_BOS)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("on_exhausted", self.on_exhausted, ON_EXHAUSTED)
        self.stages = [s if isinstance(s, RatioStage) else RatioStage(**s) for s in self.stages]
        for i, stage in enumerate(self.stages):
            if set(stage.ratios) != set(self.ratios):
                raise ValueError(f"`stages[{i}].ratios` must name the same sources as `ratios` "
                                 f"({sorted(self.ratios)}), got {sorted(stage.ratios)}")
            if i and stage.start <= self.stages[i - 1].start:
                raise ValueError(f"`stages[{i}].start` must be after `stages[{i - 1}].start`")
        if self.stages and (not isinstance(self.total_blocks, int) or self.total_blocks < 1):
            raise ValueError("`total_blocks` must be set (blocks in the whole run) when `stages` are used")

    def text_field_for(self, name: str) -> str:
        return self.text_field.get(name, "text") if isinstance(self.text_field, dict) else self.text_field


class _SourceReader:
    """Reads one source document by document, tokenizes in batches, and hands out tokens; its position
    (pass, document, offset) is all that is needed to resume it exactly."""

    def __init__(self, name: str, index: int, data: Any, tokenizer, cfg: ReplayMixerConfig, bos: int | None,
                 batch: int = 64):
        self.name, self.index, self.data, self.tokenizer, self.cfg, self.batch = name, index, data, tokenizer, cfg, batch
        self.text_field = cfg.text_field_for(name)
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.bos = bos
        self.map_style = hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(
            data, torch.utils.data.IterableDataset)
        columns = getattr(data, "column_names", None)
        if isinstance(columns, list) and self.text_field not in columns:
            raise ValueError(f"source {name!r}: column {self.text_field!r} not found (columns: {columns}); set "
                             "`text_field` to the column holding the text")
        if self.map_style and len(data) == 0:
            raise ValueError(f"source {name!r} is empty: give it at least one document")
        self.seek({"pass": 0, "doc": 0, "offset": 0, "tokens": 0})

    # --- position -------------------------------------------------------------------------------------------
    def state(self) -> dict[str, int]:
        doc = self.buf[0][0] if self.buf else self.next_doc
        return {"pass": self.pass_idx, "doc": doc, "offset": self.offset, "tokens": self.tokens}

    def seek(self, state: Mapping[str, int]) -> None:
        self.pass_idx, self.next_doc, self.offset, self.tokens = (
            int(state["pass"]), int(state["doc"]), int(state["offset"]), int(state["tokens"]))
        self.buf: deque[tuple[int, list[int]]] = deque()
        self._order = self._iter = None
        self._pass_tokens = 0
        if not self.map_style:
            self._iter = iter(self._stream_pass(self.pass_idx))
            for _ in itertools.islice(self._iter, self.next_doc):  # streaming: re-read (not re-tokenize) the prefix
                pass

    def _stream_pass(self, p: int):
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(p)  # datasets.IterableDataset: a new shuffle order per pass
        return self.data

    def _pass_order(self) -> np.ndarray:
        if self._order is None:
            n = len(self.data)
            if self.cfg.shuffle:
                self._order = np.random.default_rng([self.cfg.seed, self.index, self.pass_idx]).permutation(n)
            else:
                self._order = np.arange(n)
        return self._order

    # --- reading --------------------------------------------------------------------------------------------
    def _text(self, item: Any) -> Any:
        if isinstance(item, str):
            return item
        if not isinstance(item, Mapping) or self.text_field not in item:
            keys = list(item) if isinstance(item, Mapping) else type(item).__name__
            raise ValueError(f"source {self.name!r}: a document has no {self.text_field!r} field (got {keys}); "
                             "set `text_field` to the column holding the text")
        return item[self.text_field]

    def _read_docs(self) -> list[Any]:
        if self.map_style:
            idx = self._pass_order()[self.next_doc:self.next_doc + self.batch].tolist()
            if not idx:
                return []
            if hasattr(self.data, "column_names"):  # datasets.Dataset: one batched read
                return list(self.data[idx][self.text_field])
            return [self._text(self.data[i]) for i in idx]
        return [self._text(x) for x in itertools.islice(self._iter, self.batch)]

    def _fill(self) -> None:
        while not self.buf:
            texts = self._read_docs()
            if not texts:  # end of this pass
                if self._pass_tokens == 0 and self.tokens == 0:
                    raise ValueError(f"source {self.name!r} produced no text: it is empty or every document is "
                                     "blank")
                if self.cfg.on_exhausted == "stop":
                    raise _Exhausted(self.name)
                self.pass_idx += 1
                self.next_doc, self._order, self._pass_tokens = 0, None, 0
                if not self.map_style:
                    self._iter = iter(self._stream_pass(self.pass_idx))
                logger.info("replay mixer: source %r starts pass %d", self.name, self.pass_idx)
                continue
            keep = [(self.next_doc + i, texts[i]) for i in document_indices(texts, f"source {self.name!r}")]
            self.next_doc += len(texts)
            if keep:
                ids = self.tokenizer([t for _, t in keep], add_special_tokens=False)["input_ids"]
                for (doc, _), toks in zip(keep, ids):
                    toks = document_tokens(toks, self.bos, self.eos)
                    if toks:
                        self.buf.append((doc, toks))
                        self._pass_tokens += len(toks)

    def take(self, n: int, starts: list[int] | None = None) -> list[int]:
        """The next `n` tokens; positions (in the returned list) where a document starts go into `starts`."""
        out: list[int] = []
        while len(out) < n:
            if not self.buf:
                self._fill()
            _, toks = self.buf[0]
            if starts is not None and self.offset == 0:
                starts.append(len(out))
            k = min(n - len(out), len(toks) - self.offset)
            out.extend(toks[self.offset:self.offset + k])
            self.offset += k
            if self.offset == len(toks):
                self.buf.popleft()
                self.offset = 0
        self.tokens += n
        return out


class ReplayMixer(torch.utils.data.IterableDataset):
    """An `IterableDataset` of packed blocks mixing named sources at exact token shares: `input_ids`,
    `position_ids` (restarting at every document) and `labels` (-100 where a document starts) with the default
    `packing="documents"`; `input_ids`, `attention_mask`, `labels` with `packing="concat"`.

    Args:
        sources: `{name: data}`; data is a `datasets.Dataset`, a `datasets.IterableDataset` (streaming), or any
            sequence/iterable of strings or of dicts with the text column.
        tokenizer: a tokenizer (fast or slow) whose EOS token separates documents.
        config: a [`ReplayMixerConfig`]; keyword arguments build one when omitted.
        rank / world_size: iterate only this rank's share (block `i` goes to rank `i % world_size`). Leave at
            0/1 under `transformers.Trainer`: accelerate already splits each global batch between ranks.
        strict_resume: when resuming from a Trainer checkpoint, refuse a state written with other ratios, stages,
            block size, seed or vocabulary (False: keep the positions, apply the new settings from there).

    The state (`state_dict()`) is the position of every source plus the credits: restoring it continues the
    stream exactly. [`ReplayMixerCallback`] saves it with every Trainer checkpoint.

    Example:
    ```python
    >>> mixer = ReplayMixer({"domain": ["a b c"] * 9, "general": ["x y"] * 9}, tok,
    ...                     ratios={"domain": 0.75, "general": 0.25}, block_size=4)
    >>> sorted(next(iter(mixer)))
    ['input_ids', 'labels', 'position_ids']
    ```
    """

    def __init__(self, sources: Mapping[str, Any], tokenizer, config: ReplayMixerConfig | None = None, *,
                 rank: int = 0, world_size: int = 1, strict_resume: bool = True, **kwargs: Any) -> None:
        self.config = config if config is not None else ReplayMixerConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError(f"pass either `config` or keyword fields, not both (got {sorted(kwargs)})")
        missing = set(self.config.ratios) - set(sources)
        extra = set(sources) - set(self.config.ratios)
        if missing or extra:
            raise ValueError(f"`ratios` and `sources` must name the same sources: no data for {sorted(missing)}, "
                             f"no ratio for {sorted(extra)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, world_size={world_size}), got {rank}")
        self.tokenizer, self.rank, self.world_size, self.strict_resume = tokenizer, rank, world_size, strict_resume
        self.names = list(self.config.ratios)
        c = self.config
        self.bos = bos_for(tokenizer, c.add_bos) if c.packing == "documents" else None
        self.readers = {n: _SourceReader(n, i, sources[n], tokenizer, c, self.bos) for i, n in enumerate(self.names)}
        self._history: deque[tuple[int, dict]] = deque(maxlen=_HISTORY)
        self._fingerprint = {
            "ratios": c.ratios, "stages": [asdict(s) for s in c.stages], "total_blocks": c.total_blocks,
            "block_size": c.block_size, "granularity": c.granularity, "seed": c.seed, "shuffle": c.shuffle,
            "vocab_size": len(tokenizer), "packing": c.packing, "bos": self.bos}
        self.reset()

    # --- datasets / TRL ---------------------------------------------------------------------------------------
    def to_iterable_dataset(self) -> Any:
        """This mixer as a `datasets.IterableDataset` with `input_ids`/`attention_mask`/`labels` features, for
        trainers that accept only `datasets` types (TRL's `SFTTrainer`).

        Resume stays exact: the dataset holds a [`MixerHandle`], never a copy of the mixer (`datasets` copies
        its pipelines; copies share the handle), so every iteration reads this very mixer, whose position
        [`ReplayMixerCallback`] (given this mixer) saves and restores. Needs `dataloader_num_workers=0`."""
        import uuid

        import datasets

        keys = ("input_ids", "position_ids", "labels") if self.config.packing == "documents" else (
            "input_ids", "attention_mask", "labels")
        features = datasets.Features({k: datasets.Sequence(datasets.Value("int64")) for k in keys})
        if self.config.emit_sources:
            features["block_index"] = datasets.Value("int64")
            features["source_ids"] = datasets.Sequence(datasets.Value("int64"))
        handle = MixerHandle(self, f"dataset:{uuid.uuid4().hex}")
        return datasets.IterableDataset.from_generator(_iterate_handle, features=features,
                                                       gen_kwargs={"handle": handle})

    # --- state ------------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a checkpoint and its resume (else the stream would silently differ)."""
        return copy.deepcopy(self._fingerprint)

    def reset(self) -> None:
        """Go back to the start of the stream."""
        self.load_state_dict(None)

    def state_dict(self) -> dict[str, Any]:
        """Position before the next block the live iterator will produce (after `load_state_dict`: the loaded
        position, where the next iteration starts)."""
        return copy.deepcopy(self._state())

    def _state(self) -> dict[str, Any]:
        return {"blocks": self._blocks, "credits": dict(self._credits), "mix_pass": self._mix_pass,
                "sources": {n: r.state() for n, r in self.readers.items()}, "config": self._fingerprint}

    def state_at(self, block: int) -> dict[str, Any]:
        """The state before global block `block`, if it was produced recently (for checkpoints taken while the
        dataloader has already prefetched later blocks)."""
        if block == self._blocks:
            return self.state_dict()
        for index, state in reversed(self._history):
            if index == block:
                return copy.deepcopy(state)
        raise ValueError(f"the mixer has no record of block {block} (it is at block {self._blocks}); the "
                         "dataloader read too far ahead, or blocks are consumed in another process (use "
                         "`dataloader_num_workers=0`)")

    def load_state_dict(self, state: Mapping[str, Any] | None, strict: bool = True) -> None:
        """Start every following iteration from `state` (None: from the start of the stream).

        Args:
            strict: refuse a state written with different ratios/stages/block size/seed/vocabulary. With False
                the source positions are kept, the credits restart, and the new settings apply from here.
        """
        self._history.clear()
        if state is None:
            state = {"blocks": 0, "credits": {}, "mix_pass": 0,
                     "sources": {n: {"pass": 0, "doc": 0, "offset": 0, "tokens": 0} for n in self.names}}
        else:
            check_mixer_state(state, self.names, self.fingerprint(), strict,
                              "load with `strict=False` (`ReplayMixer(..., strict_resume=False)` under the Trainer) "
                              "to switch settings at this point")
        same = strict or state.get("config") == self.fingerprint()
        self._start = {"blocks": int(state["blocks"]), "mix_pass": int(state["mix_pass"]),
                       "credits": {k: float(v) for k, v in state["credits"].items()} if same else {},
                       "sources": {n: dict(state["sources"][n]) for n in self.names}}
        self._seek(self._start)

    def _seek(self, state: Mapping[str, Any]) -> None:
        self._history.clear()
        self._blocks, self._mix_pass = state["blocks"], state["mix_pass"]
        self._credits = dict(state["credits"])
        for name, reader in self.readers.items():
            reader.seek(state["sources"][name])
        self._at_start = True

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Tokens handed out per source so far by the live iterator (prefetched blocks included)."""
        return {n: r.tokens for n, r in self.readers.items()}

    # --- iteration ----------------------------------------------------------------------------------------------
    def _next_block(self) -> tuple[list[int], list[int], list[int]]:
        """The next block's token ids, per token the index of its source, and where segments start (a document,
        or a piece from another source)."""
        cfg = self.config
        ratios = ratios_at(self._blocks, cfg.ratios, cfg.stages, cfg.total_blocks)
        amount = 1 if cfg.granularity == "block" else cfg.block_size
        alloc, credits = allocate_shares(self._credits, ratios, amount)
        ids: list[int] = []
        sources: list[int] = []
        starts: list[int] = []
        for i, name in enumerate(self.names):
            n = alloc[name] * (cfg.block_size if cfg.granularity == "block" else 1)
            if n:
                piece: list[int] = []
                at = len(ids)
                ids.extend(self.readers[name].take(n, piece))
                starts.extend([at] + [at + s for s in piece if s])
                sources.extend([i] * n)
        self._credits = credits
        return ids, sources, starts

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise RuntimeError("ReplayMixer must be read by a single process (it tokenizes on the fly and keeps "
                               "its position for checkpoints): set `dataloader_num_workers` to 0")
        if not self._at_start:  # every iteration starts at the start (or at the state loaded to resume)
            self._seek(self._start)
        self._at_start = False
        while True:
            self._history.append((self._blocks, self._state()))
            try:
                ids, sources, starts = self._next_block()
            except _Exhausted as e:
                # `stop` mode: the next iteration (the Trainer's next epoch) is another pass over the whole mix,
                # numbered on from here so checkpoints stay addressable
                logger.info("replay mixer: source %s ran out; the mix stops (on_exhausted='stop')", e)
                state = self._state()
                for src in state["sources"].values():
                    src.update({"pass": src["pass"] + 1, "doc": 0, "offset": 0})  # reshuffled
                self._start = {**state, "credits": {}, "mix_pass": self._mix_pass + 1}
                return
            index = self._blocks
            self._blocks += 1
            if index % self.world_size == self.rank:
                block: dict[str, Any] = make_block(ids, starts, self.config.packing)
                if self.config.emit_sources:
                    block.update(block_index=index, source_ids=sources)
                yield block


# --- finding a live mixer by key -------------------------------------------------------------------------------------
# Two holders cannot keep the mixer object itself: a `datasets` pipeline (it copies and hashes what it is given)
# and a callback the Trainer rebuilds from checkpoint state (`type(cb)(**args)`). They carry a key and find the
# mixer here. The table does not own the mixers: its entries are weak, so one lives exactly as long as something
# holds its mixer (the Trainer's dataset, a callback, a `MixerHandle` inside a `datasets` pipeline) and then
# disappears; nothing accumulates over a process's many runs.
_LIVE_MIXERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def register_mixer(mixer: ReplayMixer, key: str) -> str:
    """Make `mixer` findable under `key` while it is alive (a later registration of the same key replaces it);
    returns `key`. The table holds no reference of its own: whoever registers keeps the mixer."""
    _LIVE_MIXERS[key] = mixer
    return key


def registered_mixer(key: str | None) -> ReplayMixer | None:
    """The live mixer registered under `key`, or None."""
    return _LIVE_MIXERS.get(key) if key else None


class MixerHandle:
    """What [`ReplayMixer.to_iterable_dataset`] puts in the `datasets` pipeline instead of the mixer: it owns the
    mixer (so the dataset keeps working after the caller drops it, and frees it with the dataset), copies of the
    pipeline share it, and pickling (`datasets` hashes its generator arguments) carries only the key, resolved
    back to the live mixer."""

    def __init__(self, mixer: ReplayMixer | None, key: str) -> None:
        self.mixer, self.key = mixer, key
        if mixer is not None:
            register_mixer(mixer, key)

    def __deepcopy__(self, memo: dict) -> MixerHandle:
        return self  # one mixer, one stream position: copies of the pipeline read the same mixer

    def __reduce__(self) -> tuple:
        return _handle_for, (self.key,)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        mixer = self.mixer if self.mixer is not None else registered_mixer(self.key)
        if mixer is None:
            raise RuntimeError(f"no live ReplayMixer registered as {self.key!r} in this process: build it before "
                               "iterating")
        yield from mixer


def _handle_for(key: str) -> MixerHandle:
    return MixerHandle(registered_mixer(key), key)


def _iterate_handle(handle: MixerHandle) -> Iterator[dict[str, Any]]:
    yield from handle


# --- registry entry ---------------------------------------------------------------------------------------------------
def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    data = config.get("data") or {}
    ratio = data.get("replay_ratio", 0)
    mix = (f"replay: {ratio:.1%} of training tokens from the general corpus, {1 - ratio:.1%} domain "
           f"({data.get('granularity', 'block')}-exact mixing, {data.get('block_size')}-token blocks)")
    stages = data.get("replay_stages") or []
    if stages:
        mix += "; then " + ", ".join(f"{s['replay_ratio']:.1%} from {s['start']:.0%} of the run" for s in stages)
    lines = [mix]
    tokens = metrics.get("train_tokens") or {}
    if tokens:
        total = sum(tokens.values())
        lines.append(f"training tokens: {total:,} (" + ", ".join(
            f"{k}: {v:,} = {v / max(total, 1):.1%}" for k, v in tokens.items()) + ")")
    return lines


def _config_preflight(cfg: CPTConfig, model_config: Any, tokenizer: Any) -> None:
    data = cfg.data
    if data.general is not None and data.replay_ratio == 1 and all(s.replay_ratio == 1 for s in data.replay_stages):
        # legitimate (a CMR pilot's general-only point), but not adaptation: said once, before the run starts
        logger.warning("`data.replay_ratio` is 1: every training token comes from `data.general` and the domain "
                       "corpus gets none (the run measures general-only training); lower it to adapt to the domain")


TECHNIQUE = Technique(
    name="replay mixing",
    key="data",
    exports={**names("mixers.replay", "ReplayMixer", "ReplayMixerConfig"), "RatioStage": "mixers.core",
             "ReplayMixerCallback": "callbacks.replay_mixer"},
    functional=names("mixers.core", "allocate_shares", "assign_blocks", "check_ratios", "pack_blocks", "ratios_at"),
    enabled=lambda cfg: True,  # every run mixes (a replay ratio of 0 is all domain text)
    config_preflight=_config_preflight,
    card=_card,
)
