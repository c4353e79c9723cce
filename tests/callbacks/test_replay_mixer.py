import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from hf_cpt.callbacks.replay_mixer import ReplayMixerCallback, find_mixer
from hf_cpt.config import DataConfig
from hf_cpt.recipe.data import build_train_set
from hf_cpt.testing import make_tiny_llama


class RecordingCollator:
    def __init__(self):
        self.batches = []

    def __call__(self, rows):
        self.batches.append([r["input_ids"] for r in rows])
        return default_data_collator(rows)


def _trainer(tmp_path, tok, max_steps=6, ignore_data_skip=True, ratio=0.25, strict=True, restore=True):
    mixer = build_train_set(DataConfig(block_size=32, replay_ratio=ratio), tok)
    mixer.strict_resume = strict
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, save_strategy="steps", save_steps=3,
        logging_steps=1, ignore_data_skip=ignore_data_skip, lr_scheduler_type="constant",
        restore_callback_states_from_checkpoint=restore,
    )
    collator = RecordingCollator()
    trainer = Trainer(model=make_tiny_llama(len(tok)), args=args, train_dataset=mixer, data_collator=collator,
                      callbacks=[ReplayMixerCallback(mixer)])
    return trainer, collator, mixer


@pytest.mark.slow  # two Trainer runs and a resume
@pytest.mark.parametrize("ignore_data_skip", [True, False])
def test_resume_sees_exactly_the_blocks_and_weights_of_an_uninterrupted_run(tmp_path, tiny_tokenizer,
                                                                            ignore_data_skip):
    full, full_batches, _ = _trainer(tmp_path / "full", tiny_tokenizer)
    full.train()
    cb = next(c for c in full.callback_handler.callbacks if isinstance(c, ReplayMixerCallback))
    assert cb.tokens_per_source == {"domain": 9 * 32, "general": 3 * 32}  # 6 steps x 2 blocks, 1/4 replay
    logged = [r for r in full.state.log_history if "loss" in r]
    assert len(logged) == 6

    resumed, batches, _ = _trainer(tmp_path / "full", tiny_tokenizer, ignore_data_skip=ignore_data_skip)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    # the Trainer rebuilt the callback from the checkpoint; it found the mixer through the dataloader
    live = next(c for c in resumed.callback_handler.callbacks if isinstance(c, ReplayMixerCallback))
    assert live.tokens_per_source == cb.tokens_per_source
    seen = batches.batches[-4:-1]  # the dataloader reads one batch ahead: the last recorded one is unused
    assert seen == full_batches.batches[3:6]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow  # Trainer runs with checkpoints (>5 s under load)
def test_checkpoint_stores_the_consumed_position_not_the_prefetched_one(tmp_path, tiny_tokenizer):
    trainer, _, mixer = _trainer(tmp_path, tiny_tokenizer, max_steps=3)
    trainer.train()
    import json

    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["ReplayMixerCallback"]["attributes"]["saved_state"]
    assert saved["blocks"] == 6
    assert sum(s["tokens"] for s in saved["sources"].values()) == 6 * 32


@pytest.mark.slow  # Trainer runs with checkpoints (>5 s under load)
def test_resume_with_changed_ratios_is_refused_unless_not_strict(tmp_path, tiny_tokenizer):
    first, _, _ = _trainer(tmp_path, tiny_tokenizer, max_steps=3)
    first.train()
    changed, _, _ = _trainer(tmp_path, tiny_tokenizer, ratio=0.5)
    with pytest.raises(ValueError, match=r"configured differently \(ratios"):
        changed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    override, batches, mixer = _trainer(tmp_path, tiny_tokenizer, ratio=0.5, strict=False)
    override.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))  # explicit: new shares from step 3 on
    tokens = mixer.state_at(12)["sources"]
    assert tokens["domain"]["tokens"] == (5 + 3) * 32 and tokens["general"]["tokens"] == (1 + 3) * 32


@pytest.mark.slow  # several Trainer set-ups (>5 s under load)
def test_find_mixer_and_bad_setups(tmp_path, tiny_tokenizer):
    trainer, _, mixer = _trainer(tmp_path, tiny_tokenizer, max_steps=1)
    assert find_mixer(trainer.get_train_dataloader()) is mixer
    trainer.args.dataloader_num_workers = 2
    with pytest.raises(ValueError, match="dataloader_num_workers=0"):
        trainer.train()
    trainer, _, _ = _trainer(tmp_path, tiny_tokenizer, max_steps=3)
    trainer.train()
    again, _, _ = _trainer(tmp_path, tiny_tokenizer, restore=False)
    with pytest.raises(ValueError, match="set `restore_callback_states_from_checkpoint=True`"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
