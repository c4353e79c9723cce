"""Memory-efficient causal-LM loss: linear head + cross-entropy in chunks, never the full logits tensor.

The logits of a batch are `tokens x vocab` floats: at 128k vocab and 16k tokens per batch that is 8 GiB in fp32,
more than the model. `chunked_linear_cross_entropy` computes the loss of `chunk_size` tokens at a time and, in the
same pass, the exact gradients w.r.t. the hidden states, the head weight (and bias): for one token with logits
z = W h + b, target y and weight w, d(w * CE)/dz = w * (softmax(z) - onehot(y)). Peak extra memory is
`chunk_size x vocab` instead of `tokens x vocab` (the same trick as Liger's fused linear cross-entropy, in plain
PyTorch so it runs on CPU and accepts per-token weights).

`apply_chunked_loss(model)` makes a Hugging Face causal LM use it whenever `labels` are passed, so it works
unchanged inside `Trainer`, TRL trainers and accelerate loops; Liger (`hf_cpt.liger`) is preferred on CUDA.

Distillation replay (`hf_cpt.base_targets`) rides in the same pass: given the base model's top-k ids and log-probs per
token, the loss adds d_t * KL_k(p_base || q_t) with the top-k + rest estimator of `hf_cpt.base_targets.topk_kl`, whose
exact gradient w.r.t. the logits z (q = softmax(z), S the top-k ids, P = sum_S p_i, r_p = 1 - P, r_q = 1 - sum_S
q_i) is

    dKL_k/dz_j = (P + r_p) q_j - p_j            for j in S
    dKL_k/dz_j = (P + r_p) q_j - r_p q_j / r_q  for j not in S      (P + r_p = 1 unless rounding makes P > 1)

(from log q_i = z_i - lse(z) and log r_q = lse_{j not in S}(z) - lse(z)). Each chunk computes the tail's
log-sum-exp with the top-k entries masked to -inf, so r_q is exact even when it is tiny.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

import torch

from .utils import forward_patch, patch_forward, unpatch_forward

logger = logging.getLogger(__name__)

REDUCTIONS = ("mean", "sum")
CHUNKED_LOSS = "chunked_loss"  # the name of its forward patch (`model.hf_cpt_forward_patch.name`)


def _ce_chunk(logits: torch.Tensor, t: torch.Tensor, w: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """Sum of w * CE over the chunk; turns `logits` in place into d(sum)/d(logits) when `need_grad`."""
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, t[:, None])[:, 0]
    total = ((lse - picked) * w).sum()
    if need_grad:
        g = logits.sub_(lse[:, None]).exp_()  # softmax in place: one chunk-sized buffer in all
        g[torch.arange(g.shape[0], device=g.device), t] -= 1.0
        g *= w[:, None]
    return total


def _ce_kl_chunk(logits: torch.Tensor, t: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor,
                 d: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """Sum of w * CE + d * KL_k over the chunk; turns `logits` in place into the gradient when `need_grad`.

    One chunk-sized buffer: the top-k logits are gathered, masked to -inf, and the buffer becomes the tail's
    exp(z - max_tail); the full log-sum-exp is rebuilt from the tail's and the top-k's.
    """
    live = d > 0
    # rows without distillation may carry arbitrary (even repeated) ids: give them distinct ones, their KL is 0
    ids = torch.where(live[:, None], ids, torch.arange(ids.shape[1], device=ids.device))
    lp = torch.where(live[:, None], lp, 0.0)
    picked = logits.gather(1, t[:, None])[:, 0]
    z_s = logits.gather(1, ids)
    logits.scatter_(1, ids, float("-inf"))
    m = logits.amax(1)
    m = torch.where(torch.isfinite(m), m, 0.0)  # empty tail (k = V): keep exp() of the buffer at 0
    tail = logits.sub_(m[:, None]).exp_()
    s = tail.sum(1)
    lse_rest = m + s.log()
    lse = torch.logaddexp(torch.logsumexp(z_s, 1), lse_rest)
    log_q_s = z_s - lse[:, None]
    log_rq = lse_rest - lse
    p = lp.exp()
    mass = p.sum(1)
    r_p = torch.where(s > 0, (1.0 - mass).clamp(min=0.0), 0.0)  # no tail: the rest bucket is dropped
    rest = torch.where(r_p > 0, r_p * (r_p.clamp(min=torch.finfo(r_p.dtype).tiny).log() - log_rq), 0.0)
    kl = torch.where(live, (p * (lp - log_q_s)).sum(1) + rest, 0.0)
    total = ((lse - picked) * w).sum() + (kl * d).sum()
    if need_grad:
        coef = w + d * (mass + r_p)  # multiplies q_j in every entry
        tail_coef = torch.where(s > 0, (coef * log_rq.exp() - d * r_p) / s.clamp(min=torch.finfo(s.dtype).tiny), 0.0)
        g = tail.mul_(tail_coef[:, None])  # j not in S: (coef r_q - d r_p) q_j / r_q, and q_j / r_q = tail_j / s
        g.scatter_(1, ids, coef[:, None] * log_q_s.exp() - d[:, None] * p)
        g[torch.arange(g.shape[0], device=g.device), t] -= w
    return total


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weights, ignore_index, chunk_size, divisor,
                distill_ids=None, distill_logprobs=None, distill_weights=None):
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 softmax for half inputs, fp64 stays fp64
        valid = target != ignore_index
        w_tok = valid.to(acc)
        if token_weights is not None:
            w_tok = w_tok * token_weights.to(acc)
        d_tok = distill_weights.to(acc) if distill_ids is not None else None
        needs = ctx.needs_input_grad
        grad_h = torch.zeros_like(hidden) if needs[0] else None
        grad_w = torch.zeros_like(weight, dtype=acc) if needs[1] else None  # fp32 (or fp64) accumulation
        grad_b = torch.zeros_like(bias, dtype=acc) if bias is not None and needs[2] else None
        need_grad = grad_h is not None or grad_w is not None or grad_b is not None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        safe_target = target.clamp(min=0)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end]
            logits = (h @ weight.t()).to(acc)
            if bias is not None:
                logits = logits + bias.to(acc)
            t, w = safe_target[start:end], w_tok[start:end]
            if d_tok is not None and bool((d_tok[start:end] > 0).any()):
                total = total + _ce_kl_chunk(logits, t, w, distill_ids[start:end].long(),
                                             distill_logprobs[start:end].to(acc), d_tok[start:end], need_grad)
            else:
                total = total + _ce_chunk(logits, t, w, need_grad)
            if not need_grad:
                continue
            g = logits  # now the gradient w.r.t. the chunk's logits
            if grad_h is not None:
                grad_h[start:end] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(g.t(), h.to(acc))  # in place: a product temp would be a second vocab x hidden
            if grad_b is not None:
                grad_b += g.sum(0)
            del logits, g
        scale = 1.0 / divisor if divisor is not None else 1.0
        # scale in place and cast only when needed: a second vocab x hidden buffer would double the head's cost
        ctx.grads = tuple(None if g is None else g.mul_(scale).to(p.dtype)
                          for g, p in ((grad_h, hidden), (grad_w, weight), (grad_b, bias)))
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.grads
        ctx.grads = None
        unit = grad_out.numel() == 1 and float(grad_out) == 1.0  # the usual loss.backward(): no extra copy
        gh, gw, gb = (None if g is None else (g if unit else g.mul_(grad_out.to(g.dtype))) for g in grads)
        return gh, gw, gb, None, None, None, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    num_items: int | torch.Tensor | None = None,
    distill_ids: torch.Tensor | None = None,
    distill_logprobs: torch.Tensor | None = None,
    distill_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `target`, computed `chunk_size` rows at a time.

    Equals `F.cross_entropy(hidden @ weight.T + bias, target, ignore_index=ignore_index)` (values and gradients)
    without materialising the logits. With `token_weights` w the loss is ``sum_i w_i CE_i / sum_i w_i`` over
    non-ignored tokens (mean) or ``sum_i w_i CE_i`` (sum).

    With base-model targets (`distill_ids`, `distill_logprobs`) the loss becomes
    ``(sum_i w_i CE_i + sum_i d_i KL_k,i) / divisor`` with KL_k the top-k + rest estimator of
    `hf_cpt.base_targets.topk_kl` and the same divisor as the cross-entropy alone (``sum_i w_i`` for mean, `num_items`,
    or 1 for sum), so a distillation weight d is measured in units of one token's CE. Only if no token has a CE
    weight does mean divide by the number of distilled tokens instead. Gradients stay exact and chunked.

    Args:
        hidden: `(..., H)` hidden states (flattened to `(N, H)`).
        weight: `(V, H)` output head.
        target: `(...)` token ids, `ignore_index` where no loss is wanted.
        bias: optional `(V,)` head bias.
        token_weights: optional per-token weights shaped like `target`.
        reduction: `mean` or `sum`.
        chunk_size: rows per chunk; peak extra memory is about `chunk_size x V` floats plus the head's gradient.
            None: `N / ceil(V / H)` rows (a chunk's logits about the size of the hidden states), clamped to
            [128, 1024] so CPU matmuls stay efficient.
        num_items: divide the sum by this instead (the Trainer's `num_items_in_batch` under gradient
            accumulation).
        distill_ids: optional `target.shape + (k,)` base top-k token ids (distinct per token, as `topk` returns).
        distill_logprobs: base log-probabilities of those ids, same shape; required with `distill_ids`.
        distill_weights: per-token distillation weights shaped like `target` (0: no distillation); independent of
            `ignore_index`, so zero them on padding. Default with targets: 1 on every non-ignored token.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be an integer >= 1 or None, got {chunk_size!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    if chunk_size is None:
        vocab, dim = weight.shape
        chunk_size = min(max(h.shape[0] // -(-vocab // dim), 128), 1024)
    t = target.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"`target` has {t.shape[0]} tokens but `hidden` has {h.shape[0]} rows")
    tw = token_weights.reshape(-1) if token_weights is not None else None
    ids, lps, dw = _check_distill(target, weight.shape[0], ignore_index, distill_ids, distill_logprobs,
                                  distill_weights)
    if num_items is not None:
        divisor = float(num_items)
    elif reduction == "mean":
        valid = (t != ignore_index).float()
        denom = float((valid * tw.float()).sum() if tw is not None else valid.sum())
        if denom == 0 and dw is not None:
            denom = float((dw > 0).sum())
        divisor = max(denom, 1e-12)
    else:
        divisor = None
    return _ChunkedLinearCrossEntropy.apply(h, weight, bias, t, tw, ignore_index, chunk_size, divisor, ids, lps, dw)


def _check_distill(target, vocab, ignore_index, ids, logprobs, weights):
    """Flattened (ids, logprobs, weights) or (None, None, None), after shape checks."""
    if ids is None and logprobs is None:
        if weights is not None:
            raise ValueError("`distill_weights` needs `distill_ids` and `distill_logprobs`")
        return None, None, None
    if ids is None or logprobs is None:
        raise ValueError("`distill_ids` and `distill_logprobs` must be given together")
    k = ids.shape[-1]
    if tuple(ids.shape) != (*target.shape, k) or logprobs.shape != ids.shape:
        raise ValueError(f"`distill_ids` and `distill_logprobs` must have the target's shape + (k,) = "
                         f"{(*target.shape, k)}, got {tuple(ids.shape)} and {tuple(logprobs.shape)}")
    if not 1 <= k <= vocab:
        raise ValueError(f"`distill_ids`: k = {k} top ids per token, must be in [1, {vocab}] (the vocabulary)")
    if weights is None:
        weights = (target != ignore_index).float()
    elif weights.shape != target.shape:
        raise ValueError(f"`distill_weights` must have the target's shape {tuple(target.shape)}, "
                         f"got {tuple(weights.shape)}")
    return ids.reshape(-1, k), logprobs.reshape(-1, k), weights.reshape(-1)


# --- model glue -----------------------------------------------------------------------------------------------------
def supports_chunked_loss(model: torch.nn.Module) -> str | None:
    """None if `apply_chunked_loss` can serve `model`, else the reason it cannot."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        return "the model soft-caps its logits (e.g. Gemma 2), which the chunked loss does not reproduce"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    if not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no decoder + output head (is it a causal LM?)"
    try:
        model.get_decoder()
    except (AttributeError, NotImplementedError):
        return f"{type(model).__name__} exposes no decoder"
    if getattr(model.get_output_embeddings(), "weight", None) is None:
        return "the output head has no weight"
    return None


def _chunked_forward(self, input_ids=None, attention_mask=None, labels=None, token_weights=None,
                     num_items_in_batch=None, base_topk_ids=None, base_topk_logprobs=None, distill_weights=None,
                     **kwargs):
    if labels is None:  # generation / logits for a monitor: the model's own forward; distill keys are loss-only
        return forward_patch(self).original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    outputs = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs[0]
    head = self.get_output_embeddings()
    # causal shift: position i predicts token i+1; weights follow the predicted token, base targets the position
    shift_h = hidden[:, :-1, :]
    shift_t = labels[:, 1:].to(hidden.device)
    shift_w = token_weights[:, 1:].to(hidden.device) if token_weights is not None else None
    distill = {}
    if base_topk_ids is not None or base_topk_logprobs is not None:
        distill = {
            "distill_ids": None if base_topk_ids is None else base_topk_ids[:, :-1].to(hidden.device),
            "distill_logprobs": None if base_topk_logprobs is None else base_topk_logprobs[:, :-1].to(hidden.device),
            "distill_weights": None if distill_weights is None else distill_weights[:, 1:].to(hidden.device),
        }
    loss = _head_loss_method(head)(
        shift_h, shift_t, token_weights=shift_w, chunk_size=forward_patch(self).options["chunk_size"],
        num_items=num_items_in_batch,
        reduction="sum" if num_items_in_batch is not None else "mean", **distill,
    )
    return CausalLMOutputWithPast(loss=loss, logits=None)  # a training forward: no cache to hand back


def _head_loss(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """[`chunked_linear_cross_entropy`] with `head`'s weight and bias (bound to the head as a method)."""
    return chunked_linear_cross_entropy(hidden, head.weight, target, bias=getattr(head, "bias", None), **kwargs)


def _head_loss_method(head: torch.nn.Module) -> Any:
    """How to run the head's loss. An output head that is an FSDP2 unit of its own is only gathered, and its
    gradient reduce-scattered, around a call FSDP knows; reading `head.weight` from outside would meet its shard.
    So the loss becomes one of the head's FSDP forward methods (`register_fsdp_forward_method`, once per head)."""
    from .utils import is_fsdp2_module

    if not is_fsdp2_module(head):
        return functools.partial(_head_loss, head)
    if not hasattr(head, "_hf_cpt_head_loss"):
        from torch.distributed.fsdp import register_fsdp_forward_method

        head._hf_cpt_head_loss = types.MethodType(_head_loss, head)
        register_fsdp_forward_method(head, "_hf_cpt_head_loss")
    return head._hf_cpt_head_loss


def apply_chunked_loss(model: torch.nn.Module, chunk_size: int | None = None) -> torch.nn.Module:
    """Make `model.forward(..., labels=...)` use [`chunked_linear_cross_entropy`] (returns no logits then).

    Also accepts `token_weights` (batch x seq, e.g. from the lexicon/LEM causal collators), the Trainer's
    `num_items_in_batch`, and distillation targets (see `hf_cpt.base_targets`): `base_topk_ids` and
    `base_topk_logprobs` (batch x seq x k, the base model's top-k at every position, i.e. predicting the next
    token, unshifted like `input_ids`) with optional `distill_weights` (batch x seq, aligned like `labels` and
    `token_weights`: the weight of predicting that token; default 1 on every labelled token). Without labels the
    model behaves as before (the distillation keys are ignored). Idempotent.

    Raises:
        ValueError: if the model is not a supported causal LM (see [`supports_chunked_loss`]).
    """
    reason = supports_chunked_loss(model)
    if reason is None and lm_head_has_lora(model):
        reason = ("a LoRA adapter wraps the output head and the chunked loss reads `lm_head.weight` directly, so "
                  "the adapter would get no gradient: train the head with `modules_to_save` or drop it from "
                  "`target_modules`")
    if reason:
        raise ValueError(f"cannot use the chunked loss: {reason}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be an integer >= 1 or None (auto), got {chunk_size!r}")
    # the one change to the model, recorded on it (`model.hf_cpt_forward_patch`) and undone by remove_chunked_loss
    patch_forward(model, CHUNKED_LOSS, _chunked_forward, chunk_size=chunk_size)
    return model


def remove_chunked_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Undo [`apply_chunked_loss`]: the model's own forward again."""
    unpatch_forward(model, CHUNKED_LOSS)
    return model


def lm_head_has_lora(model: Any) -> bool:
    """True when a PEFT LoRA adapter wraps the output head: a fused/chunked loss reading `lm_head.weight`
    directly would silently skip the adapter (no gradient reaches it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and any(hasattr(head, a) for a in ("lora_A", "lora_embedding_A", "base_layer"))
