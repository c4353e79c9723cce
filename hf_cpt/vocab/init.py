"""Initialisers for new embedding rows: pure functions on tensors, in the `EMBEDDING_INITS` registry.

OFA ("OFA: A Framework of Initializing Unseen Subword Embeddings for Efficient Large-scale Multilingual Continued
Pretraining", Liu et al., 2024). Every subword, old and new, gets a vector in an external word-vector space (the mean
of the vectors of the words it appears in). A new subword's embedding is then a convex combination of the
embeddings of its `top_k` most similar old subwords in that space:

    e_new = sum_{j in topk(cos(v_new, v_j))} softmax_j(cos(v_new, v_j) / temperature) * E_old[j]

with `top_k=10`, `temperature=0.1` as in the paper. New subwords no word vector covers fall back (the reference
draws them from N(mean, std) of the old rows; `fallback=` lets a caller use subword means instead). With
`rank=r` the combination is taken over the rank-r factorisation E_old ~ C P (SVD: C = U_r, P = S_r V_r^T) and
multiplied back to full rows C_new P. In the paper the factorisation is a parameter saving because the model keeps
C and P as separate (trained) matrices; here the checkpoint stays a stock full-rank embedding matrix, so `rank`
saves *no* parameters or memory: it only projects the new rows onto the top-r directions of the old matrix (a
smoothing of the rows).

`distill` (Token Distillation, Dobler et al., ICLR 2026; distill.py) starts from `subword_mean` and learns the
input rows so the model's hidden states with the new token match those of the old segmentation.

Alternatives: `subword_mean` (FVT: mean of the old rows of the pieces the old tokenizer splits the new token
into), `mean` (Hewitt 2021: the old rows' mean, perturbed within their covariance), `random` (normal noise of the
old rows' scale: the usual baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class InitInputs:
    """What an initialiser may read for one embedding matrix (`extend_model` fills it).

    Attributes:
        old: the matrix's old rows [V, d].
        n_new: rows to produce.
        role: `input` or `output` (an untied head's own matrix).
        pieces: each new token's ids under the old tokenizer (or None when the init does not need them).
        generator: seeded random draws.
        std: the model's `initializer_range`.
        source_vectors / target_vectors: OFA's word-space vectors of the old / new tokens.
        model / contexts: the live model and `DistillContext` snippets (Token Distillation).
        options: `top_k`, `temperature`, `rank`, `ofa_fallback`, `distill_*`, `seed`.
        stats: where an init reports what it measured (merged into `extend_model`'s summary).
    """

    old: torch.Tensor
    n_new: int
    role: str = "input"
    pieces: list[list[int]] | None = None
    generator: torch.Generator | None = None
    std: float | None = None
    source_vectors: torch.Tensor | None = None
    target_vectors: torch.Tensor | None = None
    model: Any = None
    contexts: Sequence[Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EmbeddingInit:
    """A registered initialiser: `rows(inputs) -> [n_new, d]` and what it needs from `extend_model`."""

    rows: Callable[[InitInputs], torch.Tensor]
    needs_pieces: bool = False  # the old tokenizer's pieces of each new token
    needs_vectors: bool = False  # external word vectors (OFA)
    needs_contexts: bool = False  # domain snippets and the live model (Token Distillation)


def _ofa_rows(x: InitInputs) -> torch.Tensor:
    o = x.options
    fallback = init_subword_mean(x.old, x.pieces) if o.get("ofa_fallback", "subword_mean") == "subword_mean" else None
    return init_ofa(x.old, x.source_vectors, x.target_vectors, top_k=o.get("top_k", 10),
                    temperature=o.get("temperature", 0.1), rank=o.get("rank"), fallback=fallback,
                    generator=x.generator)


def _distill_rows(x: InitInputs) -> torch.Tensor:
    start = init_subword_mean(x.old, x.pieces)
    if x.role != "input":
        # Token Distillation learns input rows; an untied head's rows stay at the subword mean (the reference learns
        # them by next-token prediction instead, which is what continual pretraining then does anyway)
        return start
    from .token_distillation import init_distill

    o = x.options
    rows, stats = init_distill(x.model, x.old, start, x.contexts, steps=o.get("distill_steps", 1),
                               lr=o.get("distill_lr", 1e-3), batch_size=o.get("distill_batch_size", 16),
                               layer=o.get("distill_layer", -1), seed=o.get("seed", 0),
                               precision=o.get("distill_precision", "auto"),
                               progress=o.get("progress", True))
    x.stats.update({f"distill_{k}": v for k, v in stats.items()})
    return rows


EMBEDDING_INITS: dict[str, EmbeddingInit] = {
    "distill": EmbeddingInit(_distill_rows, needs_pieces=True, needs_contexts=True),
    "ofa": EmbeddingInit(_ofa_rows, needs_pieces=True, needs_vectors=True),
    "subword_mean": EmbeddingInit(lambda x: init_subword_mean(x.old, x.pieces), needs_pieces=True),
    "mean": EmbeddingInit(lambda x: init_mean(x.old, x.n_new, generator=x.generator)),
    "random": EmbeddingInit(lambda x: init_random(x.old, x.n_new, std=x.std, generator=x.generator)),
}
