"""Run by torchrun from test_ddp.py / test_multinode.py: one Trainer step loop over a ReplayMixer (or, given a
prepared store as third argument, a PreparedMixer), recording what each rank trains on."""

import json
import sys

from transformers import Trainer, TrainingArguments, default_data_collator

from hf_cpt.callbacks.replay_mixer import ReplayMixerCallback
from hf_cpt.config import DataConfig
from hf_cpt.recipe.data import build_train_set
from hf_cpt.testing import make_tiny_llama, make_tiny_tokenizer

out, per_device = sys.argv[1], int(sys.argv[2])
store = sys.argv[3] if len(sys.argv) > 3 else None
seen = []


tok = make_tiny_tokenizer()
mixer = build_train_set(DataConfig(block_size=32, replay_ratio=0.25, prepared_dir=store), tok, total_blocks=16)
# a PreparedMixer is map-style: each rank fetches only its own blocks, in order
order = {"train_sampling_strategy": "sequential"} if store else {}
args = TrainingArguments(out, max_steps=4, per_device_train_batch_size=per_device, learning_rate=1e-3,
                         report_to="none", save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
                         use_cpu=True, seed=0, ignore_data_skip=True, **order)
model = make_tiny_llama(len(tok))


def record(module, args, kwargs):
    if module.training:
        seen.append((kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).tolist())


model.register_forward_pre_hook(record, with_kwargs=True)
trainer = Trainer(model=model, args=args, train_dataset=mixer, data_collator=default_data_collator,
                  callbacks=[ReplayMixerCallback(mixer)])
trainer.train()
losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
with open(f"{out}/rank{args.process_index}.json", "w") as fh:
    json.dump({"seen": seen, "losses": losses, "world": args.world_size,
               "blocks_built": getattr(mixer, "blocks_built", None)}, fh)
