"""hf-cpt: continual pretraining of Hugging Face models without forgetting.

Everything drops into `transformers.Trainer`: configs are dataclasses, techniques are callbacks, collators and
datasets. Attributes load lazily, so `import hf_cpt` stays fast and pulls no optional dependency.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module, grouped by technique (the same groups as the README)
_GROUPS: dict[str, dict[str, str]] = {
    "config": {n: "config" for n in ("CPTConfig", "ModelConfig", "DataConfig", "SourceConfig", "TrainConfig")},
    "recipe": {
        "run_cpt": "recipe.train", "CPTResult": "recipe.train", "build_training_args": "recipe.train",
        "load_config": "recipe.resolve", "load_model_and_tokenizer": "recipe.models",
        "resolve_model_path": "recipe.models", "build_train_set": "recipe.data", "build_eval_sets": "recipe.data",
        "extend_checkpoint": "recipe.vocab", "run_cmr_pilot": "recipe.cmr_pilot",
        "write_cmr_config": "recipe.cmr_pilot", "load_template": "templates", "list_templates": "templates",
        "OutputDirLock": "output_lock", "OutputDirBusyError": "output_lock",
    },
    "replay mixing": {
        "ReplayMixer": "mixers.replay", "ReplayMixerConfig": "mixers.replay", "RatioStage": "mixers.core",
        "ReplayMixerCallback": "callbacks.replay_mixer",
    },
    "document packing": {n: "mixers.packing" for n in ("DocumentMaskingGuard", "check_document_masking",
                                                       "probe_document_masking", "bos_for")},
    "data at scale": {"PreparedMixer": "mixers.prepared", "PreparedStore": "mixers.prepared",
                      "prepare_sources": "recipe.prepare", "prepare_config": "recipe.prepare"},
    "data cleaning": {"DedupConfig": "data_clean.clean", "DecontaminateConfig": "data_clean.decontam",
                      "DocumentCleaner": "data_clean.clean", "CleanReport": "data_clean.report",
                      "clean_documents": "data_clean.clean"},
    "CMR": {n: "mixers.cmr" for n in ("fit_cmr_law", "predict_cmr", "read_records", "write_records", "plot_cmr",
                                         "CMRFit", "CMRPrediction", "CMRRecord")},
    "learning dynamics": {
        **{n: "dynamics" for n in ("fit_dynamics", "bootstrap_dynamics", "predict_band", "predict_curves",
                                   "DynamicsLaw", "DynamicsFit", "LossLaw", "PilotCurve")},
        **{n: "recipe.plan" for n in ("plan_cpt", "plan_from_pilots", "read_pilot", "plot_plan", "write_plan",
                                      "CPTPlan", "PlanCandidate")},
    },
    "forgetting monitor": {"ForgettingMonitorConfig": "callbacks.forgetting",
                           "ForgettingMonitorCallback": "callbacks.forgetting", "plot_forgetting": "plotting",
                           "KLToBaseCallback": "callbacks.kl_to_base", "attach_kl_to_base": "callbacks.kl_to_base",
                           "compute_base_targets": "distill", "evaluate_kl": "distill"},
    "downstream evaluation": {
        "DownstreamConfig": "callbacks.downstream", "DownstreamEvalCallback": "callbacks.downstream",
        "attach_downstream_eval": "callbacks.downstream", "evaluate_tasks": "evaluation",
        "check_tasks": "evaluation", "offline_tasks_dir": "evaluation", "compare_models": "recipe.evaluate",
        "EvalComparison": "recipe.evaluate",
    },
    "self-synthesised data": {"SynthConfig": "synth", "synthesize_text": "synth",
                              "load_or_synthesize": "synth"},
    "distillation replay": {"DistillConfig": "collators.distill", "DistillCollator": "collators.distill",
                            "precompute_distill_targets": "collators.distill", "make_frozen_copy": "distill"},
    "rewarming": {n: "callbacks.rewarm" for n in ("RewarmConfig", "CycleConfig", "RewarmCallback",
                                                  "make_rewarm_scheduler", "make_rewarm_optimizer",
                                                  "lr_at_checkpoint")},
    "active forgetting": {n: "callbacks.active_forgetting" for n in ("ActiveForgettingConfig",
                                                                     "ActiveForgettingCallback",
                                                                     "relearn_embeddings")},
    "memory": {"chunked_linear_cross_entropy": "losses", "apply_chunked_loss": "losses", "resolve_liger": "liger",
               "choose_loss": "liger", "add_lora_for_cpt": "adapters",
               "TrainedParametersCallback": "callbacks.trained_parameters"},
    "vocabulary": {
        "learn_domain_tokens": "vocab.tokens", "merge_tokens": "vocab.tokens", "VocabExtension": "vocab.tokens",
        "extend_model": "vocab.extend", "extend_vocabulary": "vocab.extend", "VocabConfig": "vocab.extend",
        "EMBEDDING_INITS": "vocab.init", "build_word_vectors": "vocab.vectors", "WordVectors": "vocab.vectors",
        "NewRowsFirstCallback": "callbacks.new_rows_first",
    },
    "masking": {
        "tag_entities": "collators.spans", "tag_lexicon": "collators.spans", "tokenize_with_spans": "collators.spans",
        "LEMCollator": "collators.masking", "LexiconMaskingCollator": "collators.masking",
        "CausalSpanCollator": "collators.masking", "MaskingConfig": "collators.masking",
        "MaskingStatsCallback": "callbacks.masking_stats",
    },
    "hub": {"push_adapted": "hub", "check_push_access": "hub", "HubConfig": "hub",
            "render_model_card": "model_card"},
}
_EXPORTS = {name: module for group in _GROUPS.values() for name, module in group.items()}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import add_lora_for_cpt
    from .callbacks.active_forgetting import ActiveForgettingCallback, ActiveForgettingConfig, relearn_embeddings
    from .callbacks.downstream import DownstreamConfig, DownstreamEvalCallback, attach_downstream_eval
    from .callbacks.forgetting import ForgettingMonitorCallback, ForgettingMonitorConfig
    from .callbacks.kl_to_base import KLToBaseCallback, attach_kl_to_base
    from .collators.distill import DistillCollator, DistillConfig, precompute_distill_targets
    from .distill import compute_base_targets, evaluate_kl, make_frozen_copy
    from .evaluation import check_tasks, evaluate_tasks, offline_tasks_dir
    from .synth import SynthConfig, load_or_synthesize, synthesize_text
    from .callbacks.masking_stats import MaskingStatsCallback
    from .callbacks.new_rows_first import NewRowsFirstCallback
    from .callbacks.replay_mixer import ReplayMixerCallback
    from .callbacks.rewarm import (
        CycleConfig,
        RewarmCallback,
        RewarmConfig,
        lr_at_checkpoint,
        make_rewarm_optimizer,
        make_rewarm_scheduler,
    )
    from .callbacks.trained_parameters import TrainedParametersCallback
    from .collators.masking import CausalSpanCollator, LEMCollator, LexiconMaskingCollator, MaskingConfig
    from .collators.spans import tag_entities, tag_lexicon, tokenize_with_spans
    from .config import CPTConfig, DataConfig, ModelConfig, SourceConfig, TrainConfig
    from .hub import HubConfig, check_push_access, push_adapted
    from .liger import choose_loss, resolve_liger
    from .losses import apply_chunked_loss, chunked_linear_cross_entropy
    from .dynamics import (
        DynamicsFit,
        DynamicsLaw,
        LossLaw,
        PilotCurve,
        bootstrap_dynamics,
        fit_dynamics,
        predict_band,
        predict_curves,
    )
    from .mixers.cmr import (
        CMRFit,
        CMRPrediction,
        CMRRecord,
        fit_cmr_law,
        plot_cmr,
        predict_cmr,
        read_records,
        write_records,
    )
    from .mixers.core import RatioStage
    from .mixers.packing import DocumentMaskingGuard, bos_for, check_document_masking, probe_document_masking
    from .mixers.prepared import PreparedMixer, PreparedStore
    from .mixers.replay import ReplayMixer, ReplayMixerConfig
    from .model_card import render_model_card
    from .plotting import plot_forgetting
    from .recipe.cmr_pilot import run_cmr_pilot, write_cmr_config
    from .recipe.data import build_eval_sets, build_train_set
    from .recipe.evaluate import EvalComparison, compare_models
    from .recipe.models import load_model_and_tokenizer, resolve_model_path
    from .recipe.plan import (
        CPTPlan,
        PlanCandidate,
        plan_cpt,
        plan_from_pilots,
        plot_plan,
        read_pilot,
        write_plan,
    )
    from .recipe.prepare import prepare_config, prepare_sources
    from .recipe.resolve import load_config
    from .recipe.train import CPTResult, build_training_args, run_cpt
    from .recipe.vocab import extend_checkpoint
    from .templates import list_templates, load_template
    from .vocab.extend import VocabConfig, extend_model, extend_vocabulary
    from .vocab.init import EMBEDDING_INITS
    from .vocab.tokens import VocabExtension, learn_domain_tokens, merge_tokens
    from .vocab.vectors import WordVectors, build_word_vectors


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_cpt' has no attribute {name!r}")
