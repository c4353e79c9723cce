"""The run recipe: everything that consumes a whole `CPTConfig` (data, model, Trainer, outputs, CMR pilots,
vocabulary checkpoints). Techniques never import this package; the CLI only calls it."""

from .cmr_pilot import pilot_configs, run_cmr_pilot, write_cmr_config
from .evaluate import EvalComparison, compare_models
from .data import build_eval_sets, build_train_set, check_data_paths, load_split, tokenize_and_pack
from .merge_run import MergeResult, merge_with_base
from .models import load_model_and_tokenizer, resolve_model_path
from .prepare import prepare_config, prepare_sources
from .resolve import default_output_dir, load_config
from .train import CPTResult, build_training_args, checkpoint_dir, run_cpt
from .vocab import extend_checkpoint, vocab_corpora

__all__ = [
    "CPTResult",
    "EvalComparison",
    "build_eval_sets",
    "build_train_set",
    "build_training_args",
    "check_data_paths",
    "checkpoint_dir",
    "compare_models",
    "default_output_dir",
    "extend_checkpoint",
    "load_config",
    "load_model_and_tokenizer",
    "load_split",
    "merge_with_base",
    "MergeResult",
    "pilot_configs",
    "prepare_config",
    "prepare_sources",
    "resolve_model_path",
    "run_cmr_pilot",
    "run_cpt",
    "tokenize_and_pack",
    "vocab_corpora",
    "write_cmr_config",
]
