"""Liger kernels on CUDA, gated: apply them only where they can run, otherwise fall back with one notice.

liger-kernel hard-depends on Triton and needs a CUDA device: on a CPU machine it imports, even patches a model,
and `TrainingArguments(use_liger_kernel=True)` is accepted, but the first forward fails ("0 active drivers").
[`resolve_liger`] decides up front. When Liger is on, transformers applies it (`use_liger_kernel=True`), which
includes its fused linear cross-entropy; when it is off, hf-cpt uses its own chunked loss (`hf_cpt.losses`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .import_utils import is_liger_available
from .losses import lm_head_has_lora

logger = logging.getLogger(__name__)

LIGER_MODES = ("auto", "true", "false")


def liger_model_types() -> set[str]:
    """Model types liger-kernel can patch (empty when it is not installed)."""
    if not is_liger_available():
        return set()
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:  # layout changed in a future release: let transformers decide
        return set()
    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def normalize_liger_mode(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value not in LIGER_MODES:
        raise ValueError(f"`use_liger` must be auto, true or false, got {value!r}")
    return value


def resolve_liger(use_liger: Any, model: torch.nn.Module) -> tuple[bool, str]:
    """Whether to run `model` with Liger kernels, and a one-line reason.

    `auto` turns Liger on only with CUDA, liger-kernel installed, a supported `model_type` and no LoRA adapter on
    the output head; `true` raises a clear error when one of these is missing; `false` never uses it.
    """
    mode = normalize_liger_mode(use_liger)
    if mode == "false":
        return False, "Liger kernels off (`use_liger: false`)"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA device (Liger's Triton kernels need a GPU)")
    if not is_liger_available():
        problems.append("liger-kernel is not installed (pip install 'hf-cpt[liger]')")
    elif model_type not in liger_model_types():
        problems.append(f"liger-kernel does not support model type {model_type!r}")
    if lm_head_has_lora(model):
        problems.append("a LoRA adapter wraps lm_head, which Liger's fused loss would bypass (no gradient)")
    if not problems:
        return True, f"Liger kernels on for {model_type} (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)"
    if mode == "true":
        raise ValueError("`use_liger` is true but Liger cannot run here: " + "; ".join(problems)
                         + ". Set `use_liger: auto` to fall back to the chunked loss")
    return False, "Liger kernels off: " + "; ".join(problems) + "; using the chunked loss instead"
