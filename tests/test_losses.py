import pytest
import torch
import torch.nn.functional as F

from hf_cpt.losses import apply_chunked_loss, chunked_linear_cross_entropy, remove_chunked_loss
from hf_cpt.testing import make_tiny_llama


def reference(h, w, t, b=None, tw=None, ignore=-100, reduction="mean"):
    logits = h.reshape(-1, h.shape[-1]) @ w.t()
    if b is not None:
        logits = logits + b
    per = F.cross_entropy(logits, t.reshape(-1), ignore_index=ignore, reduction="none")
    weights = (t.reshape(-1) != ignore).to(logits.dtype)
    if tw is not None:
        weights = weights * tw.reshape(-1)
    total = (per * weights).sum()
    return total / weights.sum() if reduction == "mean" else total


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 33)])
@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_full_logits_cross_entropy_values_and_gradients(shape, chunk, bias, weighted, reduction):
    g = torch.Generator().manual_seed(sum(shape) + chunk)
    V, H = 37, 11
    h = torch.randn(*shape, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, V, shape, generator=g)
    t.view(-1)[::3] = -100  # ignored positions
    if (t != -100).sum() == 0:
        t.view(-1)[0] = 1
    tw = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    ours = chunked_linear_cross_entropy(h, w, t, bias=b, token_weights=tw, reduction=reduction, chunk_size=chunk)
    ref = reference(h, w, t, b, tw, reduction=reduction)
    torch.testing.assert_close(ours, ref.to(ours.dtype))
    params = [h, w] + ([b] if bias else [])
    g_ours = torch.autograd.grad(ours * 1.7, params)
    g_ref = torch.autograd.grad(ref * 1.7, params)
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r)


def test_num_items_divides_the_sum_like_the_trainer_does():
    h, w = torch.randn(2, 5, 4), torch.randn(9, 4)
    t = torch.randint(0, 9, (2, 5))
    ours = chunked_linear_cross_entropy(h, w, t, reduction="sum", num_items=7)
    torch.testing.assert_close(ours, reference(h, w, t, reduction="sum") / 7)


def test_model_patch_gives_the_models_own_loss_and_gradients(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    ids = torch.randint(2, len(tiny_tokenizer), (2, 13))
    labels = ids.clone()
    labels[0, :4] = -100
    ref = model(input_ids=ids, labels=labels)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    apply_chunked_loss(apply_chunked_loss(model, chunk_size=5), chunk_size=5)  # idempotent
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss)
    for a, r in zip(torch.autograd.grad(out.loss, list(model.parameters())), ref_grads):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)
    assert model(input_ids=ids).logits.shape == (2, 13, len(tiny_tokenizer))  # no labels: unchanged
    remove_chunked_loss(model)
    assert model(input_ids=ids, labels=labels).logits is not None


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="`chunk_size` must be an integer >= 1"):
        chunked_linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long),
                                     chunk_size=0)
    with pytest.raises(ValueError, match="`target` has 3 tokens but `hidden` has 2 rows"):
        chunked_linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot use the chunked loss: .*causal LM"):
        apply_chunked_loss(torch.nn.Linear(2, 2))


# --- distillation in the chunked loss -------------------------------------------------------------------------------
def naive_topk_kl(logits, ids, lp):
    """KL_k from full softmax with autograd: explicit tail sums (the estimator of hf_cpt.base_targets)."""
    logq = torch.log_softmax(logits, -1)
    q = logq.exp()
    top = torch.zeros_like(q, dtype=torch.bool).scatter(-1, ids, True)
    p = lp.exp()
    r_p = (1 - p.sum(-1)).clamp(min=0)
    r_q = (q * ~top).sum(-1)
    head = (p * (lp - logq.gather(-1, ids))).sum(-1)
    rest = torch.where(r_p > 0, r_p * (r_p.clamp(min=1e-300).log() - r_q.clamp(min=1e-300).log()),
                       torch.zeros_like(r_p))
    return head + rest


def distill_reference(h, w, t, ids, lp, d, b=None, tw=None, ignore=-100, reduction="mean", num_items=None):
    logits = h.reshape(-1, h.shape[-1]) @ w.t()
    if b is not None:
        logits = logits + b
    flat_t = t.reshape(-1)
    per = F.cross_entropy(logits, flat_t, ignore_index=ignore, reduction="none")
    weights = (flat_t != ignore).to(logits.dtype)
    if tw is not None:
        weights = weights * tw.reshape(-1)
    k = ids.shape[-1]
    kl = naive_topk_kl(logits, ids.reshape(-1, k).long(), lp.reshape(-1, k))
    dd = d.reshape(-1)
    total = (per * weights).sum() + torch.where(dd > 0, kl * dd, torch.zeros_like(kl)).sum()
    if num_items is not None:
        return total / num_items
    return total / weights.sum() if reduction == "mean" else total


@pytest.mark.parametrize("k", [1, 6, 53])
@pytest.mark.parametrize("chunk", [1, 7, 100])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("divide", ["mean", "sum", "num_items"])
def test_distillation_loss_and_gradients_match_autograd(k, chunk, bias, weighted, divide):
    g = torch.Generator().manual_seed(k * 1000 + chunk)
    N, V, H = 37, 53, 11
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100
    base_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    lp, ids = torch.log_softmax(base_logits, -1).topk(k, -1)
    d = torch.rand(N, generator=g, dtype=torch.float64) + 0.25
    d[::3] = 0.0  # tokens without distillation ...
    junk_ids, junk_lp = ids.clone(), lp.clone()
    junk_ids[::3] = 0  # ... may carry meaningless (repeated) ids
    junk_lp[::3] = float("nan")
    tw = torch.rand(N, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    kw = dict(bias=b, token_weights=tw, chunk_size=chunk)
    if divide == "num_items":
        kw.update(reduction="sum", num_items=19)
    else:
        kw.update(reduction=divide)
    ours = chunked_linear_cross_entropy(h, w, t, distill_ids=junk_ids.int(), distill_logprobs=junk_lp,
                                        distill_weights=d, **kw)
    ref = distill_reference(h, w, t, ids, lp, d, b, tw, reduction=kw["reduction"], num_items=kw.get("num_items"))
    torch.testing.assert_close(ours, ref)
    params = [h, w] + ([b] if bias else [])
    for a, r in zip(torch.autograd.grad(ours * 1.3, params), torch.autograd.grad(ref * 1.3, params)):
        torch.testing.assert_close(a, r)


def test_zero_distill_weights_give_the_plain_cross_entropy():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(2, 9, 6, generator=g), torch.randn(31, 6, generator=g)
    t = torch.randint(0, 31, (2, 9), generator=g)
    lp, ids = torch.log_softmax(torch.randn(2, 9, 31, generator=g), -1).topk(4, -1)
    plain = chunked_linear_cross_entropy(h, w, t, chunk_size=5)
    zero = chunked_linear_cross_entropy(h, w, t, chunk_size=5, distill_ids=ids, distill_logprobs=lp,
                                        distill_weights=torch.zeros(2, 9))
    torch.testing.assert_close(zero, plain)
    default = chunked_linear_cross_entropy(h, w, t, chunk_size=5, distill_ids=ids, distill_logprobs=lp)
    ref = distill_reference(h, w, t, ids, lp, torch.ones(2, 9))
    torch.testing.assert_close(default, ref)
    assert default > plain


def test_distillation_in_fp32_with_a_peaked_student_stays_finite():
    # student tail mass ~ e^-60: r_q computed as 1 - sum(q_top) would be 0 in fp32 and log r_q = -inf
    V, k = 40, 3
    w = torch.zeros(V, 2)
    w[:k, 0] = 60.0
    h = torch.tensor([[1.0, 0.0], [1.0, 0.5]], requires_grad=True)
    t = torch.tensor([0, 1])
    lp, ids = torch.log_softmax(torch.arange(V, 0, -1).float() / 10, -1).topk(k, -1)
    loss = chunked_linear_cross_entropy(h, w, t, distill_ids=ids.expand(2, k), distill_logprobs=lp.expand(2, k))
    ref = distill_reference(h.double(), w.double(), t, ids.expand(2, k), lp.double().expand(2, k), torch.ones(2))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)
    loss.backward()
    assert torch.isfinite(h.grad).all()


def test_bad_distill_input_is_a_clear_error():
    h, w, t = torch.randn(2, 3), torch.randn(5, 3), torch.zeros(2, dtype=torch.long)
    ids, lp = torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="`distill_ids` and `distill_logprobs` must be given together"):
        chunked_linear_cross_entropy(h, w, t, distill_ids=ids)
    with pytest.raises(ValueError, match="`distill_ids` and `distill_logprobs` must have the target's shape"):
        chunked_linear_cross_entropy(h, w, t, distill_ids=ids[:1], distill_logprobs=lp[:1])
    with pytest.raises(ValueError, match="`distill_weights` must have the target's shape"):
        chunked_linear_cross_entropy(h, w, t, distill_ids=ids, distill_logprobs=lp, distill_weights=torch.ones(3))
    with pytest.raises(ValueError, match="`distill_weights` needs `distill_ids`"):
        chunked_linear_cross_entropy(h, w, t, distill_weights=torch.ones(2))
    with pytest.raises(ValueError, match="`distill_ids`: k = 6"):
        chunked_linear_cross_entropy(h, w, t, distill_ids=torch.zeros(2, 6, dtype=torch.long),
                                     distill_logprobs=torch.zeros(2, 6))


def test_model_patch_with_base_targets_matches_naive(tiny_tokenizer):
    V = len(tiny_tokenizer)
    model = make_tiny_llama(V, seed=3).double()
    base = make_tiny_llama(V, seed=4).double()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, V, (2, 13), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        lp, top = torch.log_softmax(base(input_ids=ids).logits, -1).topk(8, -1)
    dw = torch.ones(2, 13, dtype=torch.float64) * 0.7
    dw[1, 5:9] = 0.0
    # naive: the model's own full logits, shifted, CE + d * KL_k over the same tokens
    logits = model(input_ids=ids).logits[:, :-1]
    eye = torch.eye(V, dtype=torch.float64)  # hidden = logits, head = identity: the reference on full logits
    ref = distill_reference(logits.reshape(-1, V), eye, labels[:, 1:], top[:, :-1], lp[:, :-1], dw[:, 1:])
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    apply_chunked_loss(model, chunk_size=5)
    out = model(input_ids=ids, labels=labels, base_topk_ids=top.int(), base_topk_logprobs=lp,
                distill_weights=dw)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref)
    for a, r in zip(torch.autograd.grad(out.loss, list(model.parameters())), ref_grads):
        torch.testing.assert_close(a, r)
    # the Trainer's num_items_in_batch divides the same sum
    summed = model(input_ids=ids, labels=labels, base_topk_ids=top, base_topk_logprobs=lp, distill_weights=dw,
                   num_items_in_batch=7)
    torch.testing.assert_close(summed.loss * 7, ref * (labels[:, 1:] != -100).sum())
    # without labels: the model's own forward, distillation keys ignored
    assert model(input_ids=ids, base_topk_ids=top, base_topk_logprobs=lp).logits.shape == (2, 13, V)
