"""No hidden process-wide state: the live-mixer table owns nothing and forgets a mixer with its last holder, and
patching a model's forward is one recorded, reversible step."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch

from hf_cpt.losses import CHUNKED_LOSS, apply_chunked_loss, remove_chunked_loss
from hf_cpt.mixers import replay
from hf_cpt.testing import make_tiny_llama
from hf_cpt.utils import forward_patch, patch_forward, unpatch_forward


def _mixer(tok):
    docs = {"domain": [f"domain text number {i} about things" for i in range(40)],
            "general": [f"general text number {i} about life" for i in range(40)]}
    return replay.ReplayMixer(docs, tok, ratios={"domain": 0.75, "general": 0.25}, block_size=16)


def test_the_live_mixer_table_does_not_grow_over_many_datasets(tiny_tokenizer):
    gc.collect()
    before = len(replay._LIVE_MIXERS)
    for _ in range(5):
        dataset = _mixer(tiny_tokenizer).to_iterable_dataset()
        assert len(replay._LIVE_MIXERS) == before + 1  # findable while its dataset holds it
        next(iter(dataset))
        del dataset
        gc.collect()
        assert len(replay._LIVE_MIXERS) == before  # gone with its last holder


def test_a_dataset_keeps_its_mixer_and_copies_read_the_same_one(tiny_tokenizer):
    mixer = _mixer(tiny_tokenizer)
    first = next(iter(mixer))
    dataset = mixer.to_iterable_dataset()
    del mixer
    gc.collect()
    assert next(iter(dataset))["input_ids"] == list(first["input_ids"])  # the caller dropped it; the dataset did not
    handle = (getattr(getattr(dataset, "_ex_iterable", None), "kwargs", None) or {}).get("handle")
    assert isinstance(handle, replay.MixerHandle)  # the pipeline holds a handle, never a copy of the mixer
    assert copy.deepcopy(handle) is handle
    restored = pickle.loads(pickle.dumps(handle))  # what `datasets` hashes: the key, resolved to the live mixer
    assert restored.key == handle.key and restored.mixer is handle.mixer


def test_a_callback_slot_finds_the_mixer_only_while_it_is_held(tiny_tokenizer):
    from hf_cpt.callbacks.replay_mixer import ReplayMixerCallback

    mixer = _mixer(tiny_tokenizer)
    ReplayMixerCallback(mixer, slot="ownership-test")
    assert ReplayMixerCallback(slot="ownership-test").mixer is mixer  # a rebuild from checkpoint state finds it
    del mixer
    gc.collect()
    assert ReplayMixerCallback(slot="ownership-test").mixer is None


def test_the_chunked_loss_is_one_recorded_reversible_forward_patch():
    model = make_tiny_llama(64)
    own = type(model).forward
    apply_chunked_loss(model, chunk_size=16)
    patch = forward_patch(model)
    assert patch is model.hf_cpt_forward_patch and patch.name == CHUNKED_LOSS and patch.options == {"chunk_size": 16}
    ids = torch.randint(0, 64, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    apply_chunked_loss(model, chunk_size=8)  # idempotent: one patch, new options
    assert forward_patch(model) is patch and patch.options == {"chunk_size": 8}
    with pytest.raises(ValueError, match="already patched by 'chunked_loss'"):
        patch_forward(model, "another", lambda self, **kw: None)
    remove_chunked_loss(model)
    assert forward_patch(model) is None and not hasattr(model, "hf_cpt_forward_patch")
    assert model.forward.__func__ is own  # the model's own forward again
    assert not unpatch_forward(model)  # nothing left to undo
    reference = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-4)  # same loss either way
