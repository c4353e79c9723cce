"""Deterministic block-level mixing of domain and general (replay) data at a fixed token ratio.

Blocks are packed to the same length, so a share of *blocks* is a share of *tokens*. Block ``i`` (0-based)
comes from the general corpus iff ``floor((i + 1) * r) > floor(i * r)``: after any prefix of ``n`` blocks the
general count is ``floor(n * r)``, i.e. within one block of the exact share, and replay is spread evenly
instead of arriving in bursts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np


def ratio_schedule(num_blocks: int, ratio: float) -> np.ndarray:
    """Boolean mask of length `num_blocks`: True where the block comes from the general corpus."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"`ratio` must be in [0, 1], got {ratio}")
    i = np.arange(num_blocks + 1, dtype=np.float64)
    counts = np.floor(i * ratio + 1e-9)  # epsilon: r=0.3 must give exactly 3 of 10, not 2 by rounding
    return np.diff(counts) > 0


def cycled_indices(length: int, count: int, seed: int) -> np.ndarray:
    """`count` indices into a corpus of `length` blocks: a fresh permutation per pass (epoch)."""
    if length <= 0:
        raise ValueError("cannot draw blocks from an empty corpus")
    rng = np.random.default_rng(seed)
    passes = -(-count // length)
    return np.concatenate([rng.permutation(length) for _ in range(max(passes, 1))])[:count]


def mix_indices(
    num_blocks: int, ratio: float, domain_len: int, general_len: int, seed: int = 0
) -> tuple[np.ndarray, dict[str, int]]:
    """Indices into ``concatenate([domain, general])`` for `num_blocks` mixed blocks, and blocks per source.

    Each corpus is read in a seeded random order and re-permuted when it runs out.
    """
    mask = ratio_schedule(num_blocks, ratio)
    n_general = int(mask.sum())
    n_domain = num_blocks - n_general
    out = np.empty(num_blocks, dtype=np.int64)
    if n_domain:
        out[~mask] = cycled_indices(domain_len, n_domain, seed)
    if n_general:
        out[mask] = domain_len + cycled_indices(general_len, n_general, seed + 1)
    return out, {"domain": n_domain, "general": n_general}


def mix_streams(
    domain: Callable[[], Iterable[Any]], general: Callable[[], Iterable[Any]] | None, ratio: float, num_blocks: int
) -> Iterator[Any]:
    """Yield `num_blocks` items from two re-iterable streams (factories), following [`ratio_schedule`]."""
    factories = {False: domain, True: general}
    iters: dict[bool, Iterator[Any]] = {}
    for take_general in ratio_schedule(num_blocks, ratio):
        key = bool(take_general)
        if key not in iters:
            iters[key] = iter(factories[key]())
        try:
            yield next(iters[key])
        except StopIteration:  # corpus exhausted: start another pass
            iters[key] = iter(factories[key]())
            try:
                yield next(iters[key])
            except StopIteration:
                raise ValueError(f"the {'general' if key else 'domain'} corpus produced no blocks") from None
