import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from hf_cpt.callbacks.active_forgetting import (
    ActiveForgettingCallback,
    ActiveForgettingConfig,
    clear_optimizer_state,
    relearn_embeddings,
    reset_embeddings,
)
from hf_cpt.config import DataConfig
from hf_cpt.recipe.data import build_train_set
from hf_cpt.testing import make_tiny_llama

K = 3


def fresh_draw(model, index, seed=0):
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    w = torch.randn(model.get_input_embeddings().weight.shape, generator=g) * model.config.initializer_range
    pad = model.get_input_embeddings().padding_idx
    if pad is not None:
        w[pad] = 0
    return w


def test_reset_embeddings_matches_naive_draw_and_zeroes_padding():
    model = make_tiny_llama(37)
    model.get_input_embeddings().padding_idx = 1
    params = reset_embeddings(model, torch.Generator().manual_seed(5))
    expected = torch.randn((37, 32), generator=torch.Generator().manual_seed(5)) * 0.02
    expected[1] = 0
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), expected)
    assert len(params) == 1 and model.lm_head.weight is model.get_input_embeddings().weight  # tied head follows


def test_clear_optimizer_state_touches_only_the_given_params():
    model = make_tiny_llama(37)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    emb = model.get_input_embeddings().weight
    assert clear_optimizer_state(opt, [emb]) == 1
    assert all(float(v.abs().sum()) == 0 for v in opt.state[emb].values())
    other = model.model.layers[0].mlp.up_proj.weight
    assert float(opt.state[other]["exp_avg_sq"].abs().sum()) > 0 and float(opt.state[other]["step"]) == 1


def test_relearn_embeddings_freezes_the_body():
    model = make_tiny_llama(37)
    names = relearn_embeddings(model)
    assert names == ["model.embed_tokens.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names


def test_bad_input():
    with pytest.raises(ValueError, match="`every_k_updates` must be an integer >= 1"):
        ActiveForgettingConfig(every_k_updates=0)
    with pytest.raises(ValueError, match="has no input embeddings"):
        reset_embeddings(torch.nn.Linear(2, 2), torch.Generator())


class Recorder(TrainerCallback):
    """Snapshots embeddings, body and Adam state at every update end (placed before or after the reset)."""

    def __init__(self):
        self.snaps = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        emb = model.get_input_embeddings().weight
        opt = getattr(optimizer, "optimizer", optimizer)
        self.snaps[state.global_step] = {
            "emb": emb.detach().clone(),
            "body": {n: p.detach().clone() for n, p in model.named_parameters() if "embed" not in n},
            "emb_state": {k: v.clone() for k, v in opt.state[emb].items()},
            "body_state": float(opt.state[model.model.norm.weight]["exp_avg_sq"].abs().sum()),
        }


def _trainer(tmp_path, tok, max_steps=7, accum=1, save_steps=0):
    train = build_train_set(DataConfig(block_size=32), tok)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        gradient_accumulation_steps=accum, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, logging_steps=1,
    )
    before, after = type("Before", (Recorder,), {})(), type("After", (Recorder,), {})()
    trainer = Trainer(model=make_tiny_llama(len(tok)), args=args, train_dataset=train,
                      data_collator=default_data_collator,
                      callbacks=[before, ActiveForgettingCallback(every_k_updates=K), after])
    return trainer, before, after


@pytest.mark.slow  # trains a tiny model for several steps with evaluations (>5 s under load)
@pytest.mark.parametrize("accum", [1, 4])
def test_trainer_resets_exactly_every_k_updates(tmp_path, tiny_tokenizer, accum):
    trainer, before, after = _trainer(tmp_path, tiny_tokenizer, accum=accum)
    trainer.train()
    model = trainer.model
    for step in range(1, 8):
        b, a = before.snaps[step], after.snaps[step]
        for name in b["body"]:  # the reset never touches the body
            assert torch.equal(b["body"][name], a["body"][name])
        if step % K == 0:
            torch.testing.assert_close(a["emb"], fresh_draw(model, step // K), rtol=0, atol=0)
            assert all(float(v.abs().sum()) == 0 for v in a["emb_state"].values())
            assert a["body_state"] == b["body_state"] > 0
        else:
            assert torch.equal(a["emb"], b["emb"])
            assert float(a["emb_state"]["exp_avg_sq"].abs().sum()) > 0


@pytest.mark.slow  # trains a tiny model for several steps with evaluations (>5 s under load)
def test_resume_between_resets_keeps_the_schedule(tmp_path, tiny_tokenizer):
    full, _, _ = _trainer(tmp_path / "run", tiny_tokenizer, save_steps=4)
    full.train()
    resumed, _, after = _trainer(tmp_path / "run", tiny_tokenizer, save_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    torch.testing.assert_close(after.snaps[6]["emb"], fresh_draw(resumed.model, 2), rtol=0, atol=0)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=n)
