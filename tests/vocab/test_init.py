"""Embedding initialisers against naive references of their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from hf_cpt.vocab.init import (
    EMBEDDING_INITS,
    factorize_embeddings,
    init_mean,
    init_ofa,
    init_random,
    init_subword_mean,
)


def naive_ofa(old, src, tgt, k, temperature, basis=None, primitives=None):
    """Direct transcription: per new token, cosine to every covered old token, top-k, softmax(sim/T), sum."""
    basis = old.double() if basis is None else basis
    rows = []
    for v in tgt.double():
        if float(v.abs().sum()) == 0:
            rows.append(None)
            continue
        sims = []
        for j, u in enumerate(src.double()):
            if float(u.abs().sum()) == 0:
                continue
            sims.append((float(v @ u) / (float(v.norm()) * float(u.norm())), j))
        top = sorted(sims, reverse=True)[:k]
        z = sum(math.exp(s / temperature) for s, _ in top)
        row = sum((math.exp(s / temperature) / z) * basis[j] for s, j in top)
        rows.append(row @ primitives if primitives is not None else row)
    return rows


@pytest.mark.parametrize("rank", [None, 3])
def test_ofa_equals_naive_reference(rank):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(37, 6, generator=g)
    src = torch.randn(37, 5, generator=g)
    src[[3, 11]] = 0  # old tokens no word covers: never neighbours
    tgt = torch.randn(9, 5, generator=g)
    tgt[4] = 0  # an uncovered new token: takes the fallback row
    fallback = torch.full((9, 6), 7.0)
    got = init_ofa(old, src, tgt, top_k=4, temperature=0.1, rank=rank, fallback=fallback)
    if rank is None:
        ref = naive_ofa(old, src, tgt, 4, 0.1)
    else:
        coords, prim = factorize_embeddings(old, rank)
        ref = naive_ofa(old, src, tgt, 4, 0.1, basis=coords, primitives=prim)
    for i, r in enumerate(ref):
        expected = fallback[i] if r is None else r.float()
        torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-5)
    assert got.dtype == old.dtype


def test_ofa_defaults_are_the_papers():
    import inspect

    sig = inspect.signature(init_ofa)
    assert sig.parameters["top_k"].default == 10 and sig.parameters["temperature"].default == 0.1


def test_ofa_low_temperature_picks_the_nearest_row():
    old = torch.eye(4)
    src = torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0.7, 0.7]])
    tgt = torch.tensor([[0.1, 1.0]])
    out = init_ofa(old, src, tgt, top_k=4, temperature=1e-4)
    torch.testing.assert_close(out[0], old[1])


def test_factorization_reconstructs_at_full_rank():
    m = torch.randn(20, 8, dtype=torch.float64)
    c, p = factorize_embeddings(m, 8)
    torch.testing.assert_close(c @ p, m)
    with pytest.raises(ValueError, match="`rank`"):
        factorize_embeddings(m, 9)


def test_subword_mean_is_the_mean_of_pieces():
    old = torch.randn(10, 4)
    out = init_subword_mean(old, [[1, 2], [5], [0, 0, 9]])
    torch.testing.assert_close(out[0], (old[1] + old[2]) / 2)
    torch.testing.assert_close(out[1], old[5])
    torch.testing.assert_close(out[2], (2 * old[0] + old[9]) / 3)


def test_mean_and_random_statistics():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(2000, 8, generator=g) * torch.linspace(0.1, 2, 8) + 3.0
    m = init_mean(old, 500, generator=g)
    torch.testing.assert_close(m.mean(0), old.mean(0), atol=0.05, rtol=0)
    assert float((m - old.mean(0)).abs().max()) < 0.05  # hugs the mean: covariance scaled down
    r = init_random(old, 4000, generator=g)
    torch.testing.assert_close(r.std(0), old.std(0), rtol=0.08, atol=0)
    r2 = init_random(old, 4000, std=0.02, generator=g)
    assert abs(float(r2.std()) - 0.02) < 0.002 and abs(float(r2.mean())) < 0.002


def test_registry_dispatches():
    """`extend_model` calls the registry entry: each produces [n_new, d] rows from `InitInputs`."""
    from hf_cpt.vocab.init import InitInputs

    assert set(EMBEDDING_INITS) == {"distill", "ofa", "subword_mean", "mean", "random"}
    g = torch.Generator().manual_seed(0)
    old = torch.randn(20, 4, generator=g)
    x = InitInputs(old=old, n_new=3, pieces=[[1, 2], [3], [4, 5, 6]], generator=g, role="output")
    torch.testing.assert_close(EMBEDDING_INITS["subword_mean"].rows(x), init_subword_mean(old, x.pieces))
    # distill's output-role rows (untied heads) are the subword means: it learns input rows only
    torch.testing.assert_close(EMBEDDING_INITS["distill"].rows(x), init_subword_mean(old, x.pieces))
    assert EMBEDDING_INITS["random"].rows(x).shape == (3, 4)
    assert EMBEDDING_INITS["distill"].needs_contexts and EMBEDDING_INITS["ofa"].needs_vectors
