import math

import numpy as np
import pytest

from hf_cpt.mixers.ratio import cycled_indices, mix_indices, mix_streams, ratio_schedule


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.25, 1 / 3, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("n", [1, 7, 100, 1001])
def test_every_prefix_is_within_one_block_of_the_exact_share(ratio, n):
    mask = ratio_schedule(n, ratio)
    assert mask.shape == (n,)
    prefix = np.cumsum(mask)
    exact = ratio * np.arange(1, n + 1)
    assert np.all(np.abs(prefix - exact) < 1.0 + 1e-9)
    # the naive reference: floor(n * r) general blocks after n blocks
    assert int(mask.sum()) == math.floor(n * ratio + 1e-9)


def test_schedule_rejects_bad_ratio():
    with pytest.raises(ValueError, match="`ratio`"):
        ratio_schedule(10, 1.2)


def test_cycled_indices_permutes_each_pass():
    idx = cycled_indices(5, 12, seed=3)
    assert len(idx) == 12
    assert sorted(idx[:5]) == list(range(5)) and sorted(idx[5:10]) == list(range(5))
    assert np.array_equal(idx, cycled_indices(5, 12, seed=3))


def test_mix_indices_counts_and_ranges():
    idx, counts = mix_indices(40, 0.25, domain_len=7, general_len=3, seed=0)
    assert counts == {"domain": 30, "general": 10}
    assert ((idx >= 7) & (idx < 10)).sum() == 10
    assert (idx < 7).sum() == 30


def test_mix_streams_cycles_exhausted_sources():
    out = list(mix_streams(lambda: iter("ab"), lambda: iter("XYZ"), 0.5, 8))
    assert out == ["a", "X", "b", "Y", "a", "Z", "b", "X"]
    with pytest.raises(ValueError, match="general corpus produced no blocks"):
        list(mix_streams(lambda: iter("ab"), lambda: iter(""), 0.5, 4))
