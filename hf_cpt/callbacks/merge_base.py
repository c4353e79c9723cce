"""Merging with the base as part of the run (`merge_base: {alpha}`): evaluated beside the live model at every
evaluation and shipped at the end, so the run writes the merged model with its held-out numbers.

The interpolation is `hf_cpt.merge.interpolate_tensor` (WiSE-FT / task-vector weight interpolation, the pure
core `hf-cpt merge` also uses):

    W(alpha) = W_base + alpha * (W_trained - W_base)      alpha = 1: the trained model, alpha = 0: the base

`hf-cpt merge RUN --alpha ...` does the same after a run, from files, and sweeps alphas; this block is for a
recipe that has chosen its alpha (e.g. from such a sweep or from `hf-cpt study`): the merged model is then what
the run measures, guards (`monitor.guards: [{set: merged_general_self, ...}]`) and writes.

At every evaluation the callback swaps the merged weights in, logs `eval_merged_<set>_loss` (and, for the sets
the KL to the base is measured on, `eval_merged_<set>_kl` / `eval_merged_<set>_top1_agree`, from the same base
targets), and swaps the trained weights back: the forgetting monitor records the sets `merged_<set>`, the plot
draws them, the card and `metrics.json` report them. With `ship` (the default) the merge goes into the model after
the last update, before the run's final evaluation, so every end number (held-out losses, KL, guards, lm-eval
scores, the summary sentence) describes the model that is saved; the trained model's own curve is the live one up
to the evaluation before. Rows of new tokens (`vocab:`) come from the trained model, as in `hf-cpt merge`.

Memory, stated: a float32 copy of every trainable parameter at the start of training (the base), on the CPU.
A LoRA run merges at adapter strength alpha, as `hf-cpt merge` does: the B factors (zero at the start) are
scaled by alpha and the A factors kept, so the update B @ A becomes alpha x B @ A; `modules_to_save` and trained
embedding rows are interpolated whole. Refused: sharded models (each rank holds a shard).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ..merge import interpolate_tensor
from ..registry import Technique, TrainerParts, names
from ..utils import is_sharded_model, unwrap_model
from ..validation import check_bool, check_number

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)

PREFIX = "merged_"
_LORA_A = re.compile(r"\.lora_(embedding_)?A\b")  # peft's down-projection factors


@dataclass
class MergeBaseConfig:
    """Merge the trained model with its base at `alpha` (evaluated beside the live model, shipped at the end)."""

    alpha: float = field(default=0.5, metadata={"help": "Share of the training update kept: 1 = the trained model, "
                                                        "0 = the base (in [0, 1])."})
    evaluate: bool = field(default=True, metadata={"help": "Log `eval_merged_<set>_loss` (and KL) at every "
                                                           "evaluation."})
    ship: bool = field(default=True, metadata={"help": "At the end, put the merge into the model (saved)."})

    def __post_init__(self) -> None:
        self.alpha = check_number("alpha", self.alpha, 0.0, 1.0)
        for name in ("evaluate", "ship"):
            check_bool(name, getattr(self, name))


def base_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`{name: float32 CPU copy}` of the model's trainable parameters (tied ones once): the base to merge with."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().to(device="cpu", dtype=torch.float32, copy=True)
    return out


class MergeBaseCallback(TrainerCallback):
    """Evaluates `base + alpha * (trained - base)` beside the live model and, with `ship`, leaves it in the model.

    Args:
        config: a [`MergeBaseConfig`].
        base: the base weights, `{parameter name: tensor}` ([`base_snapshot`] of the model before training).
        eval_sets: `{name: blocks}` to evaluate the merge on (the Trainer's `eval_dataset` dict); empty: no
            evaluation.
        batch_size: rows per forward pass of that evaluation.
        new_rows_from: rows from this index on (new tokens of an extended vocabulary) come from the trained model
            in the embedding and head.
        kl: the run's `KLToBaseCallback`, whose base targets give the merge's KL on its sets (optional).
    """

    def __init__(self, config: MergeBaseConfig, base: Mapping[str, torch.Tensor],
                 eval_sets: Mapping[str, Any] | None = None, batch_size: int = 8, new_rows_from: int | None = None,
                 kl: Any = None) -> None:
        self.config, self.base = config, dict(base)
        self.eval_sets = dict(eval_sets or {})
        self.batch_size, self.new_rows_from, self.kl = batch_size, new_rows_from, kl
        self.shipped = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and is_sharded_model(unwrap_model(model)):
            raise ValueError("`merge_base` does not support sharded models (FSDP / ZeRO-3): each rank holds a shard; "
                             "train with DDP or one process, or merge the saved run with `hf-cpt merge`")
        return control

    def merged_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """`{name: merged tensor}` for the trainable parameters, in each parameter's dtype and device."""
        params = dict(model.named_parameters())
        rows = self._row_parameters(model)
        out = {}
        for name, base in self.base.items():
            p = params[name].detach()
            if _LORA_A.search(name):  # a LoRA run: B scaled by alpha is alpha x the adapter's update B @ A
                out[name] = p.clone()
                continue
            merged = interpolate_tensor(base, p.float().cpu(), self.config.alpha,
                                        new_rows_from=self.new_rows_from if name in rows else None, name=name)
            out[name] = merged.to(device=p.device, dtype=p.dtype)
        return out

    def _row_parameters(self, model: torch.nn.Module) -> set[str]:
        """Names of the embedding and head weights (their rows are tokens)."""
        ids = set()
        for get in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, get, lambda: None)()
            if module is not None:
                ids |= {id(p) for p in module.parameters()}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """Run the body with the model holding the merge (each parameter's tensor swapped, then restored)."""
        params = dict(model.named_parameters())
        live = {}
        try:
            for name, value in self.merged_weights(model).items():
                live[name] = params[name].data
                params[name].data = value
            yield
        finally:
            for name, data in live.items():
                params[name].data = data

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.config.evaluate or not logs or model is None or not state.is_world_process_zero:
            return control
        wanted = [n for n in self.eval_sets if f"eval_{n}_loss" in logs]
        if not wanted:
            return control
        from .weight_averaging import held_out_loss

        extra: dict[str, float] = {}
        if state.global_step == 0 or self.shipped:  # the live model is the merge: the base at step 0, or shipped
            for n in wanted:
                extra.update({f"eval_{PREFIX}{n}_{m}": float(logs[f"eval_{n}_{m}"])
                              for m in ("loss", "kl", "top1_agree") if f"eval_{n}_{m}" in logs})
        else:
            model = unwrap_model(model)
            with self.swapped_in(model):
                for n in wanted:
                    extra[f"eval_{PREFIX}{n}_loss"] = held_out_loss(model, self.eval_sets[n], self.batch_size)
                    extra.update(self._kl(model, n))
        logs.update(extra)  # the dict the Trainer returns from evaluate() and the monitor reads
        if state.log_history and f"eval_{wanted[0]}_loss" in state.log_history[-1]:
            state.log_history[-1].update(extra)
        return control

    def _kl(self, model: torch.nn.Module, name: str) -> dict[str, float]:
        kl = self.kl
        if kl is None or name not in getattr(kl, "targets", {}):
            return {}
        from ..base_targets import evaluate_kl

        t = kl.targets[name]
        result = evaluate_kl(model, kl.inputs[name], t["ids"], t["logprobs"], batch_size=kl.batch_size,
                             attention_mask=kl.masks[name], position_ids=kl.positions[name])
        return {f"eval_{PREFIX}{name}_kl": result["kl"], f"eval_{PREFIX}{name}_top1_agree": result["top1_agree"]}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # ship after the last update, before the run's final evaluation: every end number (losses, KL, guards,
        # downstream scores, the summary) then describes the model that is saved
        if self.config.ship and model is not None and state.global_step >= state.max_steps:
            self.ship(model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.config.ship and model is not None and not self.shipped:  # stopped early (e.g. by a guard)
            self.ship(model)
            logger.warning("merge_base: the run stopped at step %d, before its end: the merge is saved, but its last "
                           "evaluation measured the trained model (see the `merged_*` sets)", state.global_step)
        return control

    def ship(self, model: torch.nn.Module) -> None:
        """Put the merge into the model's parameters (once)."""
        if self.shipped:
            return
        model = unwrap_model(model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.merged_weights(model).items():
                params[name].copy_(value)
        self.shipped = True
        logger.info("merge_base: the model now holds base + %g x (trained - base) (shipped)", self.config.alpha)


__all__ = ["MergeBaseCallback", "MergeBaseConfig", "base_snapshot"]


# --- registry entry ---------------------------------------------------------------------------------------------------
def _check(cfg: CPTConfig) -> None:
    wa = cfg.weight_averaging
    if cfg.merge_base is not None and cfg.merge_base.ship and wa is not None and wa.ship:
        raise ValueError("`merge_base.ship` and `weight_averaging.ship` both replace the saved weights: keep one "
                         "(set the other's `ship: false` to evaluate it beside the live model)")


def _setup(parts: TrainerParts) -> Any:
    from ..utils import add_callback_before_integrations
    from .kl_to_base import KLToBaseCallback

    cfg = parts.cfg
    vocab = parts.vocab_summary or {}
    callback = MergeBaseCallback(cfg.merge_base, base_snapshot(parts.model),  # the model before any update
                                 parts.data.eval_sets if cfg.masking is None else None,
                                 batch_size=cfg.train.per_device_eval_batch_size,
                                 new_rows_from=vocab.get("old_vocab_size"))

    def attach(trainer: Any) -> None:
        callback.kl = next((c for c in trainer.callback_handler.callbacks if isinstance(c, KLToBaseCallback)), None)
        add_callback_before_integrations(trainer, callback)  # after the KL callback: its targets exist by then

    return attach


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    mb = config.get("merge_base")
    if not mb:
        return []
    return [f"merged with the base at alpha {mb.get('alpha')} (base + alpha x (trained - base)); "
            + ("**these weights are the merge** (its held-out numbers are the `merged_*` sets)" if mb.get("ship", True)
               else "evaluated beside the live model (`merged_*` sets); these weights are the trained model")]


TECHNIQUE = Technique(
    name="merging with the base",
    key="merge_base",  # and, on a finished run, `hf-cpt merge` / `merge_with_base` (recipe/merge_run.py)
    config=MergeBaseConfig,
    exports={**names("callbacks.merge_base", "MergeBaseConfig", "MergeBaseCallback"),
             **names("merge", "merge_checkpoints", "interpolate_tensor", "MergeSummary"),
             "merge_lora_checkpoint": "merge_lora",
             **names("merge_sweep", "pareto_front", "knee_point", "pick_row", "plot_merge_sweep"),
             **names("recipe.merge_run", "merge_with_base", "MergeResult")},
    functional={"interpolate_tensor": "merge", "lora_delta": "merge_lora",
                **names("merge_sweep", "knee_point", "pareto_front", "pick_row")},
    unsharded="merging with the base keeps a full copy of the base weights on the main process",
    check=_check,
    setup=_setup,
    card=_card,
)
