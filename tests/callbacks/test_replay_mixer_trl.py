"""`ReplayMixer` under TRL: `SFTTrainer` (full, or a LoRA adapter through its `peft_config`) accepts
`mixer.to_iterable_dataset()`, and a resume (in-process, or after kill -9 in a child) sees exactly the blocks of an
uninterrupted run. TRL's other trainers (DPO, KTO, GRPO, RLOO, reward, on-policy distillation) train on prompts and
preferences or on the student's own generations, not on a token stream, so `SFTTrainer` is TRL's CPT trainer."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformers import default_data_collator

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
        remove_unused_columns=False,  # keep the blocks' position_ids (document packing)
    )
    trainer = trl.SFTTrainer(model=make_tiny_llama(len(tok)), args=args, train_dataset=mixer.to_iterable_dataset(),
                             processing_class=tok, callbacks=[ReplayMixerCallback(mixer)],
                             data_collator=default_data_collator)
    return trainer, mixer


def test_trl_own_collator_is_refused_with_the_fix(tmp_path, tiny_tokenizer):
    """TRL's collator rebuilds the batch (an attention mask, positions 0..T-1): documents would attend to each other,
    so the first step stops with the fix instead of training silently on the wrong masks."""
    mixer = build_train_set(DataConfig(block_size=32, replay_ratio=0.25), tiny_tokenizer)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                         use_cpu=True, disable_tqdm=True, save_strategy="no", packing=False)
    trainer = trl.SFTTrainer(model=make_tiny_llama(len(tiny_tokenizer)), args=args,
                             train_dataset=mixer.to_iterable_dataset(), processing_class=tiny_tokenizer,
                             callbacks=[ReplayMixerCallback(mixer)])
    with pytest.raises(ValueError, match="data_collator=default_data_collator"):
        trainer.train()


_WRONG_USES = {  # each setting the docs' SFTTrainer example needs, left out: the run stops with the fix
    # TRL itself refuses `data_collator=` with its packing (padding-free); without one, hf-cpt refuses
    "trl_packing": ({"packing": True, "collator": None}, "packing=False"),
    "truncating_max_length": ({"max_length": 16}, "skip_prepare_dataset"),
    "trl_collator": ({"collator": None}, "data_collator=default_data_collator"),
    "unused_columns_removed": ({"remove_unused_columns": True}, "remove_unused_columns=False"),
}


@pytest.mark.parametrize("case", sorted(_WRONG_USES))
def test_each_setting_of_the_documented_sft_example_is_needed(tmp_path, tiny_tokenizer, case):
    change, fix = _WRONG_USES[case]
    mixer = build_train_set(DataConfig(block_size=32, replay_ratio=0.25), tiny_tokenizer)
    settings = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                    use_cpu=True, disable_tqdm=True, save_strategy="no", packing=False,
                    remove_unused_columns=False)
    settings.update({k: v for k, v in change.items() if k != "collator"})
    collator = change.get("collator", default_data_collator)
    trainer = trl.SFTTrainer(model=make_tiny_llama(len(tiny_tokenizer)), args=trl.SFTConfig(**settings),
                             train_dataset=mixer.to_iterable_dataset(), processing_class=tiny_tokenizer,
                             callbacks=[ReplayMixerCallback(mixer)], data_collator=collator)
    with pytest.raises(ValueError, match=re.escape(fix)):
        trainer.train()
    assert trainer.state.global_step == 0


def test_skip_prepare_dataset_trains_blocks_longer_than_max_length(tmp_path, tiny_tokenizer):
    """With TRL's preparation skipped, a `max_length` below the block size is not applied: whole blocks, with
    their positions, reach the model."""
    mixer = build_train_set(DataConfig(block_size=32, replay_ratio=0.25), tiny_tokenizer)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none",
                         use_cpu=True, disable_tqdm=True, save_strategy="no", packing=False, max_length=16,
                         dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    model = make_tiny_llama(len(tiny_tokenizer))
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["input_ids"].shape, "position_ids" in kw)),
                                    with_kwargs=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=mixer.to_iterable_dataset(),
                             processing_class=tiny_tokenizer, callbacks=[ReplayMixerCallback(mixer)],
                             data_collator=default_data_collator)
    trainer.train()
    assert trainer.state.global_step == 2
    assert seen and all(shape == (2, 32) and has_positions for shape, has_positions in seen)


def _mixer_callback(trainer):
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, ReplayMixerCallback))


@pytest.mark.slow  # two SFTTrainer runs with checkpoints (~13 s under load)
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


# kill -9 in a child process, then resume in a fresh one: the same weights (bitwise), tokens and losses as an
# uninterrupted child; for full fine-tuning and for a LoRA adapter (SFTTrainer's `peft_config`)
_ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _worker(out, mode, how):
    return [sys.executable, str(Path(__file__).with_name("trl_worker.py")), str(out), mode, how]


def _run_worker(out, mode, how):
    proc = subprocess.run(_worker(out, mode, how), env=_ENV, capture_output=True, text=True)
    assert proc.returncode == 0, f"trl_worker {mode} {how} exited {proc.returncode}:\n{proc.stderr[-4000:]}"


@pytest.mark.slow  # three worker processes per mode (40-50 s)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sigkill_then_resume_under_trl_matches_the_uninterrupted_run(tmp_path, mode):
    _run_worker(tmp_path / "ref", mode, "fresh")
    crash = tmp_path / "crash"
    proc = subprocess.Popen(_worker(crash, mode, "fresh"), env=_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    target = crash / "checkpoint-3" / "trainer_state.json"  # written last in a checkpoint
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-3000:]}"
    time.sleep(random.Random(mode).uniform(0, 0.05))  # seeded jitter past the checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (crash / "final.json").exists()

    _run_worker(crash, mode, "resume")
    ref, again = (json.loads((d / "final.json").read_text()) for d in (tmp_path / "ref", crash))
    assert again["global_step"] == ref["global_step"] == 6
    assert again["tokens"] == ref["tokens"] and sum(ref["tokens"].values()) == 6 * 2 * 32
    resumed_losses = {k: v for k, v in ref["losses"].items() if int(k) > 3}
    assert {k: again["losses"][k] for k in resumed_losses} == resumed_losses
    a, b = load_file(tmp_path / "ref" / "final.safetensors"), load_file(crash / "final.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if mode == "lora":
        assert any("lora_" in name for name in a)  # the adapter was trained through TRL's peft_config
