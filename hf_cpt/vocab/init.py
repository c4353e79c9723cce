"""Initialisers for new embedding rows: pure functions on tensors, in the `EMBEDDING_INITS` registry.

OFA ("OFA: A Framework of Initializing Unseen Subword Embeddings for Efficient Large-scale Multilingual Continued
Pretraining", Liu et al., 2024). Every subword, old and new, gets a vector in an external word-vector space (the mean
of the vectors of the words it appears in). A new subword's embedding is then a convex combination of the
embeddings of its `top_k` most similar old subwords in that space:

    e_new = sum_{j in topk(cos(v_new, v_j))} softmax_j(cos(v_new, v_j) / temperature) * E_old[j]

with `top_k=10`, `temperature=0.1` as in the paper. New subwords no word vector covers fall back (the reference
draws them from N(mean, std) of the old rows; `fallback=` lets a caller use subword means instead). With
`rank=r` the combination is taken over the rank-r factorisation E_old ~ C P (SVD: C = U_r, P = S_r V_r^T), the
paper's parameter-saving variant; the result is materialised as C_new P so stock transformers loads it.

Alternatives: `subword_mean` (FVT: mean of the old rows of the pieces the old tokenizer splits the new token
into), `mean` (Hewitt 2021: the old rows' mean, perturbed within their covariance), `random` (normal noise of the
old rows' scale: the usual baseline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def factorize_embeddings(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` SVD factorisation `matrix ~ coords @ primitives` (coords: [V, rank], primitives: [rank, d])."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not (1 <= rank <= min(matrix.shape)):
        raise ValueError(f"`rank` must be an integer in [1, {min(matrix.shape)}], got {rank!r}")
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :rank], s[:rank, None] * vh[:rank]


def init_ofa(old: torch.Tensor, source_vectors: torch.Tensor, target_vectors: torch.Tensor, *, top_k: int = 10,
             temperature: float = 0.1, rank: int | None = None, fallback: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """OFA rows for new tokens.

    Args:
        old: old embedding rows [V, d].
        source_vectors: word-space vectors of the old tokens [V, D]; all-zero rows = not covered (never chosen).
        target_vectors: word-space vectors of the new tokens [N, D]; all-zero rows = not covered (fallback).
        top_k: neighbours combined per new token.
        temperature: softmax temperature over the cosine similarities.
        rank: combine in a rank-`rank` factorisation of `old` (None: the full rows).
        fallback: rows [N, d] for uncovered new tokens; default N(mean, std) of `old` per dimension.

    Returns:
        [N, d] rows in `old`'s dtype.
    """
    if source_vectors.shape[0] != old.shape[0]:
        raise ValueError(f"`source_vectors` has {source_vectors.shape[0]} rows for {old.shape[0]} old tokens")
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    if top_k < 1:
        raise ValueError(f"`top_k` must be >= 1, got {top_k}")
    n = target_vectors.shape[0]
    src = torch.nn.functional.normalize(source_vectors.double(), dim=1)
    tgt = torch.nn.functional.normalize(target_vectors.double(), dim=1)
    src_ok = source_vectors.abs().sum(1) > 0
    tgt_ok = target_vectors.abs().sum(1) > 0
    if not bool(src_ok.any()):
        raise ValueError("no old token has a word vector: the word vectors do not cover the old vocabulary")
    if rank is not None:
        coords, primitives = factorize_embeddings(old, rank)
        basis = coords
    else:
        basis, primitives = old.double(), None
    k = min(top_k, int(src_ok.sum()))
    out = torch.empty(n, basis.shape[1], dtype=torch.float64)
    for start in range(0, n, 1024):  # bounded memory: [1024, V] similarities at a time
        sims = tgt[start:start + 1024] @ src.T
        sims[:, ~src_ok] = -torch.inf
        top, idx = sims.topk(k, dim=1)
        weights = torch.softmax(top / temperature, dim=1)
        out[start:start + 1024] = torch.einsum("nk,nkd->nd", weights, basis[idx])
    if primitives is not None:
        out = out @ primitives
    if not bool(tgt_ok.all()):
        if fallback is None:
            fallback = init_random(old, n, generator=generator)
        out[~tgt_ok] = fallback[~tgt_ok].double()
    return out.to(old.dtype)


def init_subword_mean(old: torch.Tensor, pieces: Sequence[Sequence[int]]) -> torch.Tensor:
    """Mean of the old rows of each new token's pieces under the old tokenizer (FVT). `pieces[i]`: old ids."""
    if any(len(p) == 0 for p in pieces):
        raise ValueError("every new token needs at least one old piece")
    flat = torch.tensor([i for p in pieces for i in p], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor([len(p) for p in pieces]))
    sums = torch.zeros(len(pieces), old.shape[1], dtype=torch.float64).index_add_(0, owner, old[flat].double())
    return (sums / torch.tensor([len(p) for p in pieces], dtype=torch.float64)[:, None]).to(old.dtype)


def init_mean(old: torch.Tensor, n_new: int, *, cov_scale: float = 1e-5,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Hewitt's initialisation: the mean of the old rows plus noise drawn within their covariance (scaled by
    `cov_scale`, so new rows stay close to the mean and do not dominate the softmax)."""
    x = old.double()
    mu = x.mean(0)
    centered = x - mu
    cov = centered.T @ centered / max(x.shape[0] - 1, 1)
    # a Cholesky factor of the (slightly regularised) covariance turns N(0, I) draws into N(0, cov)
    chol = torch.linalg.cholesky(cov + 1e-8 * torch.eye(cov.shape[0], dtype=cov.dtype))
    z = torch.randn(n_new, x.shape[1], dtype=torch.float64, generator=generator)
    return (mu + (cov_scale ** 0.5) * z @ chol.T).to(old.dtype)


def init_random(old: torch.Tensor, n_new: int, *, std: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """N(mean, std) per dimension of the old rows (or N(0, `std`) when `std` is given, e.g. `initializer_range`)."""
    x = old.double()
    z = torch.randn(n_new, x.shape[1], dtype=torch.float64, generator=generator)
    if std is not None:
        return (z * std).to(old.dtype)
    return (x.mean(0) + z * x.std(0)).to(old.dtype)


EMBEDDING_INITS = {"ofa": init_ofa, "subword_mean": init_subword_mean, "mean": init_mean, "random": init_random}
