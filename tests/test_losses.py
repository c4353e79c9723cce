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
