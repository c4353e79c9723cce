"""Trainer glue for [`ReplayMixer`]: save its position with every checkpoint, restore it on resume, log the
tokens seen per source, and (with `packing="documents"`) keep the model's batches in the layout transformers
masks per document ([`DocumentMaskingGuard`], installed at the start of training and left on the model, so a
`trainer.evaluate()` after training still scores each document alone; `DocumentMaskingGuard.detach(model)`
removes it)."""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..mixers.packing import DocumentMaskingGuard
from ..mixers.prepared import PreparedMixer
from ..mixers.replay import ReplayMixer, register_mixer, registered_mixer
from ..utils import unwrap_model

logger = logging.getLogger(__name__)


def find_mixer(dataloader: Any) -> ReplayMixer | PreparedMixer | None:
    """The [`ReplayMixer`] or [`PreparedMixer`] under a (possibly accelerate-wrapped) dataloader, or None."""
    seen: set[int] = set()
    todo = [dataloader]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (ReplayMixer, PreparedMixer)):
            return obj
        todo.extend(getattr(obj, a, None) for a in ("dataset", "base_dataloader"))
    return None


class ReplayMixerCallback(TrainerCallback, ExportableState):
    """Makes a [`ReplayMixer`] (or [`PreparedMixer`]) training set resumable and accounted for.

    - A [`PreparedMixer`] computes any block from its index, so resuming is a seek (its `start` is set to the
      checkpoint's block), it may be read by dataloader workers, and it must be read in order
      (`train_sampling_strategy="sequential"`).

    - Each checkpoint stores the mixer state *at the last consumed block* (global step x blocks per update), not
      at the dataloader's prefetch position, so a resumed run sees exactly the blocks an uninterrupted one would.
    - On `resume_from_checkpoint` with `ignore_data_skip=True` and `restore_callback_states_from_checkpoint=True`
      the mixer jumps to that state directly; with `ignore_data_skip=False` the Trainer's own batch skipping
      replays the stream from the start instead (exact too, but it re-reads the data).
    - `mixer/tokens_<source>` is added to the Trainer logs; `tokens_per_source` holds the final counts.

    Args:
        mixer: the training set (or the mixer behind `mixer.to_iterable_dataset()`); found automatically in the
            train dataloader when omitted.
        slot: names this callback's mixer in the live-mixer table (`mixers/replay.py`: weak references, so an
            entry lasts as long as something holds the mixer). The Trainer rebuilds stateful callbacks from
            checkpoint state (`type(cb)(**state["args"])` with `restore_callback_states_from_checkpoint=True`),
            which would drop the mixer; the rebuilt callback gets the slot and finds the mixer given to the
            latest `ReplayMixerCallback` of that slot. A `ReplayMixer` in the train dataloader always wins.

    A checkpoint written with other ratios/block size/seed/vocabulary is refused unless the mixer was built with
    `strict_resume=False` (then positions are kept and the new settings apply from the resumed step).
    """

    def __init__(self, mixer: ReplayMixer | None = None, slot: str = "train") -> None:
        self.slot = slot
        if mixer is not None:
            register_mixer(mixer, f"callback:{slot}")
        self.mixer = mixer if mixer is not None else registered_mixer(f"callback:{slot}")
        self.saved_state: dict | None = None
        self.blocks_per_step: int | None = None
        self.global_step = 0
        self.is_reader = True

    def state(self) -> dict:
        return {"args": {"slot": self.slot},
                "attributes": {"saved_state": self._consumed_state(), "blocks_per_step": self.blocks_per_step}}

    def _consumed_state(self) -> dict | None:
        # under DDP accelerate reads the mixer on the main process only and sends each rank its slice; the other
        # processes' mixers stay unread, and checkpoints are written by the main process
        if self.mixer is None or self.blocks_per_step is None or not self.is_reader:
            return self.saved_state
        return self.mixer.state_at(self.global_step * self.blocks_per_step)

    @property
    def tokens_per_source(self) -> dict[str, int]:
        """Tokens per source in the blocks consumed by training so far."""
        state = self._consumed_state()
        return {n: s["tokens"] for n, s in state["sources"].items()} if state else {}

    def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kwargs):
        self.mixer = find_mixer(train_dataloader) or self.mixer
        if self.mixer is None:
            raise ValueError("ReplayMixerCallback found no ReplayMixer: pass it (`ReplayMixerCallback(mixer)`), or "
                             "use one as `train_dataset`")
        _check_trl_args(args, self.mixer.config.block_size)
        if self.mixer.config.packing == "documents" and model is not None:
            DocumentMaskingGuard.attach(unwrap_model(model))
        register_mixer(self.mixer, f"callback:{self.slot}")  # a rebuild from this run's checkpoints finds it
        if isinstance(self.mixer, PreparedMixer):
            # blocks are fetched by index: any number of workers, but in order (item i is block start + i)
            if getattr(args, "train_sampling_strategy", "sequential") != "sequential":
                raise ValueError("a PreparedMixer training set is read in order: set "
                                 "`train_sampling_strategy='sequential'` in TrainingArguments, got "
                                 f"{args.train_sampling_strategy!r}")
        elif args.dataloader_num_workers:
            raise ValueError("a ReplayMixer training set needs `dataloader_num_workers=0` (it tokenizes on the fly "
                             "and its position is checkpointed from the main process)")
        per_update = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if self.blocks_per_step not in (None, per_update):
            raise ValueError(f"the checkpoint consumed {self.blocks_per_step} blocks per update, this run "
                             f"{per_update}: keep per-device batch size x accumulation x processes unchanged")
        self.blocks_per_step = per_update
        self.global_step = state.global_step
        self.is_reader = state.is_world_process_zero or getattr(args.accelerator_config, "dispatch_batches", None) is False
        if state.global_step and args.ignore_data_skip:
            if self.saved_state is None:
                why = ("set `restore_callback_states_from_checkpoint=True` in TrainingArguments so the Trainer "
                       "restores it" if not args.restore_callback_states_from_checkpoint else
                       "the checkpoint has none; set `ignore_data_skip=False` so the Trainer replays the stream")
                raise ValueError(f"resuming with `ignore_data_skip=True` needs the mixer position: {why}")
            self.mixer.load_state_dict(self.saved_state, strict=self.mixer.strict_resume)
            if self.saved_state["blocks"] != state.global_step * per_update:
                raise ValueError(f"the checkpoint's mixer stopped at block {self.saved_state['blocks']}, not at "
                                 f"step {state.global_step} x {per_update} blocks")
        else:
            self.mixer.reset()
            if state.global_step:
                logger.info("replaying %d steps of the mix to resume (set ignore_data_skip=True to jump there)",
                            state.global_step)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.global_step = state.global_step
        return control


    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.mixer is not None and self.blocks_per_step is not None:
            for name, n in self.tokens_per_source.items():
                logs[f"mixer/tokens_{name}"] = n
        return control


def _check_trl_args(args: Any, block_size: int) -> None:
    """Refuse the `trl.SFTConfig` settings under which TRL would rebuild hf-cpt's blocks instead of training on them.

    TRL's `packing=True` re-packs the (already packed) blocks with its own boundaries and positions, and its
    dataset preparation truncates `input_ids` and `labels`, but not `position_ids`, to `max_length`. Read by
    attribute, so `trl` is not imported; plain `TrainingArguments` have neither field."""
    if getattr(args, "packing", False):
        raise ValueError("trl.SFTConfig(packing=True) would re-pack hf-cpt's blocks, which are packed already "
                         "(documents kept apart): set `packing=False` in SFTConfig")
    max_length = getattr(args, "max_length", None)
    prepared = not (getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset", False)
    if hasattr(args, "packing") and prepared and max_length is not None and max_length < block_size:
        raise ValueError(f"trl.SFTConfig(max_length={max_length}) is shorter than the mixer's `block_size` "
                         f"({block_size}): TRL would cut `input_ids` and `labels` but not `position_ids`. Pass "
                         "`dataset_kwargs={'skip_prepare_dataset': True}` to SFTConfig (hf-cpt's blocks need no "
                         f"preparation), or set `max_length >= {block_size}`")

