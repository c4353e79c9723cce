"""`ReplayMixer` under TRL: `SFTTrainer` accepts `mixer.to_iterable_dataset()`, and a resume from a checkpoint (the
Trainer rebuilding `ReplayMixerCallback` from its saved state) sees exactly the blocks of an uninterrupted run."""

import pytest
import torch

from hf_cpt.callbacks.replay_mixer import ReplayMixerCallback
from hf_cpt.config import DataConfig
from hf_cpt.recipe.data import build_train_set
from hf_cpt.testing import make_tiny_llama

trl = pytest.importorskip("trl")


def _sft(tmp_path, tok, max_steps=6):
    mixer = build_train_set(DataConfig(block_size=32, replay_ratio=0.25), tok)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, save_strategy="steps", save_steps=3,
        logging_steps=1, lr_scheduler_type="constant", ignore_data_skip=True,
        restore_callback_states_from_checkpoint=True, dataloader_num_workers=0, packing=False,
    )
    trainer = trl.SFTTrainer(model=make_tiny_llama(len(tok)), args=args, train_dataset=mixer.to_iterable_dataset(),
                             processing_class=tok, callbacks=[ReplayMixerCallback(mixer)])
    return trainer, mixer


def _mixer_callback(trainer):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, ReplayMixerCallback))


def test_sft_trainer_takes_the_mixer_and_resumes_exactly(tmp_path, tiny_tokenizer):
    full, _ = _sft(tmp_path / "full", tiny_tokenizer)
    full.train()
    tokens = _mixer_callback(full).tokens_per_source
    assert sum(tokens.values()) == 6 * 2 * 32  # every trained block counted, none prefetched
    assert tokens["general"] == 3 * 32  # 25% replay: exact to the block

    resumed, mixer = _sft(tmp_path / "full", tiny_tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    cb = _mixer_callback(resumed)
    assert cb.mixer is mixer  # the callback rebuilt from the checkpoint kept the mixer given to the trainer
    assert cb.tokens_per_source == tokens
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
