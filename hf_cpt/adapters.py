"""PEFT for continual pretraining: LoRA on the body with trainable embeddings (all rows, or only new token rows),
and a guard that every parameter meant to train actually changes.

Two silent failures this guards against: a LoRA adapter on `lm_head` read around by a fused/chunked loss (it
gets no gradient; see `hf_cpt.losses.lm_head_has_lora`), and new-token embedding rows that never train (frozen,
or never seen in the data). [`TrainedParametersCallback`] (in `hf_cpt.callbacks`) checks after a few updates that each trainable
parameter moved, and names the ones that did not.

From YAML, a `lora:` block ([`LoraAdapterConfig`]) wraps the model the recipe trains: rank, alpha, dropout, target
modules, modules to save and the embedding rows to train; the run then writes the adapter merged into its base
(`save: merged`, a plain checkpoint like every other run's) or the adapter alone (`save: adapter`, load it with
peft; `hf-cpt merge` merges it later). LoRA "learns less and forgets less" (Biderman et al. 2024, arXiv 2405.09673).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .import_utils import require
from .registry import Technique, TrainerParts, names
from .validation import check_choice, check_int, check_name, check_number

if TYPE_CHECKING:  # pragma: no cover
    from .config import CPTConfig

EMBEDDING_MODES = ("new_rows", "all", "none")
SAVE_MODES = ("merged", "adapter")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class LoraAdapterConfig:
    """The `lora:` block: train a LoRA adapter (peft) instead of every weight."""

    r: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: str | list[str] = field(
        default="all-linear", metadata={"help": "Modules that get an adapter: `all-linear` (every linear layer but "
                                                "the output head) or a list of module names."})
    modules_to_save: list[str] = field(
        default_factory=list, metadata={"help": "Modules trained in full and saved beside the adapter (e.g. a norm)."})
    embeddings: str = field(
        default="auto", metadata={"help": "Embedding rows that train: `auto` (the new rows of a `vocab:` run, else "
                                          "none), `new_rows`, `all` (embeddings and head in full) or `none`."})
    save: str = field(default="merged", metadata={"help": "`merged`: the output is the base with the adapter merged "
                                                          "in; `adapter`: the adapter files only (peft)."})

    def __post_init__(self) -> None:
        check_int("r", self.r)
        self.alpha = check_number("alpha", self.alpha, 0.0, min_inclusive=False)
        self.dropout = check_number("dropout", self.dropout, 0.0, 1.0, max_inclusive=False)
        if isinstance(self.target_modules, str):
            check_name("target_modules", self.target_modules)
        else:
            for i, name in enumerate(self.target_modules):
                check_name(f"target_modules[{i}]", name)
            if "lm_head" in self.target_modules:
                raise ValueError("`target_modules` includes lm_head: a LoRA adapter there gets no gradient from fused "
                                 "or chunked losses; train the head with `embeddings: all` instead")
        for i, name in enumerate(self.modules_to_save):
            check_name(f"modules_to_save[{i}]", name)
        check_choice("embeddings", self.embeddings, ("auto", *EMBEDDING_MODES))
        check_choice("save", self.save, SAVE_MODES)


def add_lora_for_cpt(model: torch.nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
                     target_modules: str | Sequence[str] = "all-linear", embeddings: str = "new_rows",
                     new_token_ids: Sequence[int] | None = None, training_args: Any = None,
                     modules_to_save: Sequence[str] = ()) -> Any:
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
        modules_to_save: more modules trained in full and saved with the adapter.
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
    if modules_to_save:
        kwargs["modules_to_save"] = sorted({*kwargs.get("modules_to_save", ()), *modules_to_save})
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if not isinstance(targets, str) and "lm_head" in targets:
        raise ValueError("`target_modules` includes lm_head: a LoRA adapter there gets no gradient from fused or "
                         "chunked losses; train the head with `embeddings='all'` instead")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             task_type="CAUSAL_LM", **kwargs)
    return peft.get_peft_model(model, config)


# --- registry entry ---------------------------------------------------------------------------------------------------
def _check(cfg: CPTConfig) -> None:
    lora = cfg.lora
    if lora is None:
        return
    if cfg.objective != "clm":
        raise ValueError("`lora`: LoRA from the recipe wraps causal LMs (`objective: clm`); remove `lora` for a masked "
                         "LM")
    if cfg.train.trainable != "all" or cfg.active_forgetting is not None:
        raise ValueError("`lora` freezes the base and trains adapters, so `train.trainable: embeddings` and "
                         "`active_forgetting` (which pick the trainable embeddings themselves) do not apply: remove "
                         "one of them")
    if lora.embeddings == "new_rows" and cfg.vocab is None:
        raise ValueError("`lora.embeddings` is new_rows but there is no `vocab:` block adding rows: use `none` or "
                         "`all`, or add `vocab:`")


def _preflight(cfg: CPTConfig, model: Any, args: Any) -> None:
    require("peft", "LoRA continual pretraining")  # before any data is built


def _setup(parts: TrainerParts) -> None:
    from .callbacks.trained_parameters import TrainedParametersCallback

    lora, summary = parts.cfg.lora, parts.vocab_summary
    embeddings = lora.embeddings
    if embeddings == "auto":
        embeddings = "new_rows" if summary and summary.get("added") else "none"
    new_ids = None
    if embeddings == "new_rows":
        start = summary["old_vocab_size"]
        new_ids = list(range(start, start + summary["added"]))
    # the model the Trainer gets: the base (vocabulary-extended, its loss chosen) wrapped in the adapter
    parts.model = add_lora_for_cpt(parts.model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                   target_modules=lora.target_modules, embeddings=embeddings, new_token_ids=new_ids,
                                   training_args=parts.args, modules_to_save=lora.modules_to_save)
    parts.callbacks.append(TrainedParametersCallback(check_after=3, action="warn"))


def _finish(cfg: CPTConfig, trainer: Any, directory: Path) -> None:
    """`save: merged`: replace the adapter files `save_model` wrote by the base with the adapter merged in."""
    if cfg.lora.save != "merged":
        return
    from .utils import unwrap_model

    merged = unwrap_model(trainer.model).merge_and_unload()
    if trainer.is_world_process_zero():
        merged.save_pretrained(str(directory), safe_serialization=True)
        for name in ADAPTER_FILES:
            (Path(directory) / name).unlink(missing_ok=True)


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    lora = config.get("lora")
    if not lora:
        return []
    targets = lora.get("target_modules")
    targets = targets if isinstance(targets, str) else ", ".join(targets)
    return [f"LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')} on {targets}"
            f" (embeddings: {lora.get('embeddings')}); "
            + ("**these weights are the base with the adapter merged in**" if lora.get("save") == "merged"
               else "**this is the adapter only**: load it with peft on the base model")]


TECHNIQUE = Technique(
    name="LoRA",
    key="lora",
    config=LoraAdapterConfig,
    exports=names("adapters", "LoraAdapterConfig", "add_lora_for_cpt"),
    check=_check,
    unsharded="the recipe's LoRA runs merge and save an unsharded adapter",
    preflight=_preflight,
    setup=_setup,
    finish=_finish,
    card=_card,
)
