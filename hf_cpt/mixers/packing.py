"""Document-aware packing: blocks that hold several documents without letting one attend to, or be predicted
from, another.

A packed block is `block_size` tokens cut from a stream of documents. With `packing="documents"` (the default
for causal LMs) every block carries `position_ids` that restart at 0 where a document (or, with token
granularity, a piece from another source) starts, and *no* `attention_mask`. transformers reads exactly that
layout as packed sequences (`masking_utils.find_packed_sequence_indices`): sdpa, eager and flex attention get a
block-diagonal causal mask, flash-attention its varlen path, so no token attends across a document boundary —
the intra-document causal masking of Megatron-LM (`reset_attention_mask`, `reset_position_ids`), OLMo-core and
torchtitan, which "Analysing the impact of sequence composition on language model pre-training" (Zhao et al.
2024, arXiv 2402.13991) finds better than plain concatenation.

Targets follow the same boundaries: the label at the first position of every segment after the first is -100
(it would be predicted from the previous document), and each document starts with the tokenizer's own document
start token when it has one (`bos_for`), so its first real token is still predicted, from inside the document.
EOS stays a trained target at each document's end. `packing="concat"` keeps the plain layout (documents glued
with EOS, an all-ones `attention_mask`, every next token a target).

Three things silently turn transformers' packed-sequence detection off, and [`check_document_masking`] /
[`DocumentMaskingGuard`] handle each: an `attention_mask` in the batch (an all-ones one is dropped, it carries
no information; one with padding is refused), a KV cache (`use_cache=True` makes the model build a cache, and
no packed mask is derived then: the guard passes `use_cache=False`), and a model whose forward takes no
`position_ids` (refused). [`probe_document_masking`] runs two documents through the model packed and alone and
refuses a model whose logits differ, whatever the reason.

This module imports no transformers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..registry import Technique, TrainerParts, names

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)

PACKINGS = ("documents", "concat")
ADD_BOS = ("auto", "always", "never")
IGNORE_INDEX = -100


# --- pure cores ----------------------------------------------------------------------------------------------------
def bos_for(tokenizer: Any, add_bos: str = "auto") -> int | None:
    """The id each document starts with under `packing="documents"`, or None.

    `auto` follows the tokenizer's own convention: BOS when the tokenizer itself puts it in front of a text
    (`tokenizer("x", add_special_tokens=True)` starts with `bos_token_id`: Llama 2/3, Mistral, Gemma), none
    otherwise (GPT-2, Qwen, SmolLM2: SmolLM2-Instruct declares `<|im_start|>` as BOS, a chat-turn marker it
    never saw before raw text). `always` prepends `bos_token_id` whenever one is declared; `never` never does.
    """
    if add_bos not in ADD_BOS:
        raise ValueError(f"`add_bos` must be one of {ADD_BOS}, got {add_bos!r}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or add_bos == "never":
        return None
    if add_bos == "always":
        return int(bos)
    try:
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode a probe text adds nothing we can see
        return None
    return int(bos) if len(ids) and ids[0] == bos else None


def document_tokens(ids: Sequence[int], bos_id: int | None, eos_id: int | None) -> list[int]:
    """One document's stream tokens: `[bos] + ids + [eos]` (either end only when its id is set)."""
    out = [bos_id] if bos_id is not None else []
    out.extend(ids)
    if eos_id is not None:
        out.append(eos_id)
    return out


def segment_position_ids(length: int, starts: Sequence[int]) -> np.ndarray:
    """Position ids of a block of `length` tokens whose segments start at `starts` (0 is always a start):
    0, 1, 2, ... restarting at every start.

    >>> segment_position_ids(6, [0, 2, 5]).tolist()
    [0, 1, 0, 1, 2, 0]
    """
    idx = np.arange(length, dtype=np.int64)
    flags = np.zeros(length, dtype=bool)
    if length:
        flags[0] = True
    flags[np.asarray(starts, dtype=np.int64)] = True
    last_start = np.maximum.accumulate(np.where(flags, idx, 0))
    return idx - last_start


def segment_labels(input_ids: Sequence[int] | np.ndarray, starts: Sequence[int]) -> np.ndarray:
    """`input_ids` as labels with -100 at every segment start after position 0 (a first token would be predicted
    from the previous segment; position 0 is never a target after the causal shift)."""
    labels = np.array(input_ids, dtype=np.int64, copy=True)
    s = np.asarray(starts, dtype=np.int64)
    labels[s[s > 0]] = IGNORE_INDEX
    return labels


def make_block(input_ids: Sequence[int] | np.ndarray, starts: Sequence[int], packing: str,
               as_numpy: bool = False) -> dict[str, Any]:
    """A training/eval block: `input_ids`, `labels` and, for `documents`, `position_ids` (no `attention_mask`);
    for `concat`, an all-ones `attention_mask` and labels equal to the ids (the layout before packing was
    document-aware, bit for bit)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if packing == "concat":
        block = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}
    elif packing == "documents":
        block = {"input_ids": ids, "position_ids": segment_position_ids(len(ids), starts),
                 "labels": segment_labels(ids, starts)}
    else:
        raise ValueError(f"`packing` must be one of {PACKINGS}, got {packing!r}")
    return block if as_numpy else {k: v.tolist() for k, v in block.items()}


def pack_documents(token_lists: Sequence[Sequence[int]], block_size: int, bos_id: int | None, eos_id: int | None,
                   packing: str = "documents") -> list[dict[str, list[int]]]:
    """Documents (token ids, no special tokens) as full `block_size` blocks ([`make_block`]); each document is
    [`document_tokens`] (`bos_id` is used only for `documents`), the tail shorter than a block is dropped."""
    stream: list[int] = []
    starts: list[int] = []
    for ids in token_lists:
        starts.append(len(stream))
        stream.extend(document_tokens(ids, bos_id if packing == "documents" else None, eos_id))
    usable = len(stream) - len(stream) % block_size
    bounds = np.asarray(starts, dtype=np.int64)
    blocks = []
    for a in range(0, usable, block_size):
        inside = bounds[(bounds >= a) & (bounds < a + block_size)] - a
        blocks.append(make_block(stream[a:a + block_size], inside.tolist(), packing))
    return blocks


# --- the model side ------------------------------------------------------------------------------------------------
# attention implementations whose transformers masks honour packed `position_ids` (masking_utils) or that take
# the varlen path from them (flash attention); others are refused rather than trusted
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_document_masking(model: Any) -> None:
    """Refuse, with what to change, a model that would silently attend across documents in packed blocks.

    Raises:
        ValueError: the forward takes no `position_ids`, or the attention implementation is not one whose
        transformers masks honour packed positions.
    """
    base = getattr(model, "get_base_model", None)
    inner = base() if callable(base) else model  # a PEFT wrapper forwards every keyword to its base model
    params = inspect.signature(type(inner).forward).parameters
    if "position_ids" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"`data.packing: documents`: {type(inner).__name__}.forward takes no `position_ids`, so "
                         "documents in a block would attend to each other; set `data.packing: concat`")
    impl = getattr(getattr(inner, "config", None), "_attn_implementation", None) or "eager"
    if impl not in PACKED_ATTENTION:
        raise ValueError(f"`data.packing: documents`: attention implementation {impl!r} is not one whose masks are "
                         f"verified to honour packed position_ids ({', '.join(PACKED_ATTENTION)}); load the model "
                         "with `attn_implementation='sdpa'` or set `data.packing: concat`")


def probe_document_masking(model: Any, vocab_size: int | None = None, atol: float = 1e-3) -> float:
    """Run two short documents through `model` packed in one row (restarting `position_ids`, no mask) and
    alone; return the largest logit difference, and refuse the model when it exceeds `atol`.

    Costs two forward passes of 24 tokens. Catches whatever turns packed-sequence masking off for this model
    (a custom attention, a forward that drops `position_ids`, an architecture transformers does not cover).
    """
    import torch

    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    vocab = vocab_size or int(inner.get_input_embeddings().weight.shape[0])
    device = next(inner.parameters()).device
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab, (1, 13), generator=gen).to(device)
    b = torch.randint(0, vocab, (1, 11), generator=gen).to(device)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(13), torch.arange(11)]).unsqueeze(0).to(device)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            out = inner(input_ids=packed, position_ids=positions, use_cache=False).logits.float()
            alone = inner(input_ids=b, use_cache=False).logits.float()
    finally:
        inner.train(was_training)
    diff = float((out[:, 13:] - alone).abs().max())
    if not diff <= atol:
        impl = getattr(inner.config, "_attn_implementation", None)
        raise ValueError(f"`data.packing: documents`: {type(inner).__name__} (attention {impl!r}) does not keep "
                         f"packed documents apart (logits differ by {diff:.3g} from the document run alone); use "
                         "`attn_implementation='sdpa'` or set `data.packing: concat`")
    return diff


class DocumentMaskingGuard:
    """A forward pre-hook that keeps document-packed batches in the layout transformers reads as packed:
    `use_cache=False` (a KV cache turns packed masking off), an all-ones `attention_mask` dropped, and a batch
    that lost its `position_ids` (a collator that rebuilt it) or carries padding refused.

    Installed on the model by [`DocumentMaskingGuard.attach`], recorded as `model.hf_cpt_document_guard`,
    removed by [`DocumentMaskingGuard.detach`] (the one visible, reversible change to the model).
    """

    ATTRIBUTE = "hf_cpt_document_guard"

    def __init__(self) -> None:
        self.handle: Any = None
        self.pass_use_cache = True
        self.dropped_masks = 0

    @classmethod
    def attach(cls, model: Any) -> DocumentMaskingGuard:
        """Install the guard on `model` (idempotent) and return it."""
        existing = getattr(model, cls.ATTRIBUTE, None)
        if existing is not None:
            return existing
        check_document_masking(model)
        guard = cls()
        base = getattr(model, "get_base_model", None)
        params = inspect.signature(type(base() if callable(base) else model).forward).parameters
        guard.pass_use_cache = "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        guard.handle = model.register_forward_pre_hook(guard._hook, with_kwargs=True)
        setattr(model, cls.ATTRIBUTE, guard)
        return guard

    @classmethod
    def detach(cls, model: Any) -> None:
        """Remove the guard from `model`, if it has one."""
        guard = getattr(model, cls.ATTRIBUTE, None)
        if guard is not None:
            guard.handle.remove()
            delattr(model, cls.ATTRIBUTE)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "labels" not in kwargs:  # generation, or a caller's own forward: not a packed training batch
            return args, kwargs
        positions = kwargs.get("position_ids")
        if positions is None:
            raise ValueError("`data.packing: documents`: the batch reached the model without `position_ids` (a "
                             "collator rebuilt it, or the Trainer dropped the column), so its documents would attend to "
                             "each other; pass `data_collator=default_data_collator` to the Trainer (TRL's "
                             "SFTTrainer: also `remove_unused_columns=False` in SFTConfig), or build the mixer "
                             "with `packing='concat'`")
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not bool((mask != 0).all()):
                raise ValueError("`data.packing: documents`: the batch carries a padding `attention_mask`, which "
                                 "turns transformers' packed-document masking off; packed blocks need no padding: "
                                 "pass `data_collator=default_data_collator` to the Trainer (TRL's SFTTrainer too)")
            kwargs["attention_mask"] = None
            self.dropped_masks += 1
        if self.pass_use_cache:
            kwargs["use_cache"] = False
        return args, kwargs


# --- registry entry ---------------------------------------------------------------------------------------------------
def _enabled(cfg: CPTConfig) -> bool:
    # masked runs train one padded document chunk per sequence: nothing is packed
    return cfg.objective == "clm" and cfg.masking is None and cfg.data.packing == "documents"


def _preflight(cfg: CPTConfig, model: Any, args: Any) -> None:
    probe_document_masking(model)  # this model keeps packed documents apart (two 24-token forwards)


def _setup(parts: TrainerParts) -> None:
    DocumentMaskingGuard.attach(parts.model)  # use_cache=False, no all-ones mask in packed batches


TECHNIQUE = Technique(
    name="document packing",
    key="data.packing",
    exports=names("mixers.packing", "DocumentMaskingGuard", "check_document_masking", "probe_document_masking",
                  "bos_for"),
    functional=names("mixers.packing", "pack_documents", "segment_labels", "segment_position_ids"),
    enabled=_enabled,
    preflight=_preflight,
    setup=_setup,
)


__all__ = ["ADD_BOS", "PACKINGS", "DocumentMaskingGuard", "bos_for", "check_document_masking", "document_tokens",
           "make_block", "pack_documents", "probe_document_masking", "segment_labels", "segment_position_ids"]
