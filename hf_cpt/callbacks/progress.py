"""One progress bar for the training phase, with tokens/s, that evaluation reports into instead of nesting a bar.

transformers' own `ProgressCallback` opens a second bar under the training bar for every evaluation of every
held-out set (three or four sets per evaluation here): on a terminal they stack and flicker, and redirected to a
file they are the carriage returns and cursor-up codes hf-cpt turns off (`TQDM_DISABLE`, see `hf_cpt.cli.main`).
This one keeps a single bar per phase: the training bar counts updates and shows the training tokens/s (time spent
evaluating excluded); while the Trainer evaluates, the same bar says which evaluation is running, its batches and
its tokens/s. Logged metrics are still printed above the bar, as the Trainer's callback prints them.

The recipe swaps it in for the Trainer's (`swap_progress_bar`); a Python user can do the same::

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(PhaseProgressCallback(tokens_per_step=8 * 2048, eval_tokens_per_batch=16 * 2048))

The phases before training get one bar each from the same module ([`PhaseBar`]): self-synthesis (tokens),
tokenizing the held-out sets or a prepared store's sources (documents and tokens/s, with `datasets`' own per-`map`
bars off meanwhile: [`datasets_bars_off`]) and data cleaning (documents).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, Self

from transformers.trainer_callback import ProgressCallback


_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("hf_cpt_training_bar_label", default="training")


@contextlib.contextmanager
def training_bar_label(label: str) -> Iterator[None]:
    """Name the training bar of the runs started inside the block ("pilot 1/2: pilot-constant-r0.25" in
    `hf-cpt plan --run`, a study's run) instead of "training"; the previous name returns when the block ends."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def tokens_per_second(tokens: float, seconds: float) -> str:
    """``"12.3k tok/s"``: a rate for a progress bar's postfix (no rate before any time has passed)."""
    if seconds <= 0:
        return "- tok/s"
    rate = tokens / seconds
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.1f}{unit} tok/s"
    return f"{rate:.0f} tok/s"


class PhaseProgressCallback(ProgressCallback):
    """The Trainer's progress callback with one bar: training updates and tokens/s, evaluation inside it.

    Args:
        tokens_per_step: training tokens per optimizer update over all processes (blocks per update x block
            size), for the tokens/s of the training phase.
        eval_tokens_per_batch: tokens per evaluation batch on one process (eval batch size x block size).
        label: the bar's name while training; default "training", or the name set by [`training_bar_label`].
    """

    def __init__(self, tokens_per_step: int, eval_tokens_per_batch: int, max_str_len: int = 100,
                 label: str | None = None) -> None:
        super().__init__(max_str_len=max_str_len)
        self.label = label if label is not None else _LABEL.get()
        self.tokens_per_step = tokens_per_step
        self.eval_tokens_per_batch = eval_tokens_per_batch
        self._train_seconds = 0.0  # training time so far, evaluations excluded
        self._since: float | None = None  # when the current stretch of training started
        self._first_step = 0  # a resumed run counts the tokens/s of its own updates only
        self._eval_batches = 0
        self._eval_started: float | None = None
        self._clock = time.perf_counter  # a test drives its own clock
        self._mark = 0.0  # the last hook before an evaluation starts: the update or evaluation that ended then

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.label)
            self.training_bar.unit = "step"
        self._first_step = self.current_step = state.global_step
        if self.training_bar is not None and state.global_step:
            self.training_bar.update(state.global_step)  # resumed: the bar starts where the run is
        self._since = self._mark = self._clock()

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self._mark = self._clock()
        if self.training_bar is not None:
            self.training_bar.set_postfix_str(self._training_rate(), refresh=False)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.training_bar is None:  # evaluate() outside training: the Trainer's one bar for it
            return super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        if not state.is_world_process_zero:
            return
        if self._eval_started is None:  # the first batch of this evaluation, which began at the last hook
            if self._since is not None:
                self._train_seconds += max(self._mark - self._since, 0.0)
                self._since = None
            self._eval_started, self._eval_batches = self._mark, 0
            self.training_bar.set_description(
                "evaluating" if self.label == "training" else f"{self.label}: evaluating", refresh=False)
        self._eval_batches += 1
        total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") else "?"
        rate = tokens_per_second(self._eval_batches * self.eval_tokens_per_batch,
                                 self._clock() - self._eval_started)
        self.training_bar.set_postfix_str(f"batch {self._eval_batches}/{total}, {rate}")

    def on_evaluate(self, args, state, control, **kwargs):
        super().on_evaluate(args, state, control, **kwargs)
        if self.training_bar is not None and self._eval_started is not None:
            self._eval_started = None
            self.training_bar.set_postfix_str(self._training_rate(), refresh=False)
            self.training_bar.set_description(self.label)
            self._since = self._mark = self._clock()

    def _training_rate(self) -> str:
        running = 0.0 if self._since is None else self._mark - self._since  # up to the update that just ended
        return tokens_per_second((self.current_step - self._first_step) * self.tokens_per_step,
                                 self._train_seconds + running)


def swap_progress_bar(trainer: Any, block_size: int) -> None:
    """Replace the Trainer's `ProgressCallback` (present unless `disable_tqdm`) by a [`PhaseProgressCallback`]
    sized for blocks of `block_size` tokens."""
    handler = trainer.callback_handler
    if not any(type(c) is ProgressCallback for c in handler.callbacks):
        return
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size * block_size
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(PhaseProgressCallback(per_step, args.per_device_eval_batch_size * block_size))


# --- the phases before training (synthesis, tokenizing, cleaning): one bar each, from one helper ---------------
def bars_disabled(stream: Any = None) -> bool:
    """Whether a [`PhaseBar`] stays off: `TQDM_DISABLE` is set (`hf-cpt` sets it when output is redirected), or
    `stream` (default stderr) is not a terminal, so a log file never gets the carriage returns of a redrawn bar.
    A notebook (where `tqdm.auto` draws widgets) always gets its bars."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"):
        return True
    from tqdm.auto import tqdm

    if any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__):  # a notebook widget: its output is no stream
        return False
    stream = sys.stderr if stream is None else stream
    return not getattr(stream, "isatty", lambda: False)()


class PhaseBar:
    """One progress bar for one long phase before training, in the style of the training bar: what it counts
    (`documents`, or `tokens` for synthesis) and the tokens/s in its postfix. Off when `progress` is False or
    [`bars_disabled`]; use it as a context manager (it closes itself).

    A bar handed to a worker process (e.g. inside a `datasets.map` function with `num_proc`) arrives there
    disabled (the caller counts that work once it is done), and it pickles to the same bytes whatever it has
    counted, so the map function's cache fingerprint stays stable.

    Args:
        desc: the phase, e.g. `"Tokenizing held-out sets"`.
        total: units in the phase (documents, or tokens with `unit="tok"`), None when unknown.
        unit: `"doc"` (the postfix shows tokens/s once tokens are reported) or `"tok"` (tqdm's own rate is it).
        progress: False keeps the bar off.
        file: where to draw (default: stderr).
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "doc", progress: bool = True,
                 file: Any = None) -> None:
        from tqdm.auto import tqdm

        self.unit, self.documents, self.tokens = unit, 0, 0
        self.disabled = not progress or bars_disabled(file)
        self._clock = time.perf_counter
        self._start = self._clock()
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "tok", disable=self.disabled, file=file)

    def update(self, documents: int = 0, tokens: int = 0) -> None:
        """Count `documents` and `tokens` more (the bar advances by the unit it counts)."""
        self.documents += documents
        self.tokens += tokens
        if self.disabled:
            return
        if self.unit == "tok":
            self.bar.update(tokens)
            return
        if self.tokens:
            self.bar.set_postfix_str(tokens_per_second(self.tokens, self._clock() - self._start), refresh=False)
        self.bar.update(documents)

    def close(self) -> None:
        if not self.disabled:
            self.bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"unit": self.unit}

    def __setstate__(self, state: dict[str, Any]) -> None:  # in a worker process: draws nothing
        self.unit, self.documents, self.tokens, self.disabled = state["unit"], 0, 0, True


@contextlib.contextmanager
def datasets_bars_off() -> Iterator[None]:
    """`datasets`' own progress bars (one per `map`) off while a [`PhaseBar`] shows the phase, the user's
    setting restored after; `HF_DATASETS_DISABLE_PROGRESS_BARS=0` (the user asked for them) is left alone."""
    import importlib

    bars = importlib.import_module("datasets.utils.tqdm")  # the module (`datasets.utils.tqdm` is also a class)
    if bars.are_progress_bars_disabled() or bars.HF_DATASETS_DISABLE_PROGRESS_BARS is False:
        yield
        return
    bars.disable_progress_bars()
    try:
        yield
    finally:
        bars.enable_progress_bars()
