"""Run by the batched launches of launch.py: many scenarios in one process, in turn, each into a directory of its
own. A Trainer scenario is one `transformers.Trainer` run of the tiny Llama on a `ReplayMixer` with one hf-cpt
technique, either sharded (under torchrun: 2 gloo ranks, FSDP2 through accelerate via the test-only `fsdp_cpu`
shim) or in one plain process; every rank writes `rank<i>.pt` with what the test compares, then `done<rank>`.

    python worker.py ROOT PER_DEVICE [DIR=]MODE[:PHASE] ...

MODE: plain | chunked | rewarm (RewarmCallback on the Trainer's scheduler) | rewarm_groups (make_rewarm_optimizer +
make_rewarm_scheduler, embeddings in their own param group) | mixer | packing | distill (chunked loss + precomputed
distillation replay targets) | chunked_head, distill_head (the same with an untied `lm_head` wrapped as its own FSDP
unit) | kl (held-out evaluation + ForgettingMonitorCallback + KLToBaseCallback) | lora (PEFT LoRA on q/v) | forget
(ActiveForgettingCallback every 2 updates) | vocab (extend_vocabulary with OFA init before wrapping;
NewRowsFirstCallback's refusal on the sharded model) | resume (checkpoints every 2 updates; PHASE `kill` SIGKILLs
rank 0 after update 3, `resume` continues from the last checkpoint; the final model is written with
`save_full_model`, as `hf-cpt train` writes it) | ddp (plain data parallel: what each rank trains on) | ddp_store
(the same over the prepared store at $HF_CPT_TEST_STORE) | cli (`hf-cpt train $HF_CPT_TEST_RUN_YAML`, under FSDP2
when launched with torchrun).
"""

import re
import sys

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

import fsdp_cpu
from hf_cpt.callbacks.active_forgetting import ActiveForgettingCallback, ActiveForgettingConfig
from hf_cpt.callbacks.forgetting import ForgettingMonitorCallback, ForgettingMonitorConfig
from hf_cpt.callbacks.kl_to_base import KLToBaseCallback
from hf_cpt.callbacks.replay_mixer import ReplayMixerCallback
from hf_cpt.collators.distill_replay import DistillCollator, DistillConfig, precompute_distill_targets
from hf_cpt.callbacks.rewarm import RewarmCallback, RewarmConfig, make_rewarm_optimizer, make_rewarm_scheduler
from hf_cpt.config import DataConfig
from hf_cpt.losses import apply_chunked_loss
from hf_cpt.mixers.packing import DocumentMaskingGuard, probe_document_masking
from hf_cpt.recipe.data import build_eval_sets, build_train_set
from hf_cpt.recipe.train import save_full_model
from hf_cpt.testing import make_tiny_llama, make_tiny_tokenizer, read_embedded
from hf_cpt.utils import is_sharded_model

DISTILL = DistillConfig(weight=0.5, tokens="replay", top_k=8)


def full(t):
    """The whole tensor behind a (possibly sharded) parameter or gradient; a collective under FSDP2."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class Record(TrainerCallback):
    """What each update saw: the LR of every param group, the gradients of the first update, the batch keys."""

    def __init__(self):
        self.lrs, self.grads, self.keys, self.starts, self.sharded = [], None, set(), [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(self._batch, with_kwargs=True)

    def _batch(self, module, args, kwargs):
        if module.training and "labels" in kwargs:
            self.keys |= {k for k, v in kwargs.items() if v is not None}
            if kwargs.get("position_ids") is not None:  # documents starting inside a block (position 0 after 0)
                self.starts.append(int((kwargs["position_ids"][:, 1:] == 0).sum()))

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.sharded = is_sharded_model(model)
        if state.global_step == 0:  # after clipping, before the first update: the gradient of the first loss
            self.grads = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


class RecordReset(TrainerCallback):
    """Right after `ActiveForgettingCallback` (placed before this one) resets at update 2: the full embedding
    matrix and the full Adam state of every parameter (the reset one must be cleared, the others kept)."""

    def __init__(self):
        self.weight, self.state = None, None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 2:
            self.weight = full(model.get_input_embeddings().weight)
            self.weights = {n: full(p) for n, p in model.named_parameters()}
            opt = getattr(optimizer, "optimizer", optimizer)
            names = {id(p): n for n, p in model.named_parameters()}
            self.state = {names[id(p)]: {k: full(v) for k, v in st.items() if torch.is_tensor(v)}
                          for p, st in opt.state.items()}


class KLAfterUpdate(TrainerCallback):
    """`evaluate_kl` straight after update 1 (no held-out evaluation in between: under FSDP2 the root unit is
    resharded after the backward), as a user's own callback would."""

    def __init__(self, ids, targets):
        self.ids, self.targets, self.result = ids, targets, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            from hf_cpt.base_targets import evaluate_kl

            self.result = evaluate_kl(model, self.ids, self.targets["ids"], self.targets["logprobs"], batch_size=4)


class KillAt(TrainerCallback):
    """SIGKILL the main process after update `step` (after the checkpoint of update 2 was written): no handler runs,
    the other rank is left in its next collective and torchrun tears the job down."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and args.process_index == 0:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class LoggedTokens(TrainerCallback):
    """The `mixer/tokens_<source>` that `ReplayMixerCallback` (placed before this one) adds to each log."""

    def __init__(self):
        self.logged = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logged.append({k: v for k, v in logs.items() if k.startswith("mixer/")})


def short_documents(name):
    """Sentences of an embedded corpus: documents of a few tokens, so every 32-token block holds several."""
    from datasets import Dataset

    pieces = (p.strip() for doc in read_embedded(name, limit=20) for p in re.split(r"(?<=[.;:,])\s+|\n+", doc))
    texts = [p for p in pieces if 10 <= len(p) < 40]
    return Dataset.from_dict({"text": texts})


class RewarmTrainer(Trainer):
    """The Trainer's documented way to bring its own optimizer under FSDP (`optimizers=` is refused there):
    build hf-cpt's rewarm optimizer/scheduler from the model the Trainer hands over (before `fully_shard`;
    accelerate swaps the optimizer's parameters for the sharded ones)."""

    rewarm = None  # the scenario's RewarmConfig

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = make_rewarm_optimizer(self.model if model is None else model, self.rewarm, 1e-3,
                                                   weight_decay=0.1)
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = make_rewarm_scheduler(self.optimizer if optimizer is None else optimizer, self.rewarm,
                                                      num_training_steps)
        return self.lr_scheduler


def untie(model):
    """Give the tiny Llama its own `lm_head` weight (a copy of the embeddings), so the head can be an FSDP unit."""
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    return model


def train_scenario(out, mode, per_device, sharded, phase="full"):
    """One Trainer run of `mode` (see the module docstring); writes `out/rank<i>.pt`."""
    MAX_STEPS = 6 if mode.startswith("rewarm") else 4
    HEAD_UNIT = mode.endswith("_head")  # untied lm_head, its own FSDP unit (every Linear is a unit)
    REWARM = RewarmConfig(schedule="rewarm", warmup_steps=2, min_lr_ratio=0.1,
                          embedding_lr_ratio=0.5 if mode == "rewarm_groups" else 1.0)
    RewarmTrainer.rewarm = REWARM
    PHASE = phase
    tok = make_tiny_tokenizer()
    packing = "documents" if mode in ("mixer", "packing") else "concat"
    sources = {"domain": short_documents("python-docs"), "general": short_documents("kjv")} if packing == "documents" else None
    data_cfg = DataConfig(block_size=32, replay_ratio=0.25, packing=packing, max_eval_blocks=8)
    distill = mode.startswith("distill")
    num_blocks = MAX_STEPS * 4  # the global batch is 4 blocks in both runs
    model = make_tiny_llama(len(tok))
    if mode == "vocab":  # before wrapping: every rank extends and initialises identically
        from hf_cpt.vocab.extend import VocabConfig, extend_vocabulary

        model, tok, vocab = extend_vocabulary(model, tok, VocabConfig(n_new_tokens=24, init="ofa", vector_dim=16),
                                              read_embedded("python-docs", limit=40))
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    if HEAD_UNIT:
        untie(model)
    mixer = build_train_set(data_cfg, tok, sources=sources, total_blocks=num_blocks if distill else None,
                            emit_sources=distill)
    collator, extra = default_data_collator, {}
    if distill:  # base targets before any update, for the exact blocks the run reads (a second, equal mixer)
        blocks = build_train_set(data_cfg, tok, total_blocks=num_blocks, emit_sources=True)
        targets = precompute_distill_targets(iter(blocks), model, num_blocks, DISTILL, distilled_sources=[1])
        collator = DistillCollator(DISTILL, targets=targets)
    if mode == "kl":
        eval_sets = build_eval_sets(data_cfg, tok)
        kl = KLToBaseCallback(eval_sets, top_k=8, batch_size=4)
        kl.compute_targets(model)  # on the base model, before wrapping: equal on every rank
    if mode == "lora":
        from hf_cpt.adapters import add_lora_for_cpt

        model = add_lora_for_cpt(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], embeddings="none")
    if mode in ("chunked", "chunked_head") or distill:
        apply_chunked_loss(model, chunk_size=16)  # 2 x 31 tokens per rank: several chunks, one of them partial
    kw = dict(max_steps=MAX_STEPS, per_device_train_batch_size=per_device, learning_rate=4e-3 if mode == "kl" else 1e-3, report_to="none",
              save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant", logging_steps=1, seed=0,
              ignore_data_skip=True, use_cpu=True)
    if mode == "mixer":
        kw.update(save_strategy="steps", save_steps=2, save_only_model=True)
    if mode == "resume":  # full checkpoints (model, optimizer, scheduler, RNG, callback states) every 2 updates
        kw.update(save_strategy="steps", save_steps=2, restore_callback_states_from_checkpoint=True)
    if distill:
        kw.update(remove_unused_columns=False)  # block index and token sources reach the collator
    if mode == "kl":
        kw.update(eval_strategy="steps", eval_steps=2, eval_on_start=True, per_device_eval_batch_size=per_device)
    if sharded:
        fsdp_cpu.install()
        kw.update(fsdp_cpu.fsdp_args(("LlamaDecoderLayer", "Linear") if HEAD_UNIT else ("LlamaDecoderLayer",)))
    args = TrainingArguments(f"{out}/trainer", **kw)
    record = Record()
    logged_tokens = LoggedTokens()
    callbacks = [record, ReplayMixerCallback(mixer), logged_tokens]
    if mode == "resume":
        extra["processing_class"] = tok  # the tokenizer goes with checkpoints and the final model
        callbacks += [KillAt(3)] if PHASE == "kill" else []
    if mode == "kl":
        monitor = ForgettingMonitorCallback(ForgettingMonitorConfig(kl_top_k=8))
        after_update = KLAfterUpdate(kl.inputs["general"], kl.targets["general"])
        callbacks += [kl, monitor, after_update]  # the KL callback's on_log runs before the monitor's on_evaluate
        extra["eval_dataset"] = eval_sets
    reset = RecordReset()
    if mode == "forget":
        callbacks += [ActiveForgettingCallback(ActiveForgettingConfig(every_k_updates=2, seed=3)), reset]
    result = {}
    trainer_cls, optimizers = Trainer, (None, None)
    if mode.startswith("rewarm"):
        callbacks.append(RewarmCallback(REWARM))
    if mode == "rewarm_groups":
        opt = make_rewarm_optimizer(model, REWARM, 1e-3, weight_decay=0.1)
        optimizers = (opt, make_rewarm_scheduler(opt, REWARM, MAX_STEPS))  # the documented one-process way
        if sharded:
            try:  # what hf_cpt.recipe.train does with `schedule:`; transformers refuses it under FSDP
                Trainer(model=model, args=args, train_dataset=mixer, callbacks=callbacks, optimizers=optimizers)
            except RuntimeError as err:
                result["optimizers_refused"] = str(err)
            trainer_cls, optimizers = RewarmTrainer, (None, None)
    trainer = trainer_cls(model=model, args=args, train_dataset=mixer, data_collator=collator,
                          callbacks=callbacks, optimizers=optimizers, **extra)
    if mode == "resume" and PHASE == "resume":
        from transformers.trainer_utils import get_last_checkpoint

        result["resumed_from"] = get_last_checkpoint(args.output_dir)
        trainer.train(resume_from_checkpoint=result["resumed_from"])
    else:
        trainer.train()
    # a resumed Trainer rebuilds stateful callbacks from the checkpoint: read the one that ran
    mixer_callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ReplayMixerCallback))
    if mode == "resume":  # the final model as a user gets it: full safetensors + tokenizer, on the main process
        save_full_model(trainer, f"{out}/final")
    result |= {
        "world": args.world_size, "distributed_type": str(trainer.accelerator.distributed_type),
        "sharded": record.sharded, "log_history": trainer.state.log_history, "lrs": record.lrs, "batch_keys": sorted(record.keys), "starts": record.starts,
        "grads": record.grads, "mixer_state": mixer_callback.state(),
        "tokens_per_source": mixer_callback.tokens_per_source,
        "logged_tokens": logged_tokens.logged,
        "weights": trainer.accelerator.get_state_dict(trainer.model_wrapped),  # full on rank 0 under FSDP2
    }
    if mode in ("chunked", "chunked_head") or distill:
        result["chunked"] = hasattr(model, "hf_cpt_forward_patch")
    if HEAD_UNIT:
        from hf_cpt.utils import is_fsdp2_module

        result["head_unit"] = is_fsdp2_module(model.lm_head)
        result["head_loss_method"] = hasattr(model.lm_head, "_hf_cpt_head_loss")
    if distill:
        result["tokens_distilled"] = collator.tokens_distilled
        result["num_targets"] = len(targets)
    if mode == "kl":
        result["history"], result["kl_after_update"] = monitor.history, after_update.result
    if mode == "lora":
        result["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    if mode == "forget":
        result["reset_weight"], result["reset_state"] = reset.weight, reset.state
    if mode == "vocab":
        from hf_cpt.callbacks.new_rows_first import NewRowsFirstCallback

        result |= {"initial": initial, "old_vocab_size": vocab["old_vocab_size"], "vocab_size": len(tok)}
        try:  # the new-rows-first phase on the trained (sharded) model
            NewRowsFirstCallback(vocab["old_vocab_size"], 2).on_train_begin(args, trainer.state, trainer.control,
                                                                            model=trainer.model_wrapped)
        except ValueError as err:
            result["new_rows_first_refused"] = str(err)
    if mode == "packing":
        guard = getattr(model, DocumentMaskingGuard.ATTRIBUTE, None)
        result["dropped_masks"] = None if guard is None else guard.dropped_masks
        result["probe"] = probe_document_masking(trainer.model_wrapped, vocab_size=len(tok))  # every rank runs it
    if mode == "mixer":
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        ckpt = Path(args.output_dir) / "checkpoint-2" / "trainer_state.json"
        if args.process_index == 0:
            result["checkpoint_state"] = json.loads(ckpt.read_text())["stateful_callbacks"]["ReplayMixerCallback"]
            result["checkpoint_weights"] = load_file(ckpt.with_name("model.safetensors"))
    torch.save(result, f"{out}/rank{args.process_index}.pt")



def ddp_scenario(out, per_device, store=None):
    """Plain data parallel (no FSDP) over a `ReplayMixer` (or, given a prepared `store`, a `PreparedMixer`): what
    each rank trains on (test_ddp.py, test_multinode.py). Writes `out/rank<i>.json`."""
    import json

    tok = make_tiny_tokenizer()
    mixer = build_train_set(DataConfig(block_size=32, replay_ratio=0.25, prepared_dir=store), tok, total_blocks=16)
    # a PreparedMixer is map-style: each rank fetches only its own blocks, in order
    order = {"train_sampling_strategy": "sequential"} if store else {}
    args = TrainingArguments(f"{out}/trainer", max_steps=4, per_device_train_batch_size=per_device,
                             learning_rate=1e-3, report_to="none", save_strategy="no", disable_tqdm=True,
                             lr_scheduler_type="constant", use_cpu=True, seed=0, ignore_data_skip=True, **order)
    model = make_tiny_llama(len(tok))
    seen = []

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
                   "distributed_type": str(trainer.accelerator.distributed_type),
                   "blocks_built": getattr(mixer, "blocks_built", None)}, fh)


def cli_scenario(out, run_yaml):
    """`hf-cpt train RUN_YAML -o out/run` in this process, as each process of `accelerate launch -m
    hf_cpt.cli.main train` runs it: one process with 2 blocks per update, or, under torchrun, FSDP2 through
    `train.training_args` (the shipped config's `SHARDED_STATE_DICT`) with 1 block per rank."""
    import os

    import yaml
    from accelerate.state import AcceleratorState

    from hf_cpt.cli.main import app

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = yaml.safe_load(open(run_yaml))
    cfg["train"]["per_device_train_batch_size"] = 2 // world
    if world > 1:
        fsdp_cpu.install()
        fsdp_cpu.allow_recipe_fsdp()
        fsdp = fsdp_cpu.fsdp_args(state_dict_type="SHARDED_STATE_DICT")
        cfg["train"]["training_args"] = {k: fsdp[k] for k in ("fsdp", "fsdp_config")}
    path = f"{out}/run{world}.yaml"
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    app(["train", path, "-o", f"{out}/run"], prog_name="hf-cpt", standalone_mode=False)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"world": world, "distributed_type": str(AcceleratorState().distributed_type)},
               f"{out}/rank{rank}.pt")


RUN_DIRS = {"resume:kill": "resume-run", "resume:resume": "resume-run"}  # the resumed run continues the killed one


def main():
    """`worker.py ROOT PER_DEVICE SCENARIO...`: run each scenario in turn (one launch, many scenarios), each into
    `ROOT/<dir>`; a scenario is `[DIR=]MODE[:PHASE]`, MODE one of the Trainer modes above, `ddp`, `ddp_store`
    (the store at $HF_CPT_TEST_STORE) or `cli` (the run config at $HF_CPT_TEST_RUN_YAML)."""
    import os
    from pathlib import Path

    root, per_device, tokens = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1
    for token in tokens:
        name, _, spec = token.rpartition("=")
        mode, _, phase = spec.partition(":")
        out = root / (name or RUN_DIRS.get(spec, spec.replace(":", "-")))
        out.mkdir(parents=True, exist_ok=True)
        if mode in ("ddp", "ddp_store"):
            ddp_scenario(out, per_device, os.environ["HF_CPT_TEST_STORE"] if mode == "ddp_store" else None)
        elif mode == "cli":
            cli_scenario(out, os.environ["HF_CPT_TEST_RUN_YAML"])
        else:
            train_scenario(out, mode, per_device, sharded, phase or "full")
        (out / f"done{os.environ.get('RANK', '0')}").touch()


if __name__ == "__main__":
    main()
