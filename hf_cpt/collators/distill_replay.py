"""Distillation replay: anchor the model to its base on replay (or all) tokens, in the chunked loss.

Learning without Forgetting for continual pretraining: next to the next-token loss, the training loss gets
``weight * KL_k(p_base || p_theta)`` on the chosen tokens (the top-k + rest estimator of `hf_cpt.base_targets.topk_kl`,
exact gradients, no tokens x vocabulary logits tensor; see `hf_cpt.losses`). The base model's top-k per token is
either precomputed once before training for the exact blocks the run will read ([`precompute_distill_targets`]:
no second model in memory while training, 8 x k bytes per distilled token) or computed per batch from a frozen
copy of the base ([`DistillCollator`] with `frozen_model`: one more model in memory and one more forward per
step).

Blocks come from a [`ReplayMixer`] with `emit_sources=True`, which tags each block with its global index and each
token with its source; the collator turns them into the batch keys the chunked loss reads: `base_topk_ids`,
`base_topk_logprobs`, `distill_weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch

from ..base_targets import compute_base_targets
from ..registry import DataParts, Technique, names
from ..utils import check_top_k
from ..validation import check_choice, check_int, check_number

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)

DISTILL_ON = ("replay", "all")
DISTILL_TARGETS = ("precomputed", "frozen_copy")


@dataclass
class DistillConfig:
    """Distillation replay (`train.distill:`): ``weight * KL(base || model)`` added to the loss on the chosen tokens."""

    weight: float = field(default=1.0, metadata={"help": "Weight of the KL term next to the next-token loss (>= 0)."})
    tokens: Literal["replay", "all"] = field(
        default="replay", metadata={"help": "Distil on `replay` tokens (the general source) or on `all` tokens. "
                                            "Formerly `on`, which YAML 1.1 reads as the boolean true."})
    top_k: int = field(default=64, metadata={"help": "Base log-probs kept per token (>= 1, <= vocabulary size)."})
    targets: Literal["precomputed", "frozen_copy"] = field(
        default="precomputed",
        metadata={"help": "`precomputed`: base top-k for every block before training (no second model while "
                          "training); `frozen_copy`: a frozen copy of the base computes them per batch."})

    # old spelling -> field, read by the YAML/dict builder (`hf_cpt.config`); `True` is how YAML 1.1 reads `on:`
    RENAMED_KEYS: ClassVar[dict[Any, str]] = {"on": "tokens", True: "tokens"}

    def __post_init__(self) -> None:
        self.weight = check_number("weight", self.weight, 0.0)
        check_choice("tokens", self.tokens, DISTILL_ON)
        check_int("top_k", self.top_k)
        check_choice("targets", self.targets, DISTILL_TARGETS)


def distill_token_weights(source_ids: torch.Tensor, weight: float, tokens: str, distilled_sources: Sequence[int]
                          ) -> torch.Tensor:
    """Per-token distillation weights: `weight` on tokens of `distilled_sources` (`tokens="replay"`) or on every
    token (`tokens="all"`), 0 elsewhere."""
    if tokens == "all":
        return torch.full(source_ids.shape, float(weight))
    chosen = torch.zeros(source_ids.shape, dtype=torch.bool)
    for s in distilled_sources:
        chosen |= source_ids == s
    return chosen.float() * weight


def precompute_distill_targets(blocks: Iterable[Mapping[str, Any]], base_model: Any, num_blocks: int,
                               cfg: DistillConfig, distilled_sources: Sequence[int], batch_size: int = 8
                               ) -> dict[int, dict[str, torch.Tensor]]:
    """The base model's top-k for every block among the first `num_blocks` of `blocks` with distilled tokens.

    `blocks` is a fresh stream equal to the one training will read (e.g. a second [`ReplayMixer`] with the same
    config and `emit_sources=True`), so the targets match the training blocks by `block_index`. Returns
    `{block_index: {"ids", "logprobs", "weights"}}` (CPU tensors).
    """
    chosen: list[tuple[int, list[int], torch.Tensor]] = []
    for block, _ in zip(blocks, range(num_blocks)):
        if "block_index" not in block or "source_ids" not in block:
            raise ValueError("distillation targets need blocks tagged with `block_index` and `source_ids`: build the "
                             "ReplayMixer with `emit_sources=True`")
        w = distill_token_weights(torch.tensor(block["source_ids"]), cfg.weight, cfg.tokens, distilled_sources)
        if w.any():
            chosen.append((block["block_index"], block["input_ids"], w, block.get("position_ids")))
    out: dict[int, dict[str, torch.Tensor]] = {}
    for start in range(0, len(chosen), 64):
        part = chosen[start:start + 64]
        # document-packed blocks: the base sees each document alone, with the positions training uses
        positions = torch.tensor(np.stack([np.asarray(p) for *_, p in part])) if part[0][3] is not None else None
        t = compute_base_targets(base_model, torch.tensor(np.stack([np.asarray(ids) for _, ids, _, _ in part])),
                                 cfg.top_k, batch_size=batch_size, position_ids=positions)
        for j, (index, _, w, _) in enumerate(part):
            out[index] = {"ids": t["ids"][j], "logprobs": t["logprobs"][j], "weights": w}
    return out


@dataclass
class DistillCollator:
    """Collates mixer blocks and adds the distillation keys.

    Output keys: those of `base_collator` (e.g. `input_ids`, `attention_mask`, `labels`) plus `base_topk_ids`
    `(B, T, k)`, `base_topk_logprobs` `(B, T, k)` and `distill_weights` `(B, T)`; the blocks' `block_index` and
    `source_ids` are consumed. Blocks without targets get zero weights; a batch of such blocks still carries
    the three keys (all weights 0), so every training batch has the same keys.

    >>> batch = DistillCollator(targets=targets, top_k=4)([block])  # doctest: +SKIP
    >>> sorted(batch)  # doctest: +SKIP
    ['attention_mask', 'base_topk_ids', 'base_topk_logprobs', 'distill_weights', 'input_ids', 'labels']

    Args:
        targets: precomputed `{block_index: {"ids", "logprobs", "weights"}}` ([`precompute_distill_targets`]).
        frozen_model: or a frozen base model computing targets per batch ([`hf_cpt.base_targets.make_frozen_copy`]).
        config: the [`DistillConfig`] (weight, `tokens`, top_k).
        distilled_sources: source indices distilled when `config.tokens == "replay"`.
        base_collator: collates the plain keys; default `transformers.default_data_collator`.
    """

    config: DistillConfig
    targets: Mapping[int, Mapping[str, torch.Tensor]] | None = None
    frozen_model: Any = None
    distilled_sources: Sequence[int] = (1,)
    base_collator: Any = None
    tokens_distilled: int = 0

    def __post_init__(self) -> None:
        if (self.targets is None) == (self.frozen_model is None):
            raise ValueError("`DistillCollator` needs exactly one of `targets` (precomputed) or `frozen_model`")
        if self.base_collator is None:
            from transformers import default_data_collator

            self.base_collator = default_data_collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        features = [dict(f) for f in features]
        meta = [(f.pop("block_index", None), f.pop("source_ids", None)) for f in features]
        batch = self.base_collator(features)
        if all(src is None for _, src in meta):  # held-out batches: plain next-token loss
            return batch
        b, length = batch["input_ids"].shape
        k = self.config.top_k
        # a batch without distilled tokens still gets the keys (zero weights): accelerate builds a multi-process
        # global batch from per-process batches with the *first* one's keys, so keys that come and go would drop
        # the targets of every rank whenever rank 0's part has no replay token
        ids = torch.zeros((b, length, k), dtype=torch.int32)
        logprobs = torch.zeros((b, length, k), dtype=torch.float32)
        weights = torch.zeros((b, length), dtype=torch.float32)
        if self.frozen_model is not None:
            weights = torch.stack([distill_token_weights(torch.tensor(src), self.config.weight, self.config.tokens,
                                                         self.distilled_sources) for _, src in meta])
            if weights.any():
                t = compute_base_targets(self.frozen_model, batch["input_ids"], k, batch_size=b,
                                         position_ids=batch.get("position_ids"))
                ids, logprobs = t["ids"], t["logprobs"]
        else:
            for row, (index, _) in enumerate(meta):
                found = self.targets.get(index) if index is not None else None
                if found is not None:
                    ids[row], logprobs[row], weights[row] = found["ids"], found["logprobs"], found["weights"]
        if "labels" in batch:  # no distillation where no token is a target (a document's first position)
            weights = weights * (batch["labels"] != -100).to(weights.dtype)
        self.tokens_distilled += int((weights > 0).sum())
        batch.update(base_topk_ids=ids, base_topk_logprobs=logprobs, distill_weights=weights)
        return batch


# --- registry entry ---------------------------------------------------------------------------------------------------
def _check(cfg: CPTConfig) -> None:
    distill = cfg.train.distill
    if distill is None:
        return
    if cfg.objective != "clm" or cfg.masking is not None:
        raise ValueError("`train.distill` needs a causal-LM run without `masking` (targets ride with the "
                         "token-exact replay blocks)")
    if cfg.train.chunked_loss == "false" or cfg.train.use_liger == "true":
        raise ValueError("`train.distill` is computed inside hf-cpt's chunked loss: set `train.chunked_loss` "
                         "to auto/true and `train.use_liger` to auto/false")
    data = cfg.data
    replays = data.general is not None and (data.replay_ratio > 0 or any(s.replay_ratio for s in data.replay_stages))
    if distill.tokens == "replay" and not replays:
        raise ValueError("`train.distill.tokens` is `replay` but the run replays no general text: set "
                         "`data.general` and `data.replay_ratio` > 0, or `train.distill.tokens: all`")


def _config_preflight(cfg: CPTConfig, model_config: Any, tokenizer: Any) -> None:
    check_top_k("train.distill.top_k", cfg.train.distill.top_k, model_config)  # before the weights load


def _preflight(cfg: CPTConfig, model: Any, args: Any) -> None:
    check_top_k("train.distill.top_k", cfg.train.distill.top_k, model)  # again: `vocab:` may have changed the rows


def _collator(parts: DataParts) -> DistillCollator:
    """Base top-k targets precomputed for the exact blocks the run will read (a second mixer with the same
    settings), or computed on the fly from a frozen copy of the base."""
    distill = parts.cfg.train.distill
    if distill.targets == "frozen_copy":
        from ..base_targets import make_frozen_copy

        return DistillCollator(distill, frozen_model=make_frozen_copy(parts.model))
    targets = precompute_distill_targets(iter(parts.blocks()), parts.model, parts.num_blocks, distill,
                                         distilled_sources=[1], batch_size=parts.cfg.train.per_device_eval_batch_size)
    logger.info("distillation replay: base top-%d targets for %d of %d blocks", distill.top_k, len(targets),
                parts.num_blocks)
    return DistillCollator(distill, targets=targets)


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    distill = (config.get("train") or {}).get("distill")
    if not distill:
        return []
    return [f"distillation replay: {distill.get('weight')} x KL(base || model) on {distill.get('tokens')} "
            f"tokens (base top-{distill.get('top_k')}, {distill.get('targets')} targets; "
            f"{metrics.get('distilled_tokens') or 0:,} tokens distilled)"]


TECHNIQUE = Technique(
    name="distillation replay",
    key="train.distill",
    config=DistillConfig,
    exports={**names("collators.distill_replay", "DistillConfig", "DistillCollator", "precompute_distill_targets"),
             "make_frozen_copy": "base_targets"},
    functional={"distill_token_weights": "collators.distill_replay",
                **names("base_targets", "top1_agreement", "topk_kl", "topk_targets")},
    check=_check,
    config_preflight=_config_preflight,
    preflight=_preflight,
    block_sources=True,  # targets ride with each block's index and per-token sources
    collator=_collator,
    card=_card,
)
