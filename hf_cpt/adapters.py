"""PEFT for continual pretraining: LoRA on the body with trainable embeddings (all rows, or only new token rows),
and a guard that every parameter meant to train actually changes.

Two silent failures this guards against: a LoRA adapter on `lm_head` read around by a fused/chunked loss (it
gets no gradient; see `hf_cpt.losses.lm_head_has_lora`), and new-token embedding rows that never train (frozen,
or never seen in the data). [`TrainedParametersCallback`] (in `hf_cpt.callbacks`) checks after a few updates that each trainable
parameter moved, and names the ones that did not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .import_utils import require

EMBEDDING_MODES = ("new_rows", "all", "none")


def add_lora_for_cpt(model: torch.nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
                     target_modules: str | Sequence[str] = "all-linear", embeddings: str = "new_rows",
                     new_token_ids: Sequence[int] | None = None, training_args: Any = None) -> Any:
    """Wrap `model` in a PEFT LoRA model for continual pretraining.

    Args:
        r / alpha / dropout / target_modules: LoRA settings (`all-linear` leaves the output head out).
        embeddings: `new_rows` (train only `new_token_ids` rows of the input embeddings, and of a tied head, via
            peft's `trainable_token_indices`; old rows stay bit-identical), `all` (full embeddings and head
            trainable through `modules_to_save`) or `none`.
        new_token_ids: rows to train with `embeddings="new_rows"`.
        training_args: the run's `TrainingArguments`, if at hand. Under FSDP (asked for by them or by `accelerate
            launch`) only `embeddings="none"` is supported: with `new_rows` or `all`, peft's wrappers of a tied
            embedding and head share parameters across FSDP units and `fully_shard` fails while the Trainer wraps
            the model (measured on the tiny tied Llama, tests/distributed), so they are refused here.
    """
    from .utils import requested_sharding

    peft = require("peft", "LoRA continual pretraining")
    if embeddings not in EMBEDDING_MODES:
        raise ValueError(f"`embeddings` must be one of {EMBEDDING_MODES}, got {embeddings!r}")
    if embeddings != "none" and requested_sharding(training_args) == "FSDP":
        raise ValueError(f"`embeddings={embeddings!r}` does not work under FSDP (peft's embedding wrappers share "
                         "parameters across FSDP units and `fully_shard` fails): use `embeddings='none'` with FSDP, "
                         "or train the embeddings with DDP or a single process")
    kwargs: dict[str, Any] = {}
    if embeddings == "new_rows":
        if not new_token_ids:
            raise ValueError("`new_token_ids` is required with `embeddings='new_rows'` (the rows to train)")
        vocab = model.get_input_embeddings().weight.shape[0]
        bad = [i for i in new_token_ids if not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(f"`new_token_ids` {bad[:5]} are outside the embedding matrix ({vocab} rows): resize "
                             "the embeddings first (`model.resize_token_embeddings(len(tokenizer))`)")
        kwargs["trainable_token_indices"] = [int(i) for i in new_token_ids]
    elif embeddings == "all":
        names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                 if m is model.get_input_embeddings() or m is model.get_output_embeddings()}
        kwargs["modules_to_save"] = sorted(names)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if not isinstance(targets, str) and "lm_head" in targets:
        raise ValueError("`target_modules` includes lm_head: a LoRA adapter there gets no gradient from fused or "
                         "chunked losses; train the head with `embeddings='all'` instead")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             task_type="CAUSAL_LM", **kwargs)
    return peft.get_peft_model(model, config)
