"""Base-model targets, the KL-to-base estimator, and distillation replay.

Forgetting is visible without the pretraining data: on any text x (self-synthesised, domain, or replay), the
adapted model q should still predict what the base model p predicted. The per-token divergence KL(p || q) measures
drift from the base (the monitor), and adding it to the loss on replay tokens keeps the model close (distillation
replay). Storing the base model's full distribution costs `V` floats per token, so only its top-k is kept:
`int32` ids + `float32` log-probs = 8 bytes x k per token (512 bytes at k = 64; 6 bytes x k with fp16 log-probs).

The estimator (top-k + rest). With S the base top-k ids, P = sum_{i in S} p_i, r_p = 1 - P and r_q = 1 - sum_{i in
S} q_i, the distributions are coarse-grained to the k ids plus one "rest" bucket, and

    KL_k(p || q) = sum_{i in S} p_i (log p_i - log q_i) + r_p (log r_p - log r_q).

By the chain rule of KL (the log-sum inequality / data processing for the merge of the tail ids),

    KL(p || q) - KL_k(p || q) = r_p * KL(p_tail / r_p || q_tail / r_q) >= 0,

so KL_k is a lower bound, exact when k = V or r_p = 0, and the gap is r_p times the KL of the renormalised tails:
small when the base's top-k holds most of its mass. `topk_kl` is differentiable (autograd); the training loss
uses the same estimator with hand-written chunked gradients (`hf_cpt.losses.chunked_linear_cross_entropy`).

Numerics: log q_S and log r_q come from log-sum-exps (r_q = exp(lse(z_tail) - lse(z)) with the top-k masked to
-inf), never from 1 - sum q, so a tiny r_q keeps full precision; r_p is clamped to >= 0 (fp32 log-probs can sum
past 1) and its term is 0 when r_p = 0.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from .losses import supports_chunked_loss
from .utils import unsharded_root

REDUCTIONS = ("mean", "sum", "none")


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of `log_softmax(logits)`: `(ids, logprobs)` shaped `logits.shape[:-1] + (k,)`.

    Args:
        logits: `(..., V)` logits of the base model.
        k: ids kept per token (1 <= k <= V).

    Returns:
        `ids` (int32, or int64 if V >= 2**31) sorted by decreasing probability, and `logprobs` (float32).
    """
    vocab = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"`k` must be an integer in [1, {vocab}] (the vocabulary), got {k!r}")
    logprobs, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return ids.to(torch.int32 if vocab < 2**31 else torch.int64), logprobs


def topk_kl(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL_k(p_base || q_student) per token with the top-k + rest estimator (see the module docstring).

    Args:
        student_logits: `(..., V)` logits of the model being trained.
        ids: `(..., k)` base top-k ids (distinct per token).
        logprobs: `(..., k)` base log-probabilities of `ids`.
        reduction: `mean` (over tokens, or over `mask`), `sum`, or `none` (`(...)` per token).
        mask: optional `(...)` weights/booleans of the tokens that count.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if ids.shape != logprobs.shape or ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"`ids` and `logprobs` must be shaped like the logits' tokens + (k,): logits "
                         f"{tuple(student_logits.shape)}, ids {tuple(ids.shape)}, logprobs {tuple(logprobs.shape)}")
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    z = student_logits.to(acc)
    idx = ids.long()
    lp = logprobs.to(acc)
    lse = torch.logsumexp(z, dim=-1)
    log_q_s = z.gather(-1, idx) - lse[..., None]
    per = (lp.exp() * (lp - log_q_s)).sum(-1)
    if ids.shape[-1] < z.shape[-1]:
        lse_rest = torch.logsumexp(z.scatter(-1, idx, float("-inf")), dim=-1)
        r_p = (1.0 - lp.exp().sum(-1)).clamp(min=0.0)
        log_r_p = r_p.clamp(min=torch.finfo(acc).tiny).log()
        per = per + torch.where(r_p > 0, r_p * (log_r_p - (lse_rest - lse)), torch.zeros_like(r_p))
    return _reduce(per, reduction, mask)


def top1_agreement(
    student_logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Whether the student's argmax is the base top-1 (`ids[..., 0]`, as `topk_targets` sorts them).

    Args:
        student_logits: `(..., V)` logits.
        ids: `(..., k)` base top-k ids, most likely first.
        reduction: `mean` (the agreement rate), `sum`, or `none` (per-token floats 0/1).
        mask: optional `(...)` weights of the tokens that count.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    agree = (student_logits.argmax(-1) == ids[..., 0].to(torch.long)).float()
    return _reduce(agree, reduction, mask)


def _reduce(per: torch.Tensor, reduction: str, mask: torch.Tensor | None) -> torch.Tensor:
    if reduction == "none":
        return per
    if mask is not None:
        m = mask.to(per.dtype)
        total = (per * m).sum()
        return total / m.sum().clamp(min=1e-12) if reduction == "mean" else total
    return per.mean() if reduction == "mean" else per.sum()


# --- running a model ------------------------------------------------------------------------------------------------
def _logit_chunks(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int,
                  chunk_tokens: int, position_ids: torch.Tensor | None = None
                  ) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """(row slice, position slice, logits) pieces of the model's logits, `chunk_tokens` tokens of logits at a time.

    Through `get_decoder()` + the output head when the chunked loss can serve the model (also when
    `apply_chunked_loss` patched it): the full batch x seq x vocab tensor never exists. Other models (e.g. soft-
    capped logits) run their own forward, one row batch at a time. `position_ids` (document-packed blocks) go
    with `use_cache=False` and no mask, the layout transformers reads as packed documents.
    """
    device = next(model.parameters()).device
    direct = supports_chunked_loss(model) is None
    # the direct path calls the decoder and the head, not the model: under FSDP2 gather the root unit first
    with unsharded_root(model) if direct else contextlib.nullcontext():
        yield from _logit_pieces(model, device, direct, input_ids, attention_mask, batch_size, chunk_tokens,
                                 position_ids)


def _logit_pieces(model: Any, device: torch.device, direct: bool, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, batch_size: int, chunk_tokens: int,
                  position_ids: torch.Tensor | None) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    for r0 in range(0, input_ids.shape[0], batch_size):
        rows = slice(r0, min(r0 + batch_size, input_ids.shape[0]))
        ids = input_ids[rows].to(device)
        mask = attention_mask[rows].to(device) if attention_mask is not None else None
        extra: dict[str, Any] = {}
        if position_ids is not None:
            if mask is not None and not bool(mask.all()):
                raise ValueError("`position_ids` (document-packed blocks) cannot go with a padding `attention_mask`")
            mask = None  # an attention mask (even all ones) turns transformers' packed-document masking off
            extra = {"position_ids": position_ids[rows].to(device), "use_cache": False}
        if not direct:
            yield rows, slice(0, ids.shape[1]), model(input_ids=ids, attention_mask=mask, **extra).logits
            continue
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, **extra)[0]
        head = model.get_output_embeddings()
        step = max(1, chunk_tokens // ids.shape[0])  # positions per piece
        for p0 in range(0, ids.shape[1], step):
            pos = slice(p0, min(p0 + step, ids.shape[1]))
            yield rows, pos, head(hidden[:, pos])


@contextlib.contextmanager
def _eval_no_grad(model: Any) -> Iterator[None]:
    """Eval mode and no_grad, restoring the training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def compute_base_targets(
    model: Any,
    input_ids: torch.Tensor,
    k: int,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The base model's top-k at every position (predicting the next token), for distillation and the KL monitor.

    Runs in eval mode under no_grad (the training flag is restored); results are on the CPU. Memory of the
    result: 8 bytes x k per token (int32 ids + fp32 log-probs). Padded positions get targets too: mask them out
    with `distill_weights` / `attention_mask` downstream.

    Args:
        model: the base causal LM (before training, or a frozen copy: `make_frozen_copy`).
        input_ids: `(N, T)` token ids.
        k: ids kept per token.
        batch_size: rows per forward pass.
        attention_mask: optional `(N, T)` mask.
        chunk_tokens: tokens whose `V` logits exist at once.
        position_ids: `(N, T)` positions of document-packed blocks (restarting per document), so the targets see
            the same masking and positions as training.

    Returns:
        `{"ids": (N, T, k) int32, "logprobs": (N, T, k) float32}`, positions unshifted like `input_ids`.
    """
    n, length = input_ids.shape
    ids = logprobs = None
    with _eval_no_grad(model):
        for rows, pos, logits in _logit_chunks(model, input_ids, attention_mask, batch_size, chunk_tokens,
                                               position_ids):
            top_ids, top_lp = topk_targets(logits, k)
            if ids is None:
                ids = torch.empty((n, length, k), dtype=top_ids.dtype)
                logprobs = torch.empty((n, length, k), dtype=torch.float32)
            ids[rows, pos] = top_ids.cpu()
            logprobs[rows, pos] = top_lp.cpu()
    return {"ids": ids, "logprobs": logprobs}


def evaluate_kl(
    model: Any,
    input_ids: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    position_ids: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean per-token KL_k(p_base || q_model) and top-1 agreement with the base on `input_ids`.

    Works on a plain causal LM and on one patched by `apply_chunked_loss`; logits memory stays at `chunk_tokens x
    V`. Positions with `attention_mask == 0` do not count.

    Args:
        model: the model being trained.
        input_ids: `(N, T)` token ids the targets were computed on.
        ids: `(N, T, k)` base top-k ids (`compute_base_targets`).
        logprobs: `(N, T, k)` base log-probabilities.
        batch_size: rows per forward pass.
        attention_mask: optional `(N, T)` mask.
        chunk_tokens: tokens whose `V` logits exist at once.
        position_ids: `(N, T)` positions of document-packed blocks, as given to `compute_base_targets`.

    Returns:
        `{"kl": mean KL_k in nats per token, "top1_agree": fraction of tokens}`.
    """
    kl_sum = agree_sum = count = 0.0
    with _eval_no_grad(model):
        for rows, pos, logits in _logit_chunks(model, input_ids, attention_mask, batch_size, chunk_tokens,
                                               position_ids):
            dev = logits.device
            t_ids, t_lp = ids[rows, pos].to(dev), logprobs[rows, pos].to(dev)
            mask = attention_mask[rows, pos].to(dev) if attention_mask is not None else None
            kl_sum += float(topk_kl(logits, t_ids, t_lp, reduction="sum", mask=mask))
            agree_sum += float(top1_agreement(logits, t_ids, reduction="sum", mask=mask))
            count += float(mask.sum()) if mask is not None else logits.shape[0] * logits.shape[1]
    count = max(count, 1.0)
    return {"kl": kl_sum / count, "top1_agree": agree_sum / count}


def make_frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen (eval, no grad) deep copy of `model`, to compute base targets on the fly during training.

    Costs one more model in memory (weights only: no gradients or optimizer state) and one extra forward per
    batch; precomputed targets (`compute_base_targets`) cost 8 x k bytes per token on disk or in RAM instead.
    """
    frozen = copy.deepcopy(model)  # deepcopy rebinds a chunked-loss patch to the copy
    frozen.eval()
    frozen.requires_grad_(False)
    return frozen


__all__ = ["compute_base_targets", "evaluate_kl", "make_frozen_copy", "top1_agreement", "topk_kl", "topk_targets"]
