"""`DistillCollator`: every training batch carries the distillation keys, so accelerate's multi-process batches
(built with the first per-process batch's keys) never drop the targets."""

import torch
from accelerate.utils import concatenate

from hf_cpt.collators.distill_replay import DistillCollator, DistillConfig

K, T = 3, 5


def _block(index, source):
    return {"input_ids": list(range(2, 2 + T)), "labels": list(range(2, 2 + T)), "block_index": index,
            "source_ids": [source] * T}


def _targets():
    g = torch.Generator().manual_seed(0)
    return {7: {"ids": torch.randint(0, 50, (T, K), generator=g, dtype=torch.int32),
                "logprobs": -torch.rand((T, K), generator=g), "weights": torch.ones(T)}}


def test_a_batch_without_distilled_tokens_still_has_the_keys_with_zero_weights():
    collator = DistillCollator(DistillConfig(top_k=K), targets=_targets())
    plain = collator([_block(0, 0), _block(1, 0)])  # domain blocks only: nothing to distil
    assert plain["base_topk_ids"].shape == (2, T, K) and plain["base_topk_ids"].dtype == torch.int32
    assert plain["base_topk_logprobs"].shape == (2, T, K) and not plain["distill_weights"].any()
    assert collator.tokens_distilled == 0
    distilled = collator([_block(7, 1), _block(2, 0)])
    assert distilled["distill_weights"][0].sum() == T and not distilled["distill_weights"][1].any()
    # what accelerate's dispatcher does with rank 0's and rank 1's parts: the targets survive
    merged = concatenate([plain, distilled])
    assert torch.equal(merged["base_topk_ids"][2], _targets()[7]["ids"]) and merged["distill_weights"].sum() == T
    assert collator.tokens_distilled == T


def test_held_out_batches_stay_plain():
    batch = DistillCollator(DistillConfig(top_k=K), targets=_targets())(
        [{"input_ids": [2, 3, 4], "labels": [2, 3, 4]}])
    assert sorted(batch) == ["input_ids", "labels"]
