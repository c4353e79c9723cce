"""Configuration of a continual-pretraining run: dataclasses that both the Python API and the YAML templates use.

`CPTConfig.from_yaml(path)` / `CPTConfig.from_dict(d)` build the same objects a Python user builds by hand;
every error names the offending field by its dotted path (``data.replay_ratio``) and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .callbacks.active_forgetting import ActiveForgettingConfig
from .callbacks.forgetting import ForgettingMonitorConfig
from .callbacks.rewarm import RewarmConfig
from .collators.masking import MASKING_KINDS, MaskingConfig
from .hub import HubConfig
from .vocab.extend import VocabConfig

EMBEDDED_MODEL = "embedded:smollm2-135m"
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _check_positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"`{name}` must be an integer >= {0 if allow_zero else 1}, got {value!r}")


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
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            raise ValueError(f"`name_or_path` must be a model directory or Hub id, got {self.name_or_path!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class SourceConfig:
    """One text corpus: a training split and an optional held-out split.

    A split is a local file, directory or glob (`.jsonl`/`.json`, `.txt`, `.parquet`, `.csv`, optionally
    `.gz`), an embedded corpus (`embedded:python-docs/train`), or a Hub dataset id (`hub:org/name:split`).
    """

    train: str = field(metadata={"help": "Training split: path, glob, `embedded:NAME/SPLIT` or `hub:ID:SPLIT`."})
    eval: str | None = field(default=None, metadata={"help": "Held-out split for the forgetting monitor."})
    text_field: str = field(default="text", metadata={"help": "Column holding the text."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the training split instead of loading it (large corpora)."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.train, str) or not self.train.strip():
            raise ValueError(f"`train` must name a data file, glob or dataset, got {self.train!r}")
        if not self.text_field:
            raise ValueError("`text_field` must name the text column, got an empty value")


@dataclass
class ReplayStage:
    """From `start` (a fraction of the run, in [0, 1)) on, replay `replay_ratio` of the tokens instead.

    E.g. `{start: 0.8, replay_ratio: 0.05}` upsamples the domain in the last 20% of training.
    """

    start: float = field(metadata={"help": "Fraction of the run after which this share applies."})
    replay_ratio: float = field(metadata={"help": "Share of training tokens from `general` in this stage."})

    def __post_init__(self) -> None:
        from .mixers.core import check_stage_start

        check_stage_start(self.start)
        r = self.replay_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 <= r <= 1.0):
            raise ValueError(f"`replay_ratio` must be in [0, 1], got {r!r}")


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
    max_eval_blocks: int = field(default=32, metadata={"help": "Held-out blocks per eval set (0: all)."})
    shuffle_seed: int = field(default=0, metadata={"help": "Seed for the order of documents within each corpus."})
    granularity: str = field(
        default="block",
        metadata={"help": "`block`: each block from one corpus; `token`: blocks filled from both by token share."},
    )
    on_exhausted: str = field(
        default="cycle", metadata={"help": "`cycle`: a corpus that runs out starts another pass; `stop`: the mix ends."}
    )
    replay_stages: list[ReplayStage] = field(
        default_factory=list,
        metadata={"help": "Later changes of `replay_ratio`, e.g. [{start: 0.8, replay_ratio: 0.05}]."},
    )
    cmr: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Provenance of `replay_ratio` when `hf-cpt cmr fit --write-config` set it (model card)."},
    )

    def __post_init__(self) -> None:
        from .mixers.replay import check_mixing_modes

        check_mixing_modes(self.granularity, self.on_exhausted)
        self.replay_stages = [s if isinstance(s, ReplayStage) else ReplayStage(**s) for s in self.replay_stages]
        for i, stage in enumerate(self.replay_stages):
            if self.general is None and stage.replay_ratio > 0:
                raise ValueError(f"`replay_stages[{i}].replay_ratio` is {stage.replay_ratio} but no `general` "
                                 "corpus is set")
            if i and stage.start <= self.replay_stages[i - 1].start:
                raise ValueError(f"`replay_stages[{i}].start` must come after `replay_stages[{i - 1}].start`")
        r = self.replay_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 <= r <= 1.0) or math.isnan(r):
            raise ValueError(f"`replay_ratio` must be in [0, 1], got {r!r}")
        if self.general is None and r > 0:
            raise ValueError(f"`replay_ratio` is {r} but no `general` corpus is set: add `general` or set 0")
        _check_positive_int("block_size", self.block_size)
        _check_positive_int("max_eval_blocks", self.max_eval_blocks, allow_zero=True)


@dataclass
class TrainConfig:
    """Optimisation settings, mapped onto `transformers.TrainingArguments`.

    Anything not listed here goes in `training_args` (any `TrainingArguments` field).
    """

    max_steps: int = field(default=100, metadata={"help": "Optimizer updates to run."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Any transformers scheduler name."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
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
    report_to: list[str] = field(default_factory=list, metadata={"help": "Integrations, e.g. [tensorboard]."})
    training_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Extra `TrainingArguments` fields, passed through verbatim."}
    )

    def __post_init__(self) -> None:
        for name in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "eval_steps", "logging_steps"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("warmup_steps", self.warmup_steps, allow_zero=True)
        for name in ("use_liger", "chunked_loss"):
            value = getattr(self, name)
            if isinstance(value, bool):
                value = "true" if value else "false"
                setattr(self, name, value)
            if value not in ("auto", "true", "false"):
                raise ValueError(f"`{name}` must be auto, true or false, got {value!r}")
        _check_positive_int("loss_chunk_size", self.loss_chunk_size, allow_zero=True)
        if self.trainable not in ("all", "embeddings"):
            raise ValueError(f"`trainable` must be `all` or `embeddings`, got {self.trainable!r}")
        _check_positive_int("save_steps", self.save_steps, allow_zero=True)
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0) or math.isinf(lr):
            raise ValueError(f"`learning_rate` must be a positive number, got {lr!r}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"`warmup_steps` ({self.warmup_steps}) is longer than the run (`max_steps`={self.max_steps})"
            )
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}")
        from transformers import TrainingArguments  # deferred: keeps config parsing import-light

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


@dataclass
class CPTConfig:
    """A whole continual-pretraining run: model, data, optimisation and forgetting monitor."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: ForgettingMonitorConfig = field(default_factory=ForgettingMonitorConfig)
    schedule: RewarmConfig | None = field(
        default=None, metadata={"help": "Rewarming LR schedule; replaces `train.lr_scheduler_type`."}
    )
    active_forgetting: ActiveForgettingConfig | None = field(
        default=None, metadata={"help": "Reset the embeddings every K updates (plasticity pretraining)."}
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

    def __post_init__(self) -> None:
        if self.objective not in ("clm", "mlm"):
            raise ValueError(f"`objective` must be `clm` or `mlm`, got {self.objective!r}")
        if isinstance(self.masking, str):
            if self.masking not in MASKING_KINDS:
                raise ValueError(f"`masking` must be lem, lexicon or random (or a mapping), got {self.masking!r}")
            self.masking = MaskingConfig(kind=self.masking)
        if self.objective == "clm" and self.masking is not None and self.masking.kind == "random":
            raise ValueError("`masking` random is a masked-LM objective: set `objective: mlm`, or use `lem`/`lexicon` "
                             "to weight entity/lexicon tokens in the causal loss")
        if self.objective == "mlm" and self.masking is None:
            self.masking = MaskingConfig(kind="random")
        if self.masking is not None and any(s is not None and s.streaming for s in (self.data.domain,
                                                                                    self.data.general)):
            raise ValueError("`masking` needs map-style corpora (spans are tagged once and cached): set "
                             "`data.domain.streaming` / `data.general.streaming` to false")
        if self.schedule is not None and self.train.warmup_steps:
            raise ValueError("`train.warmup_steps` is set but `schedule` defines the LR: set "
                             "`schedule.warmup_steps` instead and remove `train.warmup_steps`")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CPTConfig:
        """Build (and validate) a config from nested plain data, e.g. parsed YAML."""
        return _build(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> CPTConfig:
        """Read a YAML file written by `hf-cpt init` (or by hand)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Recursively turn plain data into dataclass `cls`, naming fields by dotted path in errors."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise TypeError(f"`{where}` must be a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
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
        # validators name the bare field; prefix it with its path in the config
        names = "|".join(re.escape(n) for n in sorted(fields, key=len, reverse=True))
        msg = re.sub(rf"`({names})(?=[`.\[])", lambda m: f"`{prefix}{m.group(1)}", str(e)) if prefix else str(e)
        raise ValueError(msg) from None


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
    if origin is dict and not isinstance(value, dict):
        raise ValueError(f"`{path}` must be a mapping, got {value!r}")
    return value
