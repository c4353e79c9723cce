"""The continual-pretraining job behind `hf-cpt train`, as one public function: [`run_cpt`].

It only wires together what a Trainer user would: load model and data, mix, train with
`transformers.Trainer` plus [`ForgettingMonitorCallback`], then write the adapted checkpoint, its config,
metrics, forgetting plot and model card into the output directory, atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .callbacks.active_forgetting import ActiveForgettingCallback, relearn_embeddings
from .callbacks.forgetting import ForgettingMonitorCallback
from .callbacks.replay_mixer import ReplayMixerCallback
from .callbacks.rewarm import RewarmCallback, make_rewarm_optimizer, make_rewarm_scheduler
from .config import CPTConfig
from .utils import commit_staging_dir, make_staging_dir

logger = logging.getLogger(__name__)

CONFIG_FILE = "hf_cpt_config.yaml"
METRICS_FILE = "metrics.json"
PLOT_FILE = "forgetting.png"


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
        lr_scheduler_type=t.lr_scheduler_type,
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
        gradient_checkpointing=t.gradient_checkpointing,
        report_to=t.report_to or "none",
        # the ReplayMixer restores its own position; map-style masked data is skipped by the Trainer as usual
        ignore_data_skip=cfg.masking is None,
        remove_unused_columns=cfg.masking is None,  # span columns reach the collator
        prediction_loss_only=True,  # evaluation needs the loss only; the chunked loss returns no logits
        restore_callback_states_from_checkpoint=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # several processes and no GPU (torchrun on CPU): accelerate only sets up gloo DDP when told `cpu`
        use_cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )
    kwargs.update(t.training_args)
    return TrainingArguments(**kwargs)


def build_rewarm_optimizers(model, cfg: CPTConfig, args) -> tuple:
    """AdamW (embeddings in their own group at `schedule.embedding_lr_ratio`) and the rewarming scheduler,
    with the betas/eps/weight decay of `args`, for `Trainer(optimizers=...)`."""
    optimizer = make_rewarm_optimizer(
        model, cfg.schedule, learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )
    return optimizer, make_rewarm_scheduler(optimizer, cfg.schedule, args.max_steps)


def setup_loss(model, cfg: CPTConfig, args) -> str:
    """Liger kernels where they can run (`train.use_liger`), else the chunked loss (`train.chunked_loss`) where
    the model supports it; returns which, and logs one line saying so."""
    from .liger import resolve_liger
    from .losses import apply_chunked_loss, supports_chunked_loss

    use, note = resolve_liger(cfg.train.use_liger, model)
    if use:
        args.use_liger_kernel = True
        logger.info(note)
        return "liger"
    if cfg.train.use_liger != "false":
        logger.info(note)
    mode = cfg.train.chunked_loss
    reason = supports_chunked_loss(model)
    if mode == "false" or (mode == "auto" and reason is not None):
        if reason and mode == "auto":
            logger.info("chunked loss off: %s", reason)
        return "standard"
    apply_chunked_loss(model, cfg.train.loss_chunk_size or None)  # raises with the reason when `true` cannot apply
    logger.info("chunked cross-entropy on (%s tokens per chunk): no full logits tensor",
                cfg.train.loss_chunk_size or "auto")
    return "chunked"


def _base_model_id(name_or_path: str) -> str | None:
    from .models import EMBEDDED_MODELS

    if name_or_path in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name_or_path]["hub_id"]
    return None if os.path.exists(os.path.expanduser(name_or_path)) else name_or_path


def check_data_paths(cfg: CPTConfig) -> None:
    """Resolve every data path of `cfg` and check the held-out splits the monitor needs, without loading data.

    Raises:
        FileNotFoundError / ValueError: naming the field (`data.domain.train`, ...).
    """
    from .data import resolve_data_files

    for name in ("domain", "general"):
        source = getattr(cfg.data, name)
        if source is None:
            continue
        for split in ("train", "eval"):
            spec = getattr(source, split)
            if spec is not None and not spec.startswith("hub:"):
                resolve_data_files(spec, f"data.{name}.{split}")
    for name in ("domain", "general"):
        source = getattr(cfg.data, name)
        if source is None or source.eval is None:
            raise ValueError(f"`data.{name}.eval` is not set: the forgetting monitor needs a held-out split "
                             f"of the {name} text")


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where a run writing `output_dir` keeps its Trainer checkpoints: `<output_dir>.checkpoints`, next to it,
    so they survive a crash (the output directory itself only appears, complete, at the end)."""
    final = Path(output_dir).expanduser().resolve()
    return final.with_name(final.name + ".checkpoints")


def _check_resumable(cfg: CPTConfig, ckpt_dir: Path) -> None:
    """Refuse to resume checkpoints written by a different recipe (ratios, vocabulary, schedule, ...)."""
    saved_path = ckpt_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise ValueError(f"{str(ckpt_dir)!r} has no {CONFIG_FILE}: it was not written by `hf-cpt train`; "
                         "resume it with the Python API or delete it")
    saved = CPTConfig.from_yaml(saved_path).to_dict()
    now = cfg.to_dict()
    # fields that do not change what the resumed run computes
    for d in (saved, now):
        d.pop("output_dir", None)
        d.pop("description", None)
        d["train"].pop("report_to", None)
        d["train"].pop("logging_steps", None)
    diffs = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            diffs.append(f"`{path}`: {a!r} -> {b!r}")

    walk(saved, now, "")
    if diffs:
        raise ValueError(f"the checkpoints in {str(ckpt_dir)!r} were written with another config ("
                         + "; ".join(diffs[:6]) + "); resuming would silently mix two recipes. Restore the "
                         "original values, or delete the checkpoints to start over")


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
    writes files.
    """
    from accelerate import PartialState
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = output_dir or cfg.output_dir
    if not output_dir:
        raise ValueError("`output_dir` is not set: pass it or set `output_dir` in the config")
    start = time.perf_counter()
    args = build_training_args(cfg, output_dir)  # also sets up the process group under torchrun
    state = PartialState()
    final = Path(output_dir).expanduser().resolve()
    ckpt = checkpoint_dir(final)
    last = None
    if cfg.train.save_steps:
        existing = get_last_checkpoint(str(ckpt)) if ckpt.is_dir() else None
        if resume:
            if existing is None:
                raise FileNotFoundError(f"nothing to resume: no checkpoint in {str(ckpt)!r}")
            _check_resumable(cfg, ckpt)
            last = existing
        elif existing is not None:
            raise FileExistsError(f"checkpoints of an earlier run are in {str(ckpt)!r}: pass `resume=True` "
                                  "(CLI: --resume) to continue it, or delete them to start over")
    elif resume:
        raise ValueError("`resume` needs checkpoints: set `train.save_steps` > 0")
    push_token = None
    if cfg.hub.push_to_hub and state.is_main_process:  # fail before training, not after it
        from .hub import check_push_access

        push_token = check_push_access(cfg.hub.repo_id, token=hub_token)
    tmp = make_staging_dir(final, overwrite) if state.is_main_process else None
    if state.num_processes > 1:
        holder = [str(tmp) if tmp else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        tmp = Path(holder[0])
    try:
        if cfg.train.save_steps:
            args.output_dir = str(ckpt)
            if state.is_main_process:
                ckpt.mkdir(parents=True, exist_ok=True)
                (ckpt / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
        else:
            args.output_dir = str(tmp / "checkpoints")
        metrics = _train_and_write(cfg, args, tmp, last, start)
        state.wait_for_everyone()
    except BaseException:
        if state.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if state.is_main_process:
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
        commit_staging_dir(tmp, final)
        if cfg.train.save_steps and not cfg.train.keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
        if cfg.hub.push_to_hub:
            from .hub import push_adapted

            metrics["hub_commit_url"] = push_adapted(final, cfg.hub.repo_id, private=cfg.hub.private,
                                                     revision=cfg.hub.revision, token=push_token)
    state.wait_for_everyone()
    return CPTResult(output_dir=final, metrics=metrics)


def _train_and_write(cfg: CPTConfig, args, tmp: Path, last: str | None, start: float) -> dict[str, Any]:
    """Build model, data and Trainer, train (resuming from `last`), and write the results into `tmp`."""
    from transformers import Trainer, default_data_collator

    from .data import build_eval_sets, build_train_set
    from .model_card import render_model_card
    from .models import load_model_and_tokenizer
    from .plotting import plot_forgetting

    check_data_paths(cfg)  # fail on a bad path before spending time on the model
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.objective)
    vocab_summary = None
    if cfg.vocab is not None:  # deterministic, so a resumed run rebuilds the same extended model
        from .vocab.extend import extend_vocabulary, vocab_corpora

        model, tokenizer, vocab_summary = extend_vocabulary(model, tokenizer, cfg.vocab, *vocab_corpora(cfg))
    num_blocks = cfg.train.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    num_blocks *= args.world_size
    callbacks: list = []
    if cfg.masking is not None:
        from .collators.data import build_masked_data
        from .collators.masking import MaskingStatsCallback

        train_set, eval_sets, data_collator, train_collator = build_masked_data(cfg, tokenizer)
        if hasattr(train_collator, "pop_stats"):
            callbacks.append(MaskingStatsCallback(train_collator))
    else:
        eval_sets = build_eval_sets(cfg.data, tokenizer)
        train_set = build_train_set(cfg.data, tokenizer, total_blocks=num_blocks)
        data_collator = default_data_collator
        callbacks.append(ReplayMixerCallback(train_set))
    monitor = ForgettingMonitorCallback(cfg.monitor)
    callbacks.insert(0, monitor)
    optimizers: tuple = (None, None)
    loss_mode = setup_loss(model, cfg, args) if cfg.objective == "clm" else "standard"
    if cfg.masking is not None and cfg.objective == "clm" and cfg.masking.span_weight != 1 and loss_mode != "chunked":
        raise ValueError(f"`masking.span_weight` ({cfg.masking.span_weight}) weights the loss through hf-cpt's "
                         f"chunked loss, which is off here ({loss_mode}): set `train.chunked_loss: true` and "
                         "`train.use_liger: false`, or `masking.span_weight: 1`")
    if cfg.train.trainable == "embeddings":
        relearn_embeddings(model)
    if cfg.vocab is not None and cfg.vocab.new_rows_first_steps:
        from .vocab.extend import NewRowsFirstCallback

        callbacks.append(NewRowsFirstCallback(vocab_summary["old_vocab_size"], cfg.vocab.new_rows_first_steps))
    if cfg.active_forgetting is not None:
        callbacks.append(ActiveForgettingCallback(cfg.active_forgetting))
    if cfg.schedule is not None:
        optimizers = build_rewarm_optimizers(model, cfg, args)
        callbacks.append(RewarmCallback(cfg.schedule))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_sets,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=optimizers,
    )
    if last is not None:
        args.eval_on_start = False  # step 0 is in the restored monitor history; do not evaluate the resume step
    train_out = trainer.train(resume_from_checkpoint=last)
    # a resumed run rebuilds callbacks from their checkpoint state: read the live ones
    monitor = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ForgettingMonitorCallback))
    mixer_cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, ReplayMixerCallback)), None)
    train_tokens = mixer_cb.tokens_per_source if mixer_cb is not None else \
        dict(getattr(data_collator, "tokens_per_source", {}))
    trainer.save_model(str(tmp))
    # training_args.bin is a pickle; the recipe is recorded as YAML instead (safetensors/text only)
    (tmp / "training_args.bin").unlink(missing_ok=True)
    metrics: dict[str, Any] = {
        "model": cfg.model.name_or_path,
        "base_model": _base_model_id(cfg.model.name_or_path),
        "global_step": trainer.state.global_step,
        "world_size": args.world_size,
        "resumed_from": last,
        "train_tokens": train_tokens,
        "train_loss": train_out.training_loss,
        "train_runtime_s": train_out.metrics.get("train_runtime"),
        "train_tokens_per_s": sum(train_tokens.values()) / max(train_out.metrics.get("train_runtime", 0), 1e-9),
        "total_runtime_s": None,
        "vocab": vocab_summary,
        "forgetting": monitor.summary(),
        "eval_history": monitor.history,
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        (tmp / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
        plot_forgetting(
            monitor.history, tmp / PLOT_FILE, cfg.monitor.general, cfg.monitor.domain,
            tolerance=cfg.monitor.tolerance, tolerance_mode=cfg.monitor.tolerance_mode,
            title=f"hf-cpt: {cfg.model.name_or_path}",
        )
        if vocab_summary is not None:
            (tmp / "hf_cpt_vocab.json").write_text(json.dumps(vocab_summary, indent=2, ensure_ascii=False),
                                                  encoding="utf-8")
        metrics["total_runtime_s"] = time.perf_counter() - start
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        card = render_model_card(cfg.to_dict(), metrics, repo_id=cfg.hub.repo_id if cfg.hub.push_to_hub else None)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return metrics
