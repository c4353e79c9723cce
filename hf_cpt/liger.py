"""Which loss a causal-LM run uses: Liger kernels on CUDA where they can run, else hf-cpt's chunked loss, else the
model's own; [`choose_loss`] decides and says why in one line.

liger-kernel hard-depends on Triton and needs a CUDA device: on a CPU machine it imports, even patches a model,
and `TrainingArguments(use_liger_kernel=True)` is accepted, but the first forward fails ("0 active drivers").
[`resolve_liger`] decides up front. When Liger is on, transformers applies it (`use_liger_kernel=True`), which
includes its fused linear cross-entropy; when it is off, hf-cpt uses its own chunked loss (`hf_cpt.losses`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from .import_utils import is_liger_available
from .losses import apply_chunked_loss, lm_head_has_lora, supports_chunked_loss
from .registry import Technique, TrainerParts, names
from .validation import check_flag

if TYPE_CHECKING:  # pragma: no cover
    from .config import CPTConfig

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
    return check_flag("use_liger", value, LIGER_MODES)


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


LOSS_MODES = ("liger", "chunked", "standard")


def choose_loss(model: torch.nn.Module, use_liger: Any = "auto", chunked_loss: Any = "auto",
                chunk_size: int | None = None, require_chunked: bool = False) -> str:
    """Pick and apply the loss of a causal-LM run; returns `liger`, `chunked` or `standard`.

    Liger where `resolve_liger` allows it (the caller then sets `TrainingArguments.use_liger_kernel=True`: the
    Trainer applies it), else hf-cpt's chunked loss where `chunked_loss` (auto|true|false) and the model allow it,
    else the model's own loss. `require_chunked` (per-token loss weights or distillation targets, which only the
    chunked loss reads) skips Liger and raises with the reason when the chunked loss cannot apply.
    """
    chunked_loss = check_flag("chunked_loss", chunked_loss)
    if not require_chunked:
        use, note = resolve_liger(use_liger, model)
        if normalize_liger_mode(use_liger) != "false":
            logger.info(note)
        if use:
            return "liger"
    reason = supports_chunked_loss(model)
    if not require_chunked and (chunked_loss == "false" or (chunked_loss == "auto" and reason is not None)):
        if reason and chunked_loss == "auto":
            logger.info("chunked loss off: %s", reason)
        return "standard"
    apply_chunked_loss(model, chunk_size)  # raises with the reason when it cannot apply
    logger.info("chunked cross-entropy on (%s tokens per chunk): no full logits tensor", chunk_size or "auto")
    return "chunked"


# --- registry entry ---------------------------------------------------------------------------------------------------
def _setup(parts: TrainerParts) -> None:
    t = parts.cfg.train
    mode = choose_loss(parts.model, t.use_liger, t.chunked_loss, t.loss_chunk_size or None,
                       require_chunked=parts.cfg.needs_chunked_loss)
    parts.args.use_liger_kernel = mode == "liger"  # the Trainer applies Liger itself


def _is_causal(cfg: CPTConfig) -> bool:
    return cfg.objective == "clm"


TECHNIQUE = Technique(
    name="memory",
    key="train.chunked_loss",  # with `train.use_liger` and `train.loss_chunk_size`
    exports={**names("losses", "chunked_linear_cross_entropy", "apply_chunked_loss"),
             **names("liger", "resolve_liger", "choose_loss"),
             "TrainedParametersCallback": "callbacks.trained_parameters"},
    functional=names("losses", "chunked_linear_cross_entropy"),
    enabled=_is_causal,  # the loss of a causal run: Liger, the chunked loss, or the model's own
    setup=_setup,
)
