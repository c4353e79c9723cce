"""Child process for tests/callbacks/test_replay_mixer_trl.py: a TRL `SFTTrainer` (full or LoRA) on a
`ReplayMixer`, trained from scratch or resumed from the last checkpoint in OUT; writes the final weights and the
mixer's token counts to OUT/final.safetensors and OUT/final.json.

    python trl_worker.py OUT full|lora fresh|resume
"""

import json
import sys
from pathlib import Path

import torch
import trl
from safetensors.torch import save_file

from transformers import default_data_collator

from hf_cpt.callbacks.replay_mixer import ReplayMixerCallback
from hf_cpt.config import DataConfig
from hf_cpt.recipe.data import build_train_set
from hf_cpt.testing import make_tiny_llama, make_tiny_tokenizer

MAX_STEPS, SAVE_STEPS = 6, 3


def build(out: Path, mode: str):
    tok = make_tiny_tokenizer()
    mixer = build_train_set(DataConfig(block_size=32, replay_ratio=0.25), tok)
    args = trl.SFTConfig(
        output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to="none", use_cpu=True, seed=0, disable_tqdm=True, save_strategy="steps", save_steps=SAVE_STEPS,
        logging_steps=1, lr_scheduler_type="constant", ignore_data_skip=True,
        restore_callback_states_from_checkpoint=True, dataloader_num_workers=0, packing=False,
        remove_unused_columns=False,  # keep the blocks' position_ids (document packing)
    )
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    torch.manual_seed(0)
    return trl.SFTTrainer(model=make_tiny_llama(len(tok)), args=args, train_dataset=mixer.to_iterable_dataset(),
                          processing_class=tok, callbacks=[ReplayMixerCallback(mixer)],
                          data_collator=default_data_collator, peft_config=peft_config)


def main(out: str, mode: str, how: str) -> None:
    out = Path(out)
    trainer = build(out, mode)
    trainer.train(resume_from_checkpoint=True if how == "resume" else None)
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ReplayMixerCallback))
    state = {k: v.detach().contiguous().clone() for k, v in trainer.model.state_dict().items()}
    save_file(state, str(out / "final.safetensors"))
    losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    (out / "final.json").write_text(json.dumps({"tokens": cb.tokens_per_source, "losses": losses,
                                                "global_step": trainer.state.global_step}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
