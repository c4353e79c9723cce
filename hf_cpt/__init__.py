"""hf-cpt: continual pretraining of Hugging Face models without forgetting.

Everything drops into `transformers.Trainer`: configs are dataclasses, techniques are callbacks, collators and
datasets. Attributes load lazily, so `import hf_cpt` stays fast and pulls no optional dependency.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CPTConfig": "config",
    "ModelConfig": "config",
    "DataConfig": "config",
    "SourceConfig": "config",
    "TrainConfig": "config",
    "ReplayStage": "config",
    "ReplayMixer": "mixers.replay",
    "ReplayMixerConfig": "mixers.replay",
    "RatioStage": "mixers.core",
    "ReplayMixerCallback": "callbacks.replay_mixer",
    "fit_cmr_law": "mixers.cmr",
    "predict_cmr": "mixers.cmr",
    "read_records": "mixers.cmr",
    "run_cmr_pilot": "mixers.cmr_pilot",
    "chunked_linear_cross_entropy": "losses",
    "apply_chunked_loss": "losses",
    "resolve_liger": "liger",
    "add_lora_for_cpt": "adapters",
    "TrainedParametersCallback": "adapters",
    "ForgettingMonitorConfig": "callbacks.forgetting",
    "ForgettingMonitorCallback": "callbacks.forgetting",
    "RewarmConfig": "callbacks.rewarm",
    "CycleConfig": "callbacks.rewarm",
    "RewarmCallback": "callbacks.rewarm",
    "make_rewarm_scheduler": "callbacks.rewarm",
    "make_rewarm_optimizer": "callbacks.rewarm",
    "lr_at_checkpoint": "callbacks.rewarm",
    "ActiveForgettingConfig": "callbacks.active_forgetting",
    "ActiveForgettingCallback": "callbacks.active_forgetting",
    "relearn_embeddings": "callbacks.active_forgetting",
    "run_cpt": "train",
    "CPTResult": "train",
    "build_training_args": "train",
    "load_model_and_tokenizer": "models",
    "build_train_set": "data",
    "build_eval_sets": "data",
    "tokenize_and_pack": "data",
    "load_template": "templates",
    "list_templates": "templates",
    "render_model_card": "model_card",
    "push_adapted": "hub",
    "check_push_access": "hub",
    "HubConfig": "hub",
    "plot_forgetting": "plotting",
    "learn_domain_tokens": "vocab.tokens",
    "merge_tokens": "vocab.tokens",
    "extend_model": "vocab.extend",
    "extend_vocabulary": "vocab.extend",
    "VocabConfig": "vocab.extend",
    "NewRowsFirstCallback": "vocab.extend",
    "EMBEDDING_INITS": "vocab.init",
    "build_word_vectors": "vocab.vectors",
    "WordVectors": "vocab.vectors",
    "tag_entities": "collators.spans",
    "tag_lexicon": "collators.spans",
    "tokenize_with_spans": "collators.spans",
    "LEMCollator": "collators.masking",
    "LexiconMaskingCollator": "collators.masking",
    "CausalSpanCollator": "collators.masking",
    "MaskingConfig": "collators.masking",
    "MaskingStatsCallback": "collators.masking",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from .callbacks.active_forgetting import ActiveForgettingCallback, ActiveForgettingConfig, relearn_embeddings
    from .callbacks.forgetting import ForgettingMonitorCallback, ForgettingMonitorConfig
    from .callbacks.rewarm import (
        CycleConfig,
        RewarmCallback,
        RewarmConfig,
        lr_at_checkpoint,
        make_rewarm_optimizer,
        make_rewarm_scheduler,
    )
    from .adapters import TrainedParametersCallback, add_lora_for_cpt
    from .callbacks.replay_mixer import ReplayMixerCallback
    from .liger import resolve_liger
    from .losses import apply_chunked_loss, chunked_linear_cross_entropy
    from .mixers.cmr import fit_cmr_law, predict_cmr, read_records
    from .mixers.cmr_pilot import run_cmr_pilot
    from .config import CPTConfig, DataConfig, ModelConfig, ReplayStage, SourceConfig, TrainConfig
    from .mixers.core import RatioStage
    from .mixers.replay import ReplayMixer, ReplayMixerConfig
    from .data import build_eval_sets, build_train_set, tokenize_and_pack
    from .collators.masking import (
        CausalSpanCollator,
        LEMCollator,
        LexiconMaskingCollator,
        MaskingConfig,
        MaskingStatsCallback,
    )
    from .collators.spans import tag_entities, tag_lexicon, tokenize_with_spans
    from .hub import HubConfig, check_push_access, push_adapted
    from .vocab.extend import NewRowsFirstCallback, VocabConfig, extend_model, extend_vocabulary
    from .vocab.init import EMBEDDING_INITS
    from .vocab.tokens import learn_domain_tokens, merge_tokens
    from .vocab.vectors import WordVectors, build_word_vectors
    from .model_card import render_model_card
    from .models import load_model_and_tokenizer
    from .plotting import plot_forgetting
    from .templates import list_templates, load_template
    from .train import CPTResult, build_training_args, run_cpt


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_cpt' has no attribute {name!r}")
