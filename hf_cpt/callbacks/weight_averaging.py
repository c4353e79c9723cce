"""Weight averaging during training: an exponential moving average of the weights, or the average of the last K
snapshots, evaluated beside the live model and, if asked, shipped instead of it.

Averaging the weights along the trajectory cancels part of the noise of the last updates at no training cost
(Polyak-Ruppert averaging; EMA of weights, e.g. Morales-Brotons et al. 2024, "Exponential Moving Average of
Weights in Deep Learning: Dynamics and Benefits"; LAWA, Sanyal et al. 2023, "Early Weight Averaging meets High
Learning Rates for LLM Pre-training", averages the last K checkpoints):

    ema:     a <- decay * a + (1 - decay) * w       every `every` updates from `start_step` (a starts at w)
    last_k:  a  = (w_{t-(K-1)e} + ... + w_{t-e} + w_t) / K   over snapshots taken every `every` updates

Memory, stated: the average keeps a float32 copy of every trainable parameter (4 bytes x trainable params; on
the CPU by default, `device: model` keeps it beside the weights), `last_k` keeps K such copies. Frozen
parameters (e.g. a LoRA run's base) are not copied: they do not move.

The callback is resumable exactly: at each checkpoint save it writes `weight_average.safetensors` (the float32
average or snapshots and the update count) into the checkpoint folder, and a resumed run reads it back in
`on_train_begin`. Rank-aware: under DDP every rank holds the same weights, so only the main process writes the
file and evaluates the average; sharded models (FSDP, ZeRO-3) are refused (each rank holds a shard).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import TrainerCallback

from ..averaging import average_due, ema_update, window_average  # noqa: F401  (the pure cores)
from ..registry import Technique, TrainerParts, names
from ..utils import is_sharded_model, unwrap_model
from ..validation import check_bool, check_choice, check_int, check_number

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)

METHODS = ("ema", "last_k")
DEVICES = ("cpu", "model")
STATE_FILE = "weight_average.safetensors"


@dataclass
class WeightAveragingConfig:
    """Which average to keep, how often, and what to do with it."""

    method: Literal["ema", "last_k"] = field(default="ema", metadata={"help": f"One of {METHODS}."})
    decay: float = field(default=0.999, metadata={"help": "EMA decay per update (in [0, 1))."})
    k: int = field(default=5, metadata={"help": "`last_k`: snapshots averaged (K float32 copies in memory)."})
    every: int = field(default=1, metadata={"help": "Update the average (or take a snapshot) every N updates."})
    start_step: int = field(default=0, metadata={"help": "First update that counts (the EMA starts there)."})
    device: Literal["cpu", "model"] = field(
        default="cpu", metadata={"help": "Where the average lives: `cpu`, or `model` (beside the weights)."})
    evaluate: bool = field(default=True, metadata={"help": "Log `eval_avg_<set>_loss` beside the live losses."})
    ship: bool = field(default=False, metadata={"help": "At the end, put the average into the model (saved)."})

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("device", self.device, DEVICES)
        self.decay = check_number("decay", self.decay, 0.0, 1.0, max_inclusive=False)
        check_int("k", self.k)
        check_int("every", self.every)
        check_int("start_step", self.start_step, minimum=0)
        for name in ("evaluate", "ship"):
            check_bool(name, getattr(self, name))




# --- the callback ---------------------------------------------------------------------------------------------------
class WeightAveragingCallback(TrainerCallback):
    """Keeps an EMA (or last-K average) of the trainable weights; logs its held-out loss beside the live model's
    (``eval_avg_<set>_loss``, in the same log record, so the forgetting monitor records it as set `avg_<set>`);
    with `ship`, the model ends training holding the average.

    Args:
        config: a [`WeightAveragingConfig`] (default: EMA, decay 0.999, every update).
        eval_sets: `{name: blocks}` to evaluate the average on: rows of `input_ids` with `labels` (and
            `position_ids` / `attention_mask` when the blocks have them), e.g. the Trainer's `eval_dataset` dict.
            Evaluated when the Trainer logs ``eval_<name>_loss``.
        batch_size: rows per forward pass of that evaluation.
    """

    def __init__(self, config: WeightAveragingConfig | None = None, eval_sets: Mapping[str, Any] | None = None,
                 batch_size: int = 8) -> None:
        check_int("batch_size", batch_size)
        self.config = config or WeightAveragingConfig()
        self.eval_sets = dict(eval_sets or {})
        self.batch_size = batch_size
        self.average: dict[str, torch.Tensor] | None = None
        self.snapshots: deque[dict[str, torch.Tensor]] = deque(maxlen=self.config.k)
        self.updates = 0
        self.last_step: int | None = None

    # hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and is_sharded_model(unwrap_model(model)):
            raise ValueError("WeightAveragingCallback does not support sharded models (FSDP / ZeRO-3): each rank "
                             "holds a shard; train with DDP or a single process, or drop weight averaging")
        if state.global_step > 0 and self.last_step != state.global_step:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"resuming at step {state.global_step} but {path!r} is missing: the weight average "
                                 "cannot be restored (was the callback added after the run started?)")
            device = next(unwrap_model(model).parameters()).device if model is not None and \
                self.config.device == "model" else torch.device("cpu")
            self.load(path, device)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and average_due(state.global_step, self.config.start_step, self.config.every):
            self.update(unwrap_model(model), state.global_step)
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                self.save(os.path.join(folder, STATE_FILE))
        return control

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.config.evaluate or not logs or model is None or not state.is_world_process_zero:
            return control
        names = [n for n in self.eval_sets if f"eval_{n}_loss" in logs]
        if not names:
            return control
        model = unwrap_model(model)
        extra = {}
        with self.swapped_in(model):
            for name in names:
                # before the first update the average is the live model: the same number, no second pass
                extra[f"eval_avg_{name}_loss"] = float(logs[f"eval_{name}_loss"]) if not self.has_average() \
                    else held_out_loss(model, self.eval_sets[name], self.batch_size)
        logs.update(extra)  # the dict the Trainer returns from evaluate() and the monitor reads
        if state.log_history and f"eval_{names[0]}_loss" in state.log_history[-1]:
            state.log_history[-1].update(extra)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.config.ship and model is not None and self.has_average():
            self.copy_to(unwrap_model(model))
            logger.info("weight averaging: the model now holds the %s average of %d updates (shipped)",
                        self.config.method, self.updates)
        return control

    # the average
    def has_average(self) -> bool:
        return self.average is not None or bool(self.snapshots)

    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold the model's current trainable weights into the average (one update)."""
        device = None if self.config.device == "model" else "cpu"
        weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if self.config.method == "last_k":
            self.snapshots.append({n: w.to(device=device or w.device, dtype=torch.float32, copy=True)
                                   for n, w in weights.items()})
        elif self.average is None:
            self.average = {n: w.to(device=device or w.device, dtype=torch.float32, copy=True)
                            for n, w in weights.items()}
        else:
            self.average = {n: ema_update(a, weights[n], self.config.decay) for n, a in self.average.items()}
        self.updates += 1
        self.last_step = step

    def averaged_weights(self) -> dict[str, torch.Tensor]:
        """`{parameter name: float32 average}` (empty before the first update)."""
        if self.config.method == "last_k":
            if not self.snapshots:
                return {}
            return {n: window_average([s[n] for s in self.snapshots]) for n in self.snapshots[0]}
        return dict(self.average or {})

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """Run the body with the model holding the average (each parameter's tensor swapped, then restored)."""
        averaged = self.averaged_weights()
        params = dict(model.named_parameters())
        live = {}
        try:
            for name, value in averaged.items():
                p = params[name]
                live[name] = p.data
                p.data = value.to(device=p.device, dtype=p.dtype)
            yield
        finally:
            for name, data in live.items():
                params[name].data = data

    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the average into the model's parameters (in their dtype)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.averaged_weights().items():
                params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))

    # state
    def save(self, path: str | os.PathLike) -> None:
        """Write the average (EMA) or the snapshots (last-K) with the update count, for an exact resume."""
        from safetensors.torch import save_file

        tensors = {f"ema/{n}": t for n, t in (self.average or {}).items()}
        for i, snap in enumerate(self.snapshots):
            tensors.update({f"snapshot{i}/{n}": t for n, t in snap.items()})
        meta = {"method": self.config.method, "updates": str(self.updates), "snapshots": str(len(self.snapshots)),
                "last_step": json.dumps(self.last_step), "config": json.dumps(self.config.__dict__)}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)

    def load(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        """Restore what [`save`] wrote onto `device` (refusing a file of another method)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("method") != self.config.method:
                raise ValueError(f"{str(path)!r} holds a {meta.get('method')!r} weight average, but the callback "
                                 f"keeps {self.config.method!r}: restore the original `method`")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        def place(t: torch.Tensor) -> torch.Tensor:
            return t.to(device)

        ema = {k[4:]: place(v) for k, v in tensors.items() if k.startswith("ema/")}
        self.average = ema or None
        self.snapshots.clear()
        for i in range(int(meta.get("snapshots", 0))):
            prefix = f"snapshot{i}/"
            self.snapshots.append({k[len(prefix):]: place(v) for k, v in tensors.items() if k.startswith(prefix)})
        self.updates = int(meta.get("updates", 0))
        self.last_step = json.loads(meta.get("last_step", "null"))


def held_out_loss(model: torch.nn.Module, blocks: Any, batch_size: int = 8) -> float:
    """Mean next-token loss of `model` on `blocks` as the Trainer's evaluation computes it: each batch's mean
    loss, weighted by its rows."""
    from transformers import default_data_collator

    rows = [blocks[i] for i in range(len(blocks))]
    device = next(model.parameters()).device
    total = count = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = default_data_collator(rows[start:start + batch_size])
                batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "labels", "position_ids",
                                                                             "attention_mask")}
                if "labels" not in batch:
                    batch["labels"] = batch["input_ids"]
                n = batch["input_ids"].shape[0]
                total += float(model(**batch).loss) * n
                count += n
    finally:
        model.train(was_training)
    return total / max(count, 1.0)


__all__ = ["WeightAveragingCallback", "WeightAveragingConfig", "average_due", "ema_update", "held_out_loss",
           "window_average"]


# --- registry entry ---------------------------------------------------------------------------------------------------
def _setup(parts: TrainerParts) -> Any:
    from ..utils import add_callback_before_integrations

    cfg = parts.cfg
    callback = WeightAveragingCallback(cfg.weight_averaging, parts.data.eval_sets if cfg.masking is None else None,
                                       batch_size=cfg.train.per_device_eval_batch_size)
    # ahead of the reporting integrations, which then log the average's losses too
    return lambda trainer: add_callback_before_integrations(trainer, callback)


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    wa = config.get("weight_averaging")
    if not wa:
        return []
    how = f"EMA, decay {wa.get('decay')}" if wa.get("method") == "ema" else f"mean of the last {wa.get('k')}"
    return [f"weight averaging: {how}, every {wa.get('every')} updates; "
            + ("**these weights are the average** (its held-out losses are the `avg_*` sets)" if wa.get("ship")
               else "evaluated beside the live model (`avg_*` sets); these weights are the live model")]


def _check(cfg: CPTConfig) -> None:
    wa = cfg.weight_averaging
    if wa is not None and wa.start_step >= cfg.train.max_steps:
        raise ValueError(f"`weight_averaging.start_step` ({wa.start_step}) is not before the end of the run "
                         f"(`train.max_steps`={cfg.train.max_steps}): no update would be averaged; lower it")


TECHNIQUE = Technique(
    name="weight averaging",
    key="weight_averaging",
    config=WeightAveragingConfig,
    exports=names("callbacks.weight_averaging", "WeightAveragingConfig", "WeightAveragingCallback"),
    functional=names("averaging", "ema_update", "window_average", "average_due"),
    unsharded="weight averaging keeps a full copy of the weights on the main process",
    check=_check,
    setup=_setup,
    card=_card,
)
