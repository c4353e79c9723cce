import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_cpt.adapters import add_lora_for_cpt
from hf_cpt.callbacks.trained_parameters import TrainedParametersCallback
from hf_cpt.losses import apply_chunked_loss
from hf_cpt.testing import make_tiny_llama

pytest.importorskip("peft")


def _data(vocab, new_ids, n=16, seq=24):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (seq,), generator=g)
        ids[::4] = torch.tensor(new_ids)[torch.randint(0, len(new_ids), (len(ids[::4]),), generator=g)]
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * seq, "labels": ids.tolist()})
    return rows


def _train(model, rows, tmp_path, callbacks=(), steps=4, lr=1e-2):
    args = TrainingArguments(str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                             lr_scheduler_type="constant")
    Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
            callbacks=list(callbacks)).train()


@pytest.mark.slow  # LoRA training runs
@pytest.mark.parametrize("chunked", [False, True])
def test_lora_with_new_rows_trains_new_rows_and_leaves_old_rows_bit_identical(tmp_path, chunked):
    base_vocab, new = 300, 6
    model = make_tiny_llama(base_vocab)
    model.resize_token_embeddings(base_vocab + new)
    new_ids = list(range(base_vocab, base_vocab + new))
    before = model.get_input_embeddings().weight.detach().clone()
    lora = add_lora_for_cpt(model, r=4, alpha=8, embeddings="new_rows", new_token_ids=new_ids)
    if chunked:
        apply_chunked_loss(lora.get_base_model())
    check = TrainedParametersCallback(check_after=2)
    _train(lora, _data(base_vocab + new, new_ids), tmp_path, [check])
    assert check.unchanged == []  # every LoRA matrix and the new-row deltas moved
    merged = lora.merge_and_unload()
    after = merged.get_input_embeddings().weight.detach()
    assert torch.equal(after[:base_vocab], before[:base_vocab])
    assert not torch.allclose(after[base_vocab:], before[base_vocab:])


def test_parameters_that_never_train_are_named(tmp_path):
    model = make_tiny_llama(300)
    model.model.layers[0].mlp.down_proj.weight.register_hook(lambda g: torch.zeros_like(g))  # gradient blocked
    with pytest.raises(RuntimeError, match=r"1 trainable parameters did not change .*layers.0.mlp.down_proj"):
        _train(model, _data(300, [5, 6]), tmp_path, [TrainedParametersCallback(check_after=2)], lr=1e-3)


def test_lora_on_lm_head_is_refused():
    model = make_tiny_llama(300)
    with pytest.raises(ValueError, match="includes lm_head"):
        add_lora_for_cpt(model, target_modules=["q_proj", "lm_head"], embeddings="none")
    with pytest.raises(ValueError, match="`new_token_ids` .* outside the embedding matrix"):
        add_lora_for_cpt(model, embeddings="new_rows", new_token_ids=[300])


@pytest.mark.parametrize("embeddings", ["new_rows", "all"])
def test_trainable_embeddings_are_refused_under_fsdp(monkeypatch, embeddings):
    """peft's wrappers of the tied embedding/head make `fully_shard` fail while the Trainer wraps the model
    (measured in the FSDP2 CPU harness, tests/distributed: `new_rows` inside `fully_shard`, `all` at the first
    forward); `embeddings='none'` is the LoRA that tests/distributed/test_fsdp_equal.py verifies sharded."""
    from types import SimpleNamespace

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    rows = {"new_token_ids": [299]} if embeddings == "new_rows" else {}
    with pytest.raises(ValueError, match=rf"`embeddings='{embeddings}'` does not work under FSDP .* "
                                         r"use `embeddings='none'` with FSDP"):
        add_lora_for_cpt(make_tiny_llama(300), embeddings=embeddings,
                         training_args=SimpleNamespace(fsdp="full_shard"), **rows)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match="does not work under FSDP"):
        add_lora_for_cpt(make_tiny_llama(300), embeddings=embeddings, **rows)
    add_lora_for_cpt(make_tiny_llama(300), embeddings="none")  # the verified one
