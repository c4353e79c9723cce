import pytest
import torch

from hf_cpt.base_targets import (
    compute_base_targets,
    evaluate_kl,
    make_frozen_copy,
    top1_agreement,
    topk_kl,
    topk_targets,
)
from hf_cpt.losses import apply_chunked_loss
from hf_cpt.testing import make_tiny_llama


def naive_topk_parts(p_logits, q_logits, k):
    """p, q (full softmax), the top-k mask of p, and KL_k built from explicit sums (tail sums, not 1 - sum)."""
    p = torch.softmax(p_logits, -1)
    q = torch.softmax(q_logits, -1)
    top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, p.topk(k, -1).indices, True)
    r_p = (p * ~top).sum(-1)
    r_q = (q * ~top).sum(-1)
    head = torch.where(top, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)
    rest = torch.where(r_p > 0, r_p * (r_p.log() - r_q.log()), torch.zeros_like(r_p))
    return p, q, top, head + rest


def fp64_targets(p_logits, k):
    lp, ids = torch.log_softmax(p_logits, -1).topk(k, -1)
    return ids, lp


@pytest.mark.parametrize("shape", [(1,), (37,), (3, 5)])
def test_kl_with_k_equal_vocab_is_the_full_kl(shape):
    g = torch.Generator().manual_seed(len(shape))
    V = 53
    p_logits = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 3
    q_logits = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 3
    ids, lp = fp64_targets(p_logits, V)
    p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
    full = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(topk_kl(q_logits, ids, lp, reduction="none"), full)
    torch.testing.assert_close(topk_kl(q_logits, ids, lp), full.mean())
    torch.testing.assert_close(topk_kl(q_logits, ids, lp, reduction="sum"), full.sum())


@pytest.mark.parametrize("k", [1, 3, 10, 52])
def test_topk_kl_is_a_lower_bound_with_the_documented_gap(k):
    g = torch.Generator().manual_seed(k)
    V = 53
    p_logits = torch.randn(37, V, generator=g, dtype=torch.float64) * 2
    q_logits = torch.randn(37, V, generator=g, dtype=torch.float64) * 2
    ids, lp = fp64_targets(p_logits, k)
    ours = topk_kl(q_logits, ids, lp, reduction="none")
    p, q, top, naive = naive_topk_parts(p_logits, q_logits, k)
    torch.testing.assert_close(ours, naive)
    full = (p * (p.log() - q.log())).sum(-1)
    assert (ours <= full + 1e-12).all() and (ours >= -1e-12).all()
    # the gap is exactly r_p * KL(p_tail / r_p || q_tail / r_q)
    r_p = (p * ~top).sum(-1, keepdim=True)
    r_q = (q * ~top).sum(-1, keepdim=True)
    pt, qt = p / r_p, q / r_q
    tail_kl = torch.where(~top, pt * (pt.log() - qt.log()), torch.zeros_like(p)).sum(-1)
    torch.testing.assert_close(full - ours, r_p[:, 0] * tail_kl)
    assert (full - ours <= r_p[:, 0] * tail_kl + 1e-12).all()


def test_topk_kl_is_stable_when_the_tail_is_tiny_and_differentiable():
    V, k = 50, 5
    q_logits = torch.zeros(2, V, dtype=torch.float32)
    q_logits[:, :k] = 40.0  # the student's tail mass ~ 1e-16: 1 - sum(q_top) would round to 0 in fp32
    p_logits = q_logits.clone()
    p_logits[:, :k] = 20.0
    ids, lp = topk_targets(p_logits, k)
    ours = topk_kl(q_logits.requires_grad_(), ids, lp, reduction="none")
    _, _, _, ref = naive_topk_parts(p_logits.double(), q_logits.detach().double(), k)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4)
    ours.sum().backward()
    assert torch.isfinite(q_logits.grad).all()


def test_topk_targets_and_top1_agreement():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 29, generator=g)
    ids, lp = topk_targets(logits, 5)
    assert ids.dtype == torch.int32 and lp.dtype == torch.float32 and ids.shape == (4, 7, 5)
    ref_lp, ref_ids = torch.log_softmax(logits, -1).sort(-1, descending=True)
    torch.testing.assert_close(lp, ref_lp[..., :5])
    assert torch.equal(ids.long(), ref_ids[..., :5])
    student = torch.randn(4, 7, 29, generator=g)
    student[0] = logits[0]  # row 0 agrees everywhere
    naive = [float(student[i, j].argmax() == logits[i, j].argmax()) for i in range(4) for j in range(7)]
    torch.testing.assert_close(top1_agreement(student, ids), torch.tensor(sum(naive) / len(naive)))
    mask = torch.zeros(4, 7)
    mask[0] = 1
    assert float(top1_agreement(student, ids, mask=mask)) == 1.0
    with pytest.raises(ValueError, match="`k` must be an integer in \\[1, 29\\]"):
        topk_targets(logits, 30)
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        topk_kl(student, ids, lp, reduction="avg")


@pytest.fixture
def base_and_student(tiny_tokenizer):
    V = len(tiny_tokenizer)
    base = make_tiny_llama(V, seed=1)
    student = make_tiny_llama(V, seed=2)
    ids = torch.randint(2, V, (3, 11), generator=torch.Generator().manual_seed(0))
    return base, student, ids


def test_compute_base_targets_matches_full_logits_and_restores_train_mode(base_and_student):
    base, _, ids = base_and_student
    base.train()
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    out = compute_base_targets(base, ids, k=6, batch_size=2, attention_mask=mask, chunk_tokens=5)
    assert base.training
    with torch.no_grad():
        base.eval()
        ref_ids, ref_lp = topk_targets(base(input_ids=ids, attention_mask=mask).logits, 6)
    assert out["ids"].shape == (3, 11, 6) and out["ids"].dtype == torch.int32
    torch.testing.assert_close(out["logprobs"], ref_lp, atol=1e-5, rtol=1e-5)
    assert (out["ids"] == ref_ids).float().mean() > 0.99  # ties in fp32 may swap near-equal ids


@pytest.mark.parametrize("patched", [False, True])
def test_evaluate_kl_on_plain_and_patched_models(base_and_student, patched):
    base, student, ids = base_and_student
    t = compute_base_targets(base, ids, k=8)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    if patched:
        apply_chunked_loss(student, chunk_size=4)
    res = evaluate_kl(student, ids, t["ids"], t["logprobs"], batch_size=2, attention_mask=mask, chunk_tokens=7)
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=mask).logits
    assert logits is not None
    torch.testing.assert_close(res["kl"], float(topk_kl(logits, t["ids"], t["logprobs"], mask=mask)), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(res["top1_agree"], float(top1_agreement(logits, t["ids"], mask=mask)))
    assert res["kl"] > 1e-5  # random tiny models are near-uniform, yet different
    # against itself the KL is 0 and the top-1 always agrees
    same = evaluate_kl(base, ids, t["ids"], t["logprobs"], attention_mask=mask)
    assert abs(same["kl"]) < 1e-5 and same["top1_agree"] == 1.0


def test_frozen_copy_is_frozen_and_independent(base_and_student):
    base, _, ids = base_and_student
    apply_chunked_loss(base)
    frozen = make_frozen_copy(base)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    before = compute_base_targets(frozen, ids, k=4)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(1.0)
    after = compute_base_targets(frozen, ids, k=4)
    torch.testing.assert_close(before["logprobs"], after["logprobs"])
    assert frozen(input_ids=ids, labels=ids).logits is None  # the chunked-loss patch follows the copy
