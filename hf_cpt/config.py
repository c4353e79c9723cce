"""Configuration of a continual-pretraining run: dataclasses that both the Python API and the YAML templates use.

`CPTConfig.from_yaml(path)` / `CPTConfig.from_dict(d)` build the same objects a Python user builds by hand;
every error names the offending field by its dotted path (``data.replay_ratio``) and says how to fix it.
`save_pretrained` / `from_pretrained` are the one place `hf_cpt_config.yaml` is written and read; `override`
changes fields through `dataclasses.replace`, so validation always runs.

Layering: this module sits above the techniques (it imports their `*Config` dataclasses, and with them torch
and transformers) and below the run recipe (`hf_cpt.recipe`) and the CLI; see docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .adapters import LoraAdapterConfig
from .callbacks.active_forgetting import ActiveForgettingConfig
from .callbacks.downstream import DownstreamConfig
from .callbacks.forgetting import ForgettingMonitorConfig
from .callbacks.rewarm import RewarmConfig
from .callbacks.merge_base import MergeBaseConfig
from .callbacks.weight_averaging import WeightAveragingConfig
from .collators.distill_replay import DistillConfig
from .collators.masking import MASKING_KINDS, MaskingConfig
from .data_clean import DecontaminateConfig, DedupConfig  # data cleaning (issue 34)
from .hub import HubConfig
from .mixers.core import RatioStage
from .mixers.packing import ADD_BOS, PACKINGS
from .mixers.replay import GRANULARITIES, ON_EXHAUSTED
from .registry import Technique, extension_techniques, techniques
from .synth import SELF, SynthConfig
from .validation import (ConfigTypeError, check_bool, check_choice, check_flag, check_fraction, check_int,
                         check_known_name, check_name, check_number)
from .vocab.extend import VocabConfig
from .yaml_loader import load_yaml

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m"
DTYPES = ("float32", "bfloat16", "float16", "auto")
SELF_EVAL_SET = "general_self"  # the held-out set of self-synthesised text (`data.synth.eval_tokens`)
CONFIG_FILE = "hf_cpt_config.yaml"  # the resolved recipe, next to every adapted model and in its checkpoints
OBJECTIVES = ("clm", "mlm")
EVAL_KINDS = ("general", "domain")  # what a held-out set measures: forgetting (KL to base) or adaptation
BUILT_IN_SETS = ("general", "domain", SELF_EVAL_SET)  # `data.general.eval`, `data.domain.eval`, `data.synth`
_SET_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
TRAINABLE = ("all", "embeddings")


@dataclass
class ModelConfig:
    """Which model to continue pretraining, and how to load it."""

    name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": "A local directory, a Hub id, or `embedded:smollm2-135m` (offline default)."},
    )
    dtype: str = field(default="float32", metadata={"help": f"Weights dtype, one of {DTYPES}."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code from the Hub repo. Off unless you trust it."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. `sdpa`, `eager`."})

    def __post_init__(self) -> None:
        check_name("name_or_path", self.name_or_path)
        check_choice("dtype", self.dtype, DTYPES)
        check_bool("trust_remote_code", self.trust_remote_code)


@dataclass
class SourceConfig:
    """One text corpus: a training split and an optional held-out split.

    A split is a local file, directory or glob (`.jsonl`/`.json`, `.txt`, `.parquet`, `.csv`, optionally
    `.gz`), an embedded corpus (`embedded:python-docs/train`), or a Hub dataset id (`hub:org/name:split`).
    """

    train: str = field(metadata={"help": "Training split: path, glob, `embedded:NAME/SPLIT`, `hub:ID:SPLIT`, or "
                                         "`self` (general only: text the base model writes, see `data.synth`)."})
    eval: str | None = field(default=None, metadata={"help": "Held-out split for the forgetting monitor."})
    text_field: str = field(default="text", metadata={"help": "Column holding the text."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the training split instead of loading it (large corpora)."}
    )

    def __post_init__(self) -> None:
        check_name("train", self.train)
        check_name("text_field", self.text_field)
        check_bool("streaming", self.streaming)


@dataclass
class EvalSetConfig:
    """One named held-out set, `data.eval_sets.NAME`: `{path: P, kind: general|domain, text_field: text}`, or the
    short form `NAME: P` (a general set). General sets measure forgetting (loss, and KL to the base model on every
    one); domain sets measure adaptation. Every set is evaluated with the others and labelled by its `NAME` in the
    logs (`eval_NAME_loss`), `metrics.json`, the plot and the model card; `monitor.general` / `monitor.domain` may
    name it."""

    path: str = field(metadata={"help": "Held-out text: path, glob, `embedded:NAME/SPLIT` or `hub:ID:SPLIT`."})
    kind: str = field(default="general", metadata={"help": f"One of {EVAL_KINDS}: `general` text the model should "
                                                           "not forget (KL to base measured), or `domain` text."})
    text_field: str = field(default="text", metadata={"help": "Column holding the text."})

    def __post_init__(self) -> None:
        check_name("path", self.path)
        check_choice("kind", self.kind, EVAL_KINDS)
        check_name("text_field", self.text_field)
        if self.path == SELF:
            raise ValueError("`path`: `self` text is the `general_self` set, set by `data.synth.eval_tokens`; point "
                             "`path` at a corpus")


@dataclass
class DataConfig:
    """Domain data, general (replay) data, and how they are packed and mixed.

    Training blocks are `block_size` tokens long and are mixed by [`ReplayMixer`]: a share `replay_ratio` of
    the training tokens comes from the general corpus, exact to within one block over any stretch of training.
    """

    domain: SourceConfig = field(
        default_factory=lambda: SourceConfig("embedded:python-docs/train", "embedded:python-docs/validation"),
        metadata={"help": "The corpus to adapt to."},
    )
    general: SourceConfig | None = field(
        default_factory=lambda: SourceConfig("embedded:kjv/train", "embedded:kjv/validation"),
        metadata={"help": "General text replayed against forgetting; also the general held-out set."},
    )
    replay_ratio: float = field(default=0.25, metadata={"help": "Share of training tokens from `general`, in [0, 1]."})
    block_size: int = field(default=256, metadata={"help": "Tokens per packed training/eval block."})
    packing: str = field(
        default="documents",
        metadata={"help": "`documents`: blocks hold several documents that never attend to or predict each other "
                          "(position_ids restart per document); `concat`: documents glued with EOS, attending across. "
                          "Masked runs (`masking:`) always train one document chunk per sequence."},
    )
    add_bos: str = field(
        default="auto",
        metadata={"help": "With `packing: documents`, start each document with BOS: `auto` (when the tokenizer itself "
                          "adds one, e.g. Llama), `always` (whenever it declares one), `never`."},
    )
    max_eval_blocks: int = field(default=32, metadata={"help": "Held-out blocks per eval set (0: all)."})
    shuffle_seed: int = field(default=0, metadata={"help": "Seed for the order of documents within each corpus."})
    granularity: str = field(
        default="block",
        metadata={"help": "`block`: each block from one corpus; `token`: blocks filled from both by token share."},
    )
    on_exhausted: str = field(
        default="cycle", metadata={"help": "`cycle`: a corpus that runs out starts another pass; `stop`: the mix ends."}
    )
    replay_stages: list[RatioStage] = field(
        default_factory=list,
        metadata={"help": "Later changes of `replay_ratio`, e.g. [{start: 0.8, replay_ratio: 0.05}]."},
    )
    cmr: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Provenance of `replay_ratio` when `hf-cpt cmr fit --write-config` set it (model card)."},
    )
    synth: SynthConfig | None = field(
        default=None,
        metadata={"help": "Self-synthesised general text: `train_tokens` replayed when `general.train` is `self`, "
                          "`eval_tokens` as the held-out set `general_self` (forgetting without pretraining data)."},
    )
    prepared_dir: str | None = field(
        default=None,
        metadata={"help": "Pretokenized store (`hf-cpt prepare CONFIG` writes it): training reads blocks from it, "
                          "no tokenizing, each rank only its own blocks, O(1) resume."},
    )
    num_proc: int = field(default=1, metadata={"help": "Processes tokenizing in `hf-cpt prepare` (>= 1)."})
    num_workers: int = field(
        default=0,
        metadata={"help": "Dataloader worker processes per rank (> 0 needs `prepared_dir`, or `masking`)."},
    )
    eval_sets: dict[str, EvalSetConfig] = field(
        default_factory=dict,
        metadata={"help": "More held-out sets by name: `{NAME: PATH}` (a general set) or `{NAME: {path: P, kind: "
                          "general|domain, text_field: text}}`; no training source needed (e.g. `general: null`, "
                          "`replay_ratio: 0`)."},
    )
    # --- data cleaning (issue 34): hf_cpt/data_clean, applied by hf_cpt/recipe/cleaning.py ---
    dedup: DedupConfig | None = field(
        default_factory=DedupConfig,
        metadata={"help": "Exact and near-duplicate removal of training documents (first seen kept), e.g. "
                          "`{exact: true, near: true, threshold: 0.8}`; null: off."},
    )
    decontaminate: DecontaminateConfig | None = field(
        default_factory=DecontaminateConfig,
        metadata={"help": "Training documents sharing a word `ngram` (13) with a held-out set or a `downstream` "
                          "task: `{action: drop}` (default), `report` or `off`."},
    )
    # --- end data cleaning ---

    def __post_init__(self) -> None:
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("on_exhausted", self.on_exhausted, ON_EXHAUSTED)
        check_choice("packing", self.packing, PACKINGS)
        check_choice("add_bos", self.add_bos, ADD_BOS)
        self.replay_stages = [s if isinstance(s, RatioStage) else RatioStage(**s) for s in self.replay_stages]
        for i, stage in enumerate(self.replay_stages):
            if stage.replay_ratio is None:
                raise ValueError(f"`replay_stages[{i}]` must set `replay_ratio` (the share of general text)")
            if self.general is None and stage.replay_ratio > 0:
                raise ValueError(f"`replay_stages[{i}].replay_ratio` is {stage.replay_ratio} but no `general` "
                                 "corpus is set")
            if i and stage.start <= self.replay_stages[i - 1].start:
                raise ValueError(f"`replay_stages[{i}].start` must come after `replay_stages[{i - 1}].start`")
        r = self.replay_ratio = check_fraction("replay_ratio", self.replay_ratio)
        if self.general is None and r > 0:
            raise ValueError(f"`replay_ratio` is {r} but no `general` corpus is set: add `general` or set 0")
        if self.domain.train == SELF or self.domain.eval == SELF:
            raise ValueError("`domain.train` / `domain.eval`: `self` (text the base model writes) is general text; "
                             "point `domain` at your domain corpus")
        if self.general is not None and self.general.eval == SELF:
            raise ValueError("`general.eval`: the self-synthesised held-out set is `general_self`, set by "
                             "`synth.eval_tokens`; point `general.eval` at a corpus or remove it")
        replays_self = self.general is not None and self.general.train == SELF and (r > 0 or self.replay_stages)
        if replays_self and (self.synth is None or self.synth.train_tokens == 0):
            raise ValueError("`general.train` is `self` but `synth.train_tokens` is not set: add "
                             "`synth: {train_tokens: N}` (N > 0 tokens the base model writes for replay)")
        if replays_self and self.general.streaming:
            raise ValueError("`general.streaming`: self-synthesised text is generated once and held in memory; "
                             "set `general.streaming: false`")
        self.eval_sets = {name: _eval_set(name, value) for name, value in self.eval_sets.items()}
        # a 1-token block has no next token to predict: every label is masked and the loss divides by zero
        check_int("block_size", self.block_size, minimum=2)
        check_int("max_eval_blocks", self.max_eval_blocks, minimum=0)
        check_int("shuffle_seed", self.shuffle_seed, minimum=0)
        check_int("num_proc", self.num_proc, minimum=1)
        check_int("num_workers", self.num_workers, minimum=0)
        _check_cleaning(self)  # data cleaning (issue 34)
        if self.prepared_dir is not None:
            check_name("prepared_dir", self.prepared_dir)
            for name in ("domain", "general"):
                source = getattr(self, name)
                if source is not None and (source.streaming or source.train == SELF
                                           or source.train.startswith("hub:")):
                    raise ValueError(f"`{name}.train`: a prepared store holds local files only (not streaming, Hub "
                                     f"or `self` sources), got {source.train!r}"
                                     + (" with `streaming: true`" if source.streaming else "")
                                     + "; remove `prepared_dir` to read it on the fly")


    def held_out_files(self) -> dict[str, tuple[EvalSetConfig, str]]:
        """Every held-out set read from text, by name, as `(EvalSetConfig, the field naming its path)`: `general`
        (`data.general.eval`), `domain` (`data.domain.eval`) and each of `eval_sets`; `general_self` is sampled
        from the base model instead (`synth`)."""
        out: dict[str, tuple[EvalSetConfig, str]] = {}
        for name in ("general", "domain"):
            src = getattr(self, name)
            if src is not None and src.eval is not None:
                out[name] = (EvalSetConfig(src.eval, name, src.text_field), f"data.{name}.eval")
        for name, spec in self.eval_sets.items():
            out[name] = (spec, f"data.eval_sets.{name}.path")
        return out

    def held_out_kinds(self) -> dict[str, str]:
        """`{set name: "general" | "domain"}` for every held-out set, general ones first (`general`,
        `general_self`, named general sets), then `domain` and named domain sets."""
        kinds = {name: spec.kind for name, (spec, _) in self.held_out_files().items()}
        if self.synth is not None and self.synth.eval_tokens:
            kinds[SELF_EVAL_SET] = "general"
        order = ["general", SELF_EVAL_SET, "domain"]
        ranked = sorted(kinds, key=lambda n: (kinds[n] != "general", n not in order, order.index(n) if n in order
                                              else 0))
        return {n: kinds[n] for n in ranked}


def _eval_set(name: Any, value: Any) -> EvalSetConfig:
    """One `eval_sets` entry: its name checked, the short form `NAME: PATH` read as a general set."""
    where = f"eval_sets.{name}"
    if not isinstance(name, str) or not _SET_NAME.fullmatch(name):
        raise ValueError(f"`eval_sets`: the set name {name!r} must start with a letter and hold only letters, digits, "
                         "`_` and `-` (it becomes `eval_<name>_loss`)")
    if name in BUILT_IN_SETS or name.startswith(("avg_", "merged_")):
        raise ValueError(f"`{where}`: {name!r} is taken ({', '.join(BUILT_IN_SETS)} are built in, `avg_*` are the "
                         "weight average's sets, `merged_*` the merge with the base's); choose another name")
    if isinstance(value, EvalSetConfig):
        return value
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise ValueError(f"`{where}` must be a path or a mapping `{{path, kind, text_field}}`, got "
                         f"{type(value).__name__}")
    return _build(EvalSetConfig, value, f"{where}.")


# --- data cleaning (issue 34) ---
def _check_cleaning(data: DataConfig) -> None:
    """The cleaning settings against the rest of `data`: a prepared store is cleaned by `hf-cpt prepare`, before
    `general_self` is sampled (at the start of training), so it cannot be decontaminated against it."""
    decon = data.decontaminate
    if (data.prepared_dir is not None and decon is not None and decon.enabled and data.synth is not None
            and data.synth.eval_tokens):
        raise ValueError("`decontaminate`: a prepared store (`prepared_dir`) is cleaned when `hf-cpt prepare` runs, "
                         "before `general_self` (`synth.eval_tokens`) is sampled, so it cannot be checked against "
                         "it; remove `prepared_dir` (clean on the fly), or set `decontaminate.action: off`")
# --- end data cleaning ---

@dataclass
class TrainConfig:
    """Optimisation settings, mapped onto `transformers.TrainingArguments`.

    Anything not listed here goes in `training_args` (any `TrainingArguments` field).
    """

    max_steps: int = field(default=100, metadata={"help": "Optimizer updates to run."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str | None = field(
        default="cosine", metadata={"help": "Any transformers scheduler name; null where a `schedule` block sets "
                                            "the LR (the saved recipe of such a run says null)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay, on weight matrices only: never on norms or biases, and "
                                       "on the embeddings only with `decay_embeddings` (OLMo's groups)."})
    decay_embeddings: bool = field(
        default=False, metadata={"help": "Also decay the token embeddings and output head (the Trainer's default; "
                                         "hf-cpt's is off)."})
    freeze_layers: int = field(
        default=0, metadata={"help": "Freeze the bottom N transformer layers (no updates, no optimizer state)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Blocks per device per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Blocks per device per eval batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per update."})
    eval_steps: int = field(default=20, metadata={"help": "Evaluate the held-out sets every N updates."})
    logging_steps: int = field(default=5, metadata={"help": "Log the training loss every N updates."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N updates (0: only the final model)."})
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep `<output_dir>.checkpoints` after a successful run."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for initialisation and data order."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (GPU/recent CPUs)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    trainable: str = field(
        default="all", metadata={"help": "`all`, or `embeddings` (body frozen: the relearning phase)."}
    )
    use_liger: str | bool = field(
        default="auto", metadata={"help": "Liger kernels: auto (on CUDA with a supported model), true, false."}
    )
    chunked_loss: str | bool = field(
        default="auto",
        metadata={"help": "Chunked linear cross-entropy where Liger is off: auto (causal LMs), true, false."},
    )
    loss_chunk_size: int = field(
        default=0, metadata={"help": "Tokens per chunk of the chunked loss (0: auto, logits ~ hidden-state size)."}
    )
    distill: DistillConfig | None = field(
        default=None, metadata={"help": "Distillation replay: `{weight, tokens: replay|all, top_k}` adds "
                                        "weight * KL(base || model) to the loss (needs the chunked loss)."})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Integrations, e.g. [tensorboard]."})
    training_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra `TrainingArguments` fields, passed through verbatim."}
    )

    def __post_init__(self) -> None:
        for name in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "eval_steps", "logging_steps"):
            check_int(name, getattr(self, name))
        for name in ("warmup_steps", "loss_chunk_size", "save_steps", "seed", "freeze_layers"):
            check_int(name, getattr(self, name), minimum=0)
        self.use_liger = check_flag("use_liger", self.use_liger)
        self.chunked_loss = check_flag("chunked_loss", self.chunked_loss)
        check_choice("trainable", self.trainable, TRAINABLE)
        for name in ("keep_checkpoints", "bf16", "gradient_checkpointing", "decay_embeddings"):
            check_bool(name, getattr(self, name))
        self.learning_rate = check_number("learning_rate", self.learning_rate, 0.0, min_inclusive=False)
        self.weight_decay = check_number("weight_decay", self.weight_decay, 0.0)
        if self.freeze_layers and self.trainable != "all":
            raise ValueError(f"`freeze_layers` is {self.freeze_layers} but `trainable` is {self.trainable!r}, which "
                             "freezes the whole body already: remove one of them")
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"`warmup_steps` ({self.warmup_steps}) is longer than the run (`max_steps`={self.max_steps})"
            )
        from transformers import TrainingArguments

        known = {f.name for f in dataclasses.fields(TrainingArguments)}
        own = {f.name for f in dataclasses.fields(self)} - {"training_args"}
        for key in self.training_args:
            if key not in known:
                hint = difflib.get_close_matches(key, known | own, n=1)
                where = "" if hint and hint[0] in own else "training_args."
                raise ValueError(
                    f"`training_args.{key}` is not a TrainingArguments field"
                    + (f"; did you mean `{where}{hint[0]}`?" if hint else "")
                )
            if key in own or key in ("output_dir", "max_steps", "eval_strategy", "eval_on_start"):
                raise ValueError(f"`training_args.{key}` is set by hf-cpt; set `train.{key}` instead" if key in own
                                 else f"`training_args.{key}` is set by hf-cpt and cannot be overridden")
        # TrainingArguments would list all ~40 names without naming the field
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        if self.lr_scheduler_type is not None:
            check_known_name("lr_scheduler_type", self.lr_scheduler_type, [s.value for s in SchedulerType],
                             "transformers scheduler")
        if "optim" in self.training_args:
            check_known_name("training_args.optim", self.training_args["optim"], [o.value for o in OptimizerNames],
                             "transformers optimizer")


@dataclass
class CPTConfig:
    """A whole continual-pretraining run: model, data, optimisation and forgetting monitor."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: ForgettingMonitorConfig = field(default_factory=ForgettingMonitorConfig)
    downstream: DownstreamConfig | None = field(
        default=None, metadata={"help": "Benchmark scores next to the held-out losses: lm-eval tasks run on the live "
                                        "model at step 0, every N-th evaluation and at the end (needs `hf-cpt[eval]`)."}
    )
    schedule: RewarmConfig | None = field(
        default=None, metadata={"help": "Rewarming LR schedule; replaces `train.lr_scheduler_type`."}
    )
    active_forgetting: ActiveForgettingConfig | None = field(
        default=None, metadata={"help": "Reset the embeddings every K updates (plasticity pretraining)."}
    )
    weight_averaging: WeightAveragingConfig | None = field(
        default=None, metadata={"help": "An EMA or last-K average of the weights, evaluated beside the live model "
                                        "(`eval_avg_<set>_loss`); `ship: true` writes the average."}
    )
    merge_base: MergeBaseConfig | None = field(
        default=None, metadata={"help": "Merge with the base at the end: base + alpha x (trained - base), evaluated "
                                        "beside the live model (`eval_merged_<set>_loss`, KL) and shipped."}
    )
    lora: LoraAdapterConfig | None = field(
        default=None, metadata={"help": "Train a LoRA adapter (peft) instead of every weight: `{r, alpha, dropout, "
                                        "target_modules, modules_to_save, embeddings, save: merged|adapter}`."}
    )
    objective: str = field(default="clm", metadata={"help": "`clm` (causal LM) or `mlm` (masked LM, encoders)."})
    masking: MaskingConfig | str | None = field(
        default=None, metadata={"help": "`lem`, `lexicon` or `random` (or a mapping of MaskingConfig fields)."}
    )
    vocab: VocabConfig | None = field(
        default=None,
        metadata={"help": "Extend the vocabulary with domain subwords (merged, new rows initialised) first."},
    )
    hub: HubConfig = field(default_factory=HubConfig, metadata={"help": "Push the adapted model to the Hub."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the adapted model is written."})
    domain: str = field(default="", metadata={"help": "Short domain name, e.g. `medical`; a tag on the model card."})
    description: str = field(default="", metadata={"help": "One line shown by `hf-cpt templates`."})

    extensions: dict[str, Any] = field(
        default_factory=dict, repr=False,
        metadata={"help": "Blocks of techniques registered outside hf-cpt (`hf_cpt.registry`), by YAML key; in YAML "
                          "and `to_dict()` each is a top-level block of its own."},
    )

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        # the `masking` field's own forms: a kind name stands for its config, and a masked LM always masks
        if isinstance(self.masking, str):
            if self.masking not in MASKING_KINDS:
                raise ValueError(f"`masking` must be lem, lexicon or random (or a mapping), got {self.masking!r}")
            self.masking = MaskingConfig(kind=self.masking)
        if self.objective == "mlm" and self.masking is None:
            self.masking = MaskingConfig(kind="random")
        # what runs: a `schedule` block replaces the transformers scheduler, so the recipe (and the saved
        # hf_cpt_config.yaml) records none rather than the unused default (`cosine`, also what earlier versions
        # saved); a scheduler named besides the block is refused by the schedule's own check
        if self.schedule is not None and self.train.lr_scheduler_type == "cosine":
            self.train = dataclasses.replace(self.train, lr_scheduler_type=None)
        known = extension_techniques({f.name for f in dataclasses.fields(self)})
        for key in self.extensions:
            if key not in known:
                raise ValueError(f"unknown field `{key}`: no registered technique has this block")
        # rules across blocks: each technique checks the recipe around its own block (hf_cpt.registry)
        for technique in techniques().values():
            if technique.check is not None:
                technique.check(self)

    def __getattr__(self, name: str) -> Any:
        # a registered technique's block that CPTConfig does not declare: `cfg.<key>`, None when unset
        if name.startswith("__") or name == "extensions":
            raise AttributeError(name)
        extensions = self.__dict__.get("extensions")
        if extensions is not None and (name in extensions or name in extension_techniques(set())):
            return extensions.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def held_out_sets(self) -> list[str]:
        """Names of the held-out sets the run evaluates, general ones first: `general` (its `eval` split),
        `general_self` (`data.synth.eval_tokens`), the general `data.eval_sets`, `domain`, the domain ones."""
        return list(self.data.held_out_kinds())

    def general_sets(self) -> list[str]:
        """The held-out sets of kind `general` (KL to the base model is measured on each)."""
        return [n for n, kind in self.data.held_out_kinds().items() if kind == "general"]

    def check_held_out_sets(self) -> None:
        """A training run needs the monitor's general and domain held-out sets (checked before it starts; a
        config for `extend-vocab` or a partial one being built need not have them)."""
        kinds = self.data.held_out_kinds()
        names = list(kinds)
        for role in ("domain", "general"):
            wanted = getattr(self.monitor, role)
            if kinds.get(wanted) == role:
                continue
            if wanted in kinds:
                raise ValueError(f"`monitor.{role}` is {wanted!r}, a {kinds[wanted]} set: point it at a {role} set "
                                 f"(sets: {names}), or set `data.eval_sets.{wanted}.kind: {role}`")
            if wanted in ("general", "domain"):
                others = [n for n, k in kinds.items() if k == wanted]
                raise ValueError(f"`data.{wanted}.eval` is not set: the forgetting monitor needs a held-out split "
                                 f"of the {wanted} text" + (f" (or set `monitor.{role}` to one of {others})" if others
                                                            else " (or name one in `data.eval_sets`"
                                                            + (", or set `data.synth.eval_tokens` and `monitor."
                                                               "general: general_self`)" if wanted == "general"
                                                               else ")")))
            raise ValueError(f"`monitor.{role}` is {wanted!r}, which is not a held-out set of this run "
                             f"(sets: {names})")
        merged = [f"merged_{n}" for n in names] if self.merge_base is not None and self.merge_base.evaluate else []
        for i, guard in enumerate(self.monitor.guards):
            if guard.set not in names + merged:
                raise ValueError(f"`monitor.guards[{i}].set` is {guard.set!r}, which is not a held-out set of this "
                                 f"run (sets: {names + merged})")

    @property
    def needs_chunked_loss(self) -> bool:
        """Whether the run's loss must be hf-cpt's chunked loss (per-token weights or distillation targets)."""
        spans = self.objective == "clm" and self.masking is not None and self.masking.span_weight != 1
        return spans or self.train.distill is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CPTConfig:
        """Build (and validate) a config from nested plain data, e.g. parsed YAML."""
        return _build(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> CPTConfig:
        """Read a YAML file written by `hf-cpt init` (or by hand)."""
        path = Path(path)
        if path.is_dir():
            recipe = path / CONFIG_FILE
            inside = f" (it holds a run's recipe: give {str(recipe)!r})" if recipe.is_file() else ""
            raise ValueError(f"config file {str(path)!r} is a directory, not a YAML file{inside}; give the path of "
                             "the .yaml file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            data = load_yaml(path.read_text(encoding="utf-8"), source=f"config file {str(path)!r}")
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}): save it as UTF-8 "
                             "YAML") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config file {str(path)!r} is not valid YAML{where}: {what}") from None
        if data is None or data == {}:
            raise ValueError(f"config file {str(path)!r} is empty: a minimal config sets `model.name_or_path` and "
                             "`data.domain.train` (e.g. `hf-cpt init --domain medical` writes a full one)")
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level (`model:`, `data:`, "
                             f"`train:`), got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CPTConfig:
        """The recipe saved next to an adapted model or its checkpoints (`hf_cpt_config.yaml` in `directory`)."""
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no {CONFIG_FILE}: it was not written by hf-cpt")
        return cls.from_yaml(path)

    def save_pretrained(self, directory: str | Path, header: str = "") -> Path:
        """Write the recipe as `hf_cpt_config.yaml` into `directory` (atomically: a temp file, then a rename)."""
        return write_yaml(self, Path(directory) / CONFIG_FILE, header)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data, as in YAML: a registered technique's block that CPTConfig does not declare is a
        top-level block of its own (absent when unset)."""
        out = dataclasses.asdict(self)
        out.update({k: v for k, v in out.pop("extensions").items() if v is not None})
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def override(self, changes: dict[str, Any]) -> CPTConfig:
        """A copy with fields changed by dotted path, e.g. ``{"train.max_steps": 5, "data.replay_ratio": 0.1}``,
        built through `dataclasses.replace` so every validation runs again on the new values."""
        tree: dict[str, Any] = {}
        for path, value in changes.items():
            node = tree
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return _replace(self, tree, "")

    def training_diff(self, other: CPTConfig) -> list[str]:
        """The fields that differ between two recipes and change what training computes (not output paths,
        descriptions, logging or reporting), as ```path`: old -> new`` lines: a resume refuses them."""
        a, b = self.to_dict(), other.to_dict()
        for d in (a, b):
            for key in ("output_dir", "description"):
                d.pop(key, None)
            for key in ("report_to", "logging_steps"):
                d["train"].pop(key, None)
            for key in ("num_proc", "num_workers"):  # how fast data is made, not which data
                d["data"].pop(key, None)
        diffs: list[str] = []

        def walk(x: Any, y: Any, path: str) -> None:
            if isinstance(x, dict) and isinstance(y, dict):
                for k in sorted(set(x) | set(y)):
                    walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
            elif x != y:
                diffs.append(f"`{path}`: {x!r} -> {y!r}")

        walk(a, b, "")
        return diffs


def write_yaml(cfg: CPTConfig, path: str | Path, header: str = "") -> Path:
    """Write `cfg` as YAML to `path` (a temp file next to it, then a rename: never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + cfg.to_yaml(), encoding="utf-8")
    tmp.replace(path)
    return path


def _replace(obj: Any, changes: dict[str, Any], prefix: str) -> Any:
    """`dataclasses.replace` applied down a tree of changes; unknown names are refused by dotted path."""
    names = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    kwargs: dict[str, Any] = {}
    changes, extensions = _split_extensions(type(obj), changes, names)
    if extensions:
        current = dict(obj.extensions)
        for key, (technique, value) in extensions.items():
            block = current.get(key)
            if isinstance(value, dict) and dataclasses.is_dataclass(block):
                current[key] = _replace(block, value, f"{prefix}{key}.")
            else:
                current[key] = _coerce(_block_type(technique), value, f"{prefix}{key}")
        kwargs["extensions"] = current
    for key, value in changes.items():
        if key not in names:
            hint = difflib.get_close_matches(key, list(names), n=1)
            raise ValueError(f"unknown field `{prefix}{key}`" + (f"; did you mean `{prefix}{hint[0]}`?" if hint else ""))
        current = getattr(obj, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            kwargs[key] = _replace(current, value, f"{prefix}{key}.")
        else:  # plain data is parsed as in YAML (a mapping for an unset block builds it)
            kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return dataclasses.replace(obj, **kwargs)
    except ValueError as e:
        raise ValueError(_prefix_fields(str(e), names, prefix)) from None


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Recursively turn plain data into dataclass `cls`, naming fields by dotted path in errors."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigTypeError(f"`{where}` must be a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    data, extensions = _split_extensions(cls, data, set(fields))
    if extensions:
        kwargs["extensions"] = {key: _coerce(_block_type(technique), value, f"{prefix}{key}")
                                for key, (technique, value) in extensions.items()}
    for key, value in data.items():
        key = _renamed_key(cls, key, prefix)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            raise ValueError(
                f"unknown field `{prefix}{key}`" + (f"; did you mean `{prefix}{hint[0]}`?" if hint else "")
                + f" (known: {', '.join(fields)})"
            )
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"`{prefix}{missing[0]}` is required") from None
        raise e
    except ValueError as e:
        raise ValueError(_prefix_fields(str(e), fields, prefix)) from None


_YAML_BOOLEAN_KEYS = "`on`, `off`, `yes` or `no`"  # what PyYAML (YAML 1.1) resolves to a boolean


def _renamed_key(cls: type, key: Any, prefix: str) -> Any:
    """`key` as a field name: an old spelling listed in `cls.RENAMED_KEYS` becomes its field (with a deprecation
    line); a key YAML 1.1 read as a boolean and no field was ever called is refused, naming the cause."""
    # matched by type too: the key 1 is not `True`
    new = next((f for old, f in getattr(cls, "RENAMED_KEYS", {}).items() if type(old) is type(key) and old == key), None)
    if new is not None:
        old = "on" if key is True else key
        logger.warning("`%s%s` is deprecated: write `%s%s` (YAML 1.1 reads the key `%s` as a boolean)", prefix, old,
                       prefix, new, old)
        return new
    if isinstance(key, bool):
        raise ValueError(f"`{prefix.rstrip('.') or 'config'}` has the key `{key}`: YAML 1.1 reads an unquoted "
                         f"{_YAML_BOOLEAN_KEYS} key as a boolean, and no hf-cpt field has such a name; check the "
                         "key's spelling")
    return key


def _block_type(technique: Technique) -> Any:
    return Any if technique.config is None else technique.config | None


def _split_extensions(cls: type, data: dict[str, Any], declared: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """For `CPTConfig`: the blocks of registered techniques it does not declare (by key, with their entry),
    apart from the declared fields."""
    if cls is not CPTConfig:
        return data, {}
    if "extensions" in data:  # the holder, not a YAML block: each block is written under its own key
        raise ValueError("unknown field `extensions`: a registered technique's block is a top-level key of its own")
    known = extension_techniques(declared)
    rest = {k: v for k, v in data.items() if k not in known}
    return rest, {k: (known[k], v) for k, v in data.items() if k in known}


def _prefix_fields(msg: str, fields: Any, prefix: str) -> str:
    """Validators name the bare field; prefix it with its path in the config."""
    if not prefix:
        return msg
    names = "|".join(re.escape(n) for n in sorted(fields, key=len, reverse=True))
    return re.sub(rf"`({names})(?=[`.\[])", lambda m: f"`{prefix}{m.group(1)}", msg)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        first_error = None
        for arg in args[:-1]:  # the first member the value fits; the last one reports the error
            try:
                return _coerce(arg, value, path)
            except (ValueError, TypeError) as e:
                # a mapping meant for a dataclass member: its own error is the helpful one
                if isinstance(value, dict) and dataclasses.is_dataclass(arg) and first_error is None:
                    first_error = e
                continue
        if first_error is not None and not any(typing.get_origin(a) is dict or a is dict for a in args):
            raise first_error
        return _coerce(args[-1], value, path)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, path + ".")
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `5e-5` (no dot) as a string
            return float(value)
        except ValueError:
            raise ValueError(f"`{path}` must be a number, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"`{path}` must be true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"`{path}` must be an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ValueError(f"`{path}` must be a string, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"`{path}` must be a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        if dataclasses.is_dataclass(item):
            return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        if item in (str, int, float, bool):  # each item as a field of that type (`report_to: [1]` is refused)
            return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict and not isinstance(value, dict):
        raise ValueError(f"`{path}` must be a mapping, got {value!r}")
    return value
