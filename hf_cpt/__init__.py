"""hf-cpt: continual pretraining of Hugging Face models without forgetting.

Everything drops into `transformers.Trainer`: configs are dataclasses, techniques are callbacks, collators and
datasets. Attributes load lazily, so `import hf_cpt` stays fast and pulls no optional dependency.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module: the config and the recipe here; every technique's names come from its registry entry
# (`Technique.exports`, hf_cpt/registry.py), read on first use so `import hf_cpt` imports no technique module
_CORE_GROUPS: dict[str, dict[str, str]] = {
    "config": {n: "config" for n in ("CPTConfig", "ModelConfig", "DataConfig", "SourceConfig", "TrainConfig")},
    "recipe": {
        "run_cpt": "recipe.train", "CPTResult": "recipe.train", "build_training_args": "recipe.train",
        "load_config": "recipe.resolve", "load_model_and_tokenizer": "recipe.models",
        "resolve_model_path": "recipe.models", "build_train_set": "recipe.data", "build_eval_sets": "recipe.data",
        "extend_checkpoint": "recipe.vocab", "run_cmr_pilot": "recipe.cmr_pilot",
        "write_cmr_config": "recipe.cmr_pilot", "load_template": "templates", "list_templates": "templates",
        "OutputDirLock": "output_lock", "OutputDirBusyError": "output_lock",
    },
}
_CORE_EXPORTS = {name: module for group in _CORE_GROUPS.values() for name, module in group.items()}


def _groups() -> dict[str, dict[str, str]]:
    """Export groups: the config, the recipe, then one per registered technique (the README's groups)."""
    from .registry import exports

    return {**_CORE_GROUPS, **exports()}


def _exports() -> dict[str, str]:
    return {name: module for group in _groups().values() for name, module in group.items()}


if TYPE_CHECKING:  # pragma: no cover
    from .adapters import LoraAdapterConfig, add_lora_for_cpt
    from .param_groups import decay_parameter_names, freeze_bottom_layers
    from .callbacks.active_forgetting import ActiveForgettingCallback, ActiveForgettingConfig, relearn_embeddings
    from .callbacks.downstream import DownstreamConfig, DownstreamEvalCallback, attach_downstream_eval
    from .callbacks.forgetting import ForgettingMonitorCallback, ForgettingMonitorConfig
    from .callbacks.kl_to_base import KLToBaseCallback, attach_kl_to_base
    from .collators.distill_replay import DistillCollator, DistillConfig, precompute_distill_targets
    from .base_targets import compute_base_targets, evaluate_kl, make_frozen_copy
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
    from .mixers.cmr_select import (
        CMRSelection,
        PilotSchedule,
        SelectedCMRPrediction,
        plot_selection,
        predict_selected_cmr,
        select_cmr_estimator,
        write_selection,
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
    # the export tables are computed on use (not cached), so a technique registered later is exported too
    if name == "_GROUPS":
        return _groups()
    if name == "_EXPORTS":
        return _exports()
    if name == "__all__":
        return ["__version__", *_exports()]
    module = _CORE_EXPORTS.get(name)
    if module is None and not name.startswith("__"):
        module = _exports().get(name)
    if module is not None:
        from .registry import module_path

        value = getattr(importlib.import_module(module_path(module)), name)
        if name in _CORE_EXPORTS or module_path(module).startswith("hf_cpt."):
            globals()[name] = value  # cached: the next access is a plain attribute
        return value
    raise AttributeError(f"module 'hf_cpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_exports()))
