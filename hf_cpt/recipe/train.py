"""The continual-pretraining job behind `hf-cpt train`, as one public function: [`run_cpt`].

It only wires together what a Trainer user would, as named steps: build the model, build the data, build the
`transformers.Trainer` with hf-cpt's callbacks, train, then write the adapted checkpoint, its recipe, metrics,
forgetting plot and model card into the output directory, atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..callbacks.forgetting import ForgettingMonitorCallback
from ..callbacks.progress import swap_progress_bar
from ..callbacks.replay_mixer import ReplayMixerCallback
from ..config import CONFIG_FILE, SELF_EVAL_SET, CPTConfig
from ..monitoring import summarize_run
from ..output_lock import OutputDirLock
from ..registry import (DataParts, TrainerParts, enabled_techniques, merged_training_args, single_hook,
                        techniques)
from ..utils import (check_unsharded, commit_staging_dir, disk_full_error, make_staging_dir,
                     requested_sharding)
from .outputs import write_outputs
from .run_data import RunData

logger = logging.getLogger(__name__)


@dataclass
class CPTResult:
    """What [`run_cpt`] produced."""

    output_dir: Path
    metrics: dict[str, Any]


def build_training_args(cfg: CPTConfig, output_dir: str | Path):
    """`TrainingArguments` for `cfg`: evaluation at step 0 and every `train.eval_steps`, no checkpoints unless
    `train.save_steps` > 0, and resume that restores the [`ReplayMixer`] position instead of re-reading data
    (`ignore_data_skip=True`; see [`ReplayMixerCallback`])."""
    from transformers import TrainingArguments

    t = cfg.train
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        # null: a technique builds the scheduler (and names its shape in `args` when it sets up the Trainer)
        lr_scheduler_type=t.lr_scheduler_type or "constant",
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        eval_on_start=True,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16,
        activation_checkpointing=t.gradient_checkpointing,  # the current name; `gradient_checkpointing` warns
        report_to=t.report_to or "none",
        # the ReplayMixer restores its own position (a technique with a map-style data path of its own sets
        # `ignore_data_skip: False` in its registry entry's `training_args`)
        ignore_data_skip=True,
        # distillation tags (block index, token sources) reach the collator
        remove_unused_columns=not any(t.block_sources for t in enabled_techniques(cfg)),
        prediction_loss_only=True,  # evaluation needs the loss only; the chunked loss returns no logits
        restore_callback_states_from_checkpoint=True,
        dataloader_num_workers=cfg.data.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # several processes and no GPU (torchrun on CPU): accelerate only sets up gloo DDP when told `cpu`
        use_cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )
    kwargs.update(merged_training_args(cfg))  # what the enabled techniques need (hf_cpt.registry)
    kwargs.update(t.training_args)
    try:
        args = TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:  # transformers' own checks of combined settings name no field
        raise ValueError(f"`train` / `train.training_args`: TrainingArguments refused these settings: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    check_sharding(cfg, args)
    return args


# accelerate's process types under which FSDP can really shard (it falls back to DDP on the others)
_FSDP_CAPABLE = ("MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU",
                 "MULTI_NEURON", "FSDP")


def check_sharding(cfg: CPTConfig, args: Any) -> None:
    """Refuse, before the model is loaded, a sharded run that would silently not shard or that a technique
    does not support (`Technique.unsharded` in its registry entry).

    `accelerate launch` with an FSDP config (or `training_args.fsdp`) on processes without accelerators makes
    accelerate set up plain data parallelism (gloo DDP) with no word: every rank would hold the whole model.

    Raises:
        ValueError: FSDP asked for where accelerate cannot shard; a technique that cannot run sharded (e.g.
        `active_forgetting`) with FSDP/DeepSpeed.
    """
    from accelerate import PartialState

    sharding = requested_sharding(args)
    if sharding is None:
        return
    for technique in techniques().values():
        if technique.unsharded and technique.block(cfg) is not None:
            check_unsharded(technique.key, technique.unsharded, sharding)
    kind = PartialState().distributed_type
    if sharding == "FSDP" and getattr(kind, "name", str(kind)) not in _FSDP_CAPABLE:
        raise ValueError(
            f"FSDP was requested (accelerate config `distributed_type: FSDP` or `training_args.fsdp`) but these "
            f"processes have no GPU, so accelerate would run plain data parallelism ({getattr(kind, 'name', kind)}) "
            "with every rank holding the whole model: on CPU use `hf-cpt train --nproc N` (DDP), or launch on GPUs")


def config_preflight(cfg: CPTConfig) -> None:
    """Every check that needs the model's config or tokenizer but no weights, before any weights load: the model
    itself ([`inspect_model`]: its files, the objective against its architecture, EOS, vocabulary and position
    limits) and each enabled technique's `config_preflight` (hf_cpt.registry), e.g. a top-k above the
    vocabulary, a missing lexicon file, unknown lm-eval tasks."""
    from .models import inspect_model

    seen = inspect_model(cfg.model, cfg.objective, block_size=cfg.data.block_size)
    if cfg.train.save_steps > cfg.train.max_steps:  # legitimate, but the user may count on checkpoints
        logger.warning("`train.save_steps` (%d) is above `train.max_steps` (%d): no checkpoint is written before "
                       "the end, so an interrupted run cannot be resumed; lower it to checkpoint during the run",
                       cfg.train.save_steps, cfg.train.max_steps)
    for technique in enabled_techniques(cfg):
        if technique.config_preflight is not None:
            technique.config_preflight(cfg, seen.config, seen.tokenizer)


def preflight(cfg: CPTConfig, model: Any, args: Any) -> None:
    """Every check that needs the loaded model or the launcher, in one place: each enabled technique's
    `preflight` (hf_cpt.registry), run once the model is loaded and before any data is built, synthesised or
    precomputed (e.g. a top-k above the vocabulary, a model that cannot keep packed documents apart, lm-eval
    tasks that do not exist)."""
    for technique in enabled_techniques(cfg):
        if technique.preflight is not None:
            technique.preflight(cfg, model, args)


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where a run writing `output_dir` keeps its Trainer checkpoints: `<output_dir>.checkpoints`, next to it,
    so they survive a crash (the output directory itself only appears, complete, at the end)."""
    final = Path(output_dir).expanduser().resolve()
    return final.with_name(final.name + ".checkpoints")


def find_resume_checkpoint(cfg: CPTConfig, ckpt_dir: Path, resume: bool) -> str | None:
    """The checkpoint to continue from, or None for a fresh run (the resume policy).

    Raises:
        FileNotFoundError: `resume` without a checkpoint. FileExistsError: checkpoints of an earlier run exist
        and `resume` is False. ValueError: `resume` without `train.save_steps`, or checkpoints written with a
        recipe that differs in anything that changes training (see [`CPTConfig.training_diff`]).
    """
    if not cfg.train.save_steps:
        if resume:
            raise ValueError("`resume` needs checkpoints: set `train.save_steps` > 0")
        return None
    existing = last_complete_checkpoint(ckpt_dir, remove_partial=resume)
    if not resume:
        if existing is not None:
            raise FileExistsError(f"checkpoints of an earlier run are in {str(ckpt_dir)!r}: pass `resume=True` "
                                  "(CLI: --resume) to continue it, or delete them to start over")
        return None
    if existing is None:
        raise FileNotFoundError(f"`resume`: nothing to resume, no checkpoint in {str(ckpt_dir)!r}; run without "
                                "`resume` (CLI: --resume) to start")
    if not (ckpt_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{str(ckpt_dir)!r} has no {CONFIG_FILE}: it was not written by `hf-cpt train`; "
                         "resume it with the Python API or delete it")
    diffs = CPTConfig.from_pretrained(ckpt_dir).training_diff(cfg)
    if diffs:
        raise ValueError(f"the checkpoints in {str(ckpt_dir)!r} were written with another config ("
                         + "; ".join(diffs[:6]) + "); resuming would silently mix two recipes. Restore the "
                         "original values, or delete the checkpoints to start over")
    check_checkpoint_files(Path(existing))
    return existing


def check_checkpoint_files(checkpoint: Path) -> None:
    """Refuse, before anything loads, a checkpoint with a damaged file: a safetensors file whose header does not
    cover it (truncated), or a torch file (`optimizer.pt`, `rng_state.pth`, `scheduler.pt`, ...: zip archives)
    that is empty, truncated or fails its CRC check. The message names the file and both ways on.

    Raises:
        ValueError: naming the file, the checkpoint to fall back to, and how to start over.
    """
    import zipfile

    from safetensors import SafetensorError, safe_open

    for path in sorted(checkpoint.iterdir()):
        problem = None
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as fh:
                    fh.keys()
            except (SafetensorError, OSError) as e:
                problem = str(e)
        elif path.suffix in (".pt", ".pth", ".bin"):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                problem = f"member {bad} fails its CRC check" if bad is not None else None
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                problem = str(e) or type(e).__name__
        if problem is not None:
            earlier = sorted((p.name for p in checkpoint.parent.glob("checkpoint-*") if p != checkpoint
                              and p.name[11:].isdigit() and int(p.name[11:]) < int(checkpoint.name[11:])),
                             key=lambda n: int(n[11:]))
            back = (f"delete {str(checkpoint)!r} to resume from {earlier[-1]}" if earlier else
                    f"delete {str(checkpoint.parent)!r} to start over")
            raise ValueError(f"`resume`: {path.name} in {str(checkpoint)!r} is damaged ({problem}); the checkpoint "
                             f"cannot be restored: {back}")


def last_complete_checkpoint(ckpt_dir: Path, remove_partial: bool = False) -> str | None:
    """The newest `checkpoint-N` in `ckpt_dir` whose `trainer_state.json` (written last by the Trainer) is
    complete; a run killed while saving leaves a newer, partial one, which `remove_partial` deletes."""
    import json

    if not ckpt_dir.is_dir():
        return None
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]), reverse=True)
    for path in found:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return str(path)
        except (OSError, ValueError):
            if remove_partial:
                logger.info("removing %s: a save interrupted by the crash left it incomplete", path)
                shutil.rmtree(path, ignore_errors=True)
    return None


def build_model(cfg: CPTConfig) -> tuple[Any, Any, dict[str, Any] | None]:
    """The model and tokenizer to adapt, with the vocabulary extended when the config has a `vocab:` block
    (deterministic, so a resumed run rebuilds the same extended model). Returns `(model, tokenizer, summary)`."""
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.objective, block_size=cfg.data.block_size)
    adapting = single_hook(cfg, "model")  # a technique that changes the base model first (`Technique.model`)
    if adapting is None:
        return model, tokenizer, None
    return adapting[1](cfg, model, tokenizer)


def build_data(cfg: CPTConfig, model: Any, tokenizer: Any, args: Any) -> RunData:
    """Training stream and held-out sets: token-exact [`ReplayMixer`] blocks (self-synthesised general text and a
    technique's collator, e.g. distillation targets, come from `model`, still the base), or the data side of the
    one technique that owns it (`Technique.data`: tagged and masked chunks for `masking:` runs)."""
    owning = single_hook(cfg, "data")
    if owning is not None:
        return owning[1](cfg, model, tokenizer, args)
    from transformers import default_data_collator

    from .data import build_eval_sets, build_train_set, synthesize_general

    synth = synthesize_general(cfg.data, model, tokenizer)
    sources = {"general": synth["train"]} if "train" in synth else None
    extra = {SELF_EVAL_SET: synth["eval"]} if "eval" in synth else None
    num_blocks = cfg.train.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    num_blocks *= args.world_size
    enabled = enabled_techniques(cfg)
    collating = [t for t in enabled if t.collator is not None]
    if len(collating) > 1:
        raise ValueError(f"{' and '.join(f'`{t.key}`' for t in collating)} each bring their own data collator; a "
                         "run can use one of them")
    from .cleaning import run_held_out_sets  # data cleaning: what training text must not overlap

    held_out = run_held_out_sets(cfg, synth.get("eval"))  # general_self and downstream task documents
    train_set = build_train_set(cfg.data, tokenizer, total_blocks=num_blocks, sources=sources,
                                emit_sources=any(t.block_sources for t in enabled), held_out=held_out)
    eval_sets = build_eval_sets(cfg.data, tokenizer, extra)
    collator = default_data_collator
    if collating:
        def blocks() -> Any:  # the exact stream again, each block with its index and per-token sources
            return build_train_set(cfg.data, tokenizer, total_blocks=num_blocks, sources=sources, emit_sources=True,
                                   held_out=held_out)

        collator = collating[0].collator(DataParts(cfg, model, tokenizer, num_blocks, blocks))
    return RunData(train_set, eval_sets, collator, [ReplayMixerCallback(train_set)],
                   cleaning=getattr(train_set, "cleaning", None))


def build_trainer(cfg: CPTConfig, args: Any, model: Any, tokenizer: Any, data: RunData,
                  vocab_summary: dict[str, Any] | None = None) -> Any:
    """A stock `transformers.Trainer` with the forgetting monitor first, the data's callbacks, and what each
    enabled technique adds in registry order (`Technique.setup`: its callbacks, optimizer/schedule, loss; a hook
    it returns runs once the Trainer exists, e.g. to add a callback ahead of the reporting integrations)."""
    from transformers import Trainer

    parts = TrainerParts(cfg=cfg, args=args, model=model, tokenizer=tokenizer, data=data,
                         vocab_summary=vocab_summary, callbacks=[ForgettingMonitorCallback(cfg.monitor),
                                                                 *data.callbacks])
    after = [hook for t in enabled_techniques(cfg) if t.setup is not None and (hook := t.setup(parts)) is not None]
    trainer_class = Trainer
    if any(f is not None for f in (parts.optimizer_factory, parts.scheduler_factory, parts.decay_parameter_names)):
        trainer_class = _trainer_with_factories(Trainer, parts.optimizer_factory, parts.scheduler_factory,
                                                parts.decay_parameter_names)
    trainer = trainer_class(model=parts.model, args=args, train_dataset=data.train_set, eval_dataset=data.eval_sets,
                            data_collator=data.collator, processing_class=tokenizer, callbacks=parts.callbacks,
                            optimizers=parts.optimizers)
    wanted = requested_sharding(args)
    if wanted == "FSDP" and not trainer.is_fsdp_enabled or wanted == "DeepSpeed" and not trainer.is_deepspeed_enabled:
        raise ValueError(f"{wanted} was requested but accelerate set up {trainer.accelerator.distributed_type}: the "
                         f"run would not be sharded; check the accelerate config, or drop {wanted} to run DDP")
    for hook in after:
        hook(trainer)
    swap_progress_bar(trainer, cfg.data.block_size)  # one bar, tokens/s, evaluations inside it (not nested)
    return trainer


def _trainer_with_factories(base: type, optimizer_factory: Any, scheduler_factory: Any,
                            decay_parameter_names: Any = None) -> type:
    """`base` (a `Trainer` class) whose own `create_optimizer` / `create_scheduler` build the optimizer and the LR
    schedule from the techniques' factories, on the model it trains: the same objects as passing them ready-made,
    also under FSDP (which refuses `Trainer(optimizers=...)`; tests/distributed/test_fsdp_equal.py). Its own
    optimizer (no factory) decays the parameters `decay_parameter_names(model)` names, when given."""

    class CPTTrainer(base):
        def get_decay_parameter_names(self, model):
            if decay_parameter_names is None:
                return super().get_decay_parameter_names(model)
            return decay_parameter_names(model)

        def create_optimizer(self, model=None):
            if self.optimizer is None and optimizer_factory is not None:
                self.optimizer = optimizer_factory(self.model if model is None else model)
            return super().create_optimizer(model)  # keeps one already set

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None and scheduler_factory is not None:
                self.lr_scheduler = scheduler_factory(self.optimizer if optimizer is None else optimizer,
                                                      num_training_steps)
                self._created_lr_scheduler = True  # rebuilt by a second `train()`, as the Trainer's own
            return super().create_scheduler(num_training_steps, optimizer)

    return CPTTrainer


def collect_metrics(cfg: CPTConfig, trainer: Any, train_out: Any, data: RunData, resumed_from: str | None,
                    vocab_summary: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers `metrics.json` and the model card report, read from the live callbacks (a resumed run rebuilds
    them from their checkpoint state)."""
    from .models import base_model_id

    live = trainer.callback_handler.callbacks
    monitor = next(c for c in live if isinstance(c, ForgettingMonitorCallback))
    mixer_cb = next((c for c in live if isinstance(c, ReplayMixerCallback)), None)
    train_tokens = mixer_cb.tokens_per_source if mixer_cb is not None else \
        dict(getattr(data.collator, "tokens_per_source", {}))
    runtime = train_out.metrics.get("train_runtime", 0)
    return {
        "model": cfg.model.name_or_path,
        "base_model": base_model_id(cfg.model.name_or_path),
        "global_step": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "resumed_from": resumed_from,
        "train_tokens": train_tokens,
        "train_loss": train_out.training_loss,
        "train_runtime_s": train_out.metrics.get("train_runtime"),
        "train_tokens_per_s": sum(train_tokens.values()) / max(runtime, 1e-9),
        "total_runtime_s": None,
        "vocab": vocab_summary,
        "distilled_tokens": getattr(data.collator, "tokens_distilled", None),
        "forgetting": monitor.summary(),
        "eval_history": monitor.history,
        "downstream": _downstream_summary(live),
        "cleaning": data.cleaning,  # data cleaning (issue 34)
        "log_history": trainer.state.log_history,
    }


def _downstream_summary(callbacks: list[Any]) -> dict[str, Any] | None:
    from ..callbacks.downstream import DownstreamEvalCallback

    found = next((c for c in callbacks if isinstance(c, DownstreamEvalCallback)), None)
    return found.summary() if found is not None else None


def run_cpt(cfg: CPTConfig, output_dir: str | Path | None = None, overwrite: bool = False,
            resume: bool = False, hub_token: str | None = None) -> CPTResult:
    """Continue pretraining `cfg.model` on `cfg.data` and write the adapted model to `output_dir`.

    Args:
        cfg: the run configuration.
        output_dir: overrides `cfg.output_dir`.
        overwrite: replace a non-empty `output_dir` (only once the new run has finished).
        resume: continue from the last checkpoint in `<output_dir>.checkpoints` (see [`checkpoint_dir`]);
            refused when those checkpoints were written with a different config.
        hub_token: token for `hub.push_to_hub`; default: `HF_TOKEN` or the `hf auth login` cache. Checked
            before training starts.

    Returns:
        a [`CPTResult`] with the final directory and the metrics also written to `metrics.json`.

    Output files: `model.safetensors` (+ config, tokenizer), `hf_cpt_config.yaml`, `metrics.json`,
    `forgetting.png`, `README.md` (model card); pushed to `hub.repo_id` when `hub.push_to_hub`. A run that
    fails leaves no output directory behind. With
    `train.save_steps` > 0, checkpoints go to `<output_dir>.checkpoints` and are deleted after success unless
    `train.keep_checkpoints`. Under `torchrun`/`accelerate launch` every process calls this; only the main one
    writes files. While it runs, the main process holds `<output_dir>.lock` (see [`OutputDirLock`]): a second run
    into the same `output_dir` raises `OutputDirBusyError`, naming this one, before it reads or writes anything.
    """
    from accelerate import PartialState

    output_dir = output_dir or cfg.output_dir
    if not output_dir:
        raise ValueError("`output_dir` is not set: pass it or set `output_dir` in the config")
    start = time.perf_counter()
    args = build_training_args(cfg, output_dir)  # also sets up the process group under torchrun
    state = PartialState()
    final = Path(output_dir).expanduser().resolve()
    # from here to the end one run owns `final` and its checkpoints: a second one stops, naming this one
    with OutputDirLock(final) if state.is_main_process else contextlib.nullcontext():
        return _run_owned(cfg, args, state, final, overwrite, resume, hub_token, start)


def _run_owned(cfg: CPTConfig, args: Any, state: Any, final: Path, overwrite: bool, resume: bool,
               hub_token: str | None, start: float) -> CPTResult:
    """[`run_cpt`] once its output directory is locked: checks, staging directory, training, commit, push."""
    ckpt = checkpoint_dir(final)
    last = find_resume_checkpoint(cfg, ckpt, resume)
    from .data import check_data_paths

    cfg.check_held_out_sets()  # the monitor's general and domain sets exist
    check_data_paths(cfg.data)  # a bad path or file fails here, before the output dir or the model
    config_preflight(cfg)  # the model's config and tokenizer, and what techniques check on them: no weights yet
    # techniques' first and last steps on the main process (`Technique.before_run` / `after_run`), e.g. the Hub
    # checks its push token here, before training, and pushes once the output directory is complete
    staged = [t for t in enabled_techniques(cfg) if t.before_run is not None or t.after_run is not None]
    options = {"hub_token": hub_token}
    run_state = {t.name: t.hook("before_run")(cfg, options) if t.before_run is not None else None
                 for t in staged} if state.is_main_process else {}
    tmp = _shared_staging_dir(final, overwrite, state)
    try:
        args.output_dir = str(ckpt if cfg.train.save_steps else tmp / "checkpoints")
        if cfg.train.save_steps and state.is_main_process:
            cfg.save_pretrained(ckpt)  # what a later --resume compares itself against
        metrics = _train_and_write(cfg, args, tmp, last, start, final)
        state.wait_for_everyone()
    except BaseException as e:
        full = disk_full_error(e, tmp, ckpt) if isinstance(e, Exception) else None  # before the cleanup frees it
        if state.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            # a save cut short (e.g. by Ctrl-C) is no checkpoint; with no complete one left, nothing to resume
            if cfg.train.save_steps and last_complete_checkpoint(ckpt, remove_partial=True) is None:
                shutil.rmtree(ckpt, ignore_errors=True)
        if full is not None:
            raise full from e
        raise
    if state.is_main_process:
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
        commit_staging_dir(tmp, final)
        if cfg.train.save_steps and not cfg.train.keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
        for t in staged:
            if t.after_run is not None:
                t.hook("after_run")(cfg, final, metrics, run_state[t.name])
    state.wait_for_everyone()
    return CPTResult(output_dir=final, metrics=metrics)


def _shared_staging_dir(final: Path, overwrite: bool, state: Any) -> Path:
    """The staging directory the main process creates, made known to every process."""
    tmp = make_staging_dir(final, overwrite) if state.is_main_process else None
    if state.num_processes > 1:
        holder = [str(tmp) if tmp else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        tmp = Path(holder[0])
    return tmp


def _train_and_write(cfg: CPTConfig, args: Any, tmp: Path, last: str | None, start: float,
                     final: Path) -> dict[str, Any]:
    """Build, train (resuming from `last`), and write the results into the staging directory `tmp` (committed to
    `final` afterwards: the summary sentence names it)."""
    model, tokenizer, vocab_summary = build_model(cfg)
    preflight(cfg, model, args)  # what needs the model or the launcher, before any data is built
    data = build_data(cfg, model, tokenizer, args)
    finished = last is not None and data.stream and _checkpoint_step(last) >= cfg.train.max_steps
    if finished:
        # killed after its last checkpoint (e.g. while writing outputs): the Trainer would take one more step on
        # an iterable set, so it gets no blocks; it still restores weights and callback states, then stops
        data = dataclasses.replace(data, train_set=_NoBlocks())
        args.accelerator_config.dispatch_batches = False  # accelerate's dispatcher refuses an empty stream
    trainer = build_trainer(cfg, args, model, tokenizer, data, vocab_summary)
    if last is not None:
        args.eval_on_start = False  # step 0 is in the restored monitor history; do not evaluate the resume step
    with _quiet_empty_epoch(finished):
        train_out = trainer.train(resume_from_checkpoint=last)
    metrics = collect_metrics(cfg, trainer, train_out, data, last, vocab_summary)
    save_full_model(trainer, tmp)
    for technique in enabled_techniques(cfg):  # e.g. a LoRA adapter merged into its base
        if technique.finish is not None:
            technique.finish(cfg, trainer, tmp)
    # training_args.bin is a pickle; the recipe is recorded as YAML instead (safetensors/text only)
    (tmp / "training_args.bin").unlink(missing_ok=True)
    if trainer.is_world_process_zero():
        metrics["total_runtime_s"] = time.perf_counter() - start
        metrics["summary"] = summarize_run(metrics["forgetting"], cfg.monitor.domain, str(final))
        write_outputs(cfg, tmp, metrics)
    return metrics


def save_full_model(trainer: Any, directory: str | Path) -> None:
    """The trained model as full safetensors (with the tokenizer) in `directory`, from the main process, whatever
    the process layout; every process must call it.

    Without FSDP this is `Trainer.save_model`. Under FSDP that writes nothing with `SHARDED_STATE_DICT` (the
    shipped accelerate config) and, with `FULL_STATE_DICT`, writes a tied head twice: the gathered tensors no
    longer share storage, so `save_pretrained` cannot see the tie. Here every process joins the gather of the
    full state dict and the main process writes it with tied parameters aliased again, so `save_pretrained` keeps
    one copy as in a one-process save (tests/distributed/test_fsdp_equal.py)."""
    if not trainer.is_fsdp_enabled:
        trainer.save_model(str(directory))
        return
    state = trainer.accelerator.get_state_dict(trainer.model)  # a collective; the full tensors on the main process
    if not trainer.args.should_save:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state:  # tied parameters: one object under several names
            state[name] = state[first.setdefault(id(param), name)]
    model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(directory))


def _checkpoint_step(checkpoint: str) -> int:
    import json

    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


class _NoBlocks(torch.utils.data.IterableDataset):
    """An empty training stream: resuming a checkpoint taken at `max_steps` restores it without training."""

    def __iter__(self):
        return iter(())


@contextlib.contextmanager
def _quiet_empty_epoch(active: bool):
    """Hide the Trainer's warning about an epoch without samples while finishing a run that had none left."""
    def drop(record: logging.LogRecord) -> bool:
        return "not to be a single sample" not in record.getMessage()

    trainer_logger = logging.getLogger("transformers.trainer")
    if active:
        trainer_logger.addFilter(drop)
    try:
        yield
    finally:
        trainer_logger.removeFilter(drop)
