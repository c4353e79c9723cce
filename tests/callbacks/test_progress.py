"""One progress bar for training with tokens/s; evaluations report into it instead of opening nested bars."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, ProgressCallback

from hf_cpt.callbacks.progress import PhaseProgressCallback, swap_progress_bar, tokens_per_second, training_bar_label


@pytest.fixture
def bars(monkeypatch):
    """Every bar the Trainer's progress callback opens, drawn into a buffer (enabled even when the suite runs
    with TQDM_DISABLE)."""
    import transformers.trainer_callback as trainer_callback

    made, out = [], io.StringIO()

    def bar(*args, **kwargs):
        made.append(tqdm(*args, **{**kwargs, "file": out, "disable": False, "mininterval": 0}))
        return made[-1]

    monkeypatch.setattr(trainer_callback, "tqdm", bar)
    return made, out


def test_training_and_its_evaluations_share_one_bar_with_tokens_per_second(bars):
    made, out = bars
    cb = PhaseProgressCallback(tokens_per_step=1000, eval_tokens_per_batch=500)
    clock = iter(range(100))
    cb._clock = lambda: float(next(clock))  # one second per reading
    state, control, args = TrainerState(), TrainerControl(), None
    state.max_steps = 4
    cb.on_train_begin(args, state, control)  # t=0
    for step in (1, 2):
        state.global_step = step
        cb.on_step_end(args, state, control)  # t=1, 2: 1,000 tokens per second
    assert made[0].postfix == "1.0k tok/s" and made[0].desc.startswith("training")
    for name in ("general", "domain"):  # the Trainer evaluates each held-out set on its own
        for _ in range(2):
            cb.on_prediction_step(args, state, control, eval_dataloader=[0, 1])
        assert made[0].desc.startswith("evaluating") and made[0].postfix.startswith("batch 2/2, ")
        cb.on_evaluate(args, state, control, metrics={f"eval_{name}_loss": 1.0})
    assert made[0].desc.startswith("training")
    state.global_step = 3
    cb.on_step_end(args, state, control)
    assert made[0].postfix == "1.0k tok/s"  # the evaluations' time is not training time
    cb.on_train_end(args, state, control)
    assert len(made) == 1  # no nested bar per evaluation
    assert "\x1b[A" not in out.getvalue()  # no cursor-up codes: nothing is stacked


def test_a_labelled_block_names_the_bars_of_the_runs_inside_it(bars):
    made, _ = bars
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 2
    with training_bar_label("pilot 1/2 pilot-constant-r0.25"):
        with training_bar_label("inner"):
            assert PhaseProgressCallback(1, 1).label == "inner"
        cb = PhaseProgressCallback(tokens_per_step=10, eval_tokens_per_batch=10)
    assert PhaseProgressCallback(1, 1).label == "training"  # the name ends with the block
    cb.on_train_begin(None, state, control)
    assert made[0].desc.startswith("pilot 1/2 pilot-constant-r0.25")
    cb.on_prediction_step(None, state, control, eval_dataloader=[0])
    assert made[0].desc.startswith("pilot 1/2 pilot-constant-r0.25: evaluating")
    cb.on_evaluate(None, state, control, metrics={})
    assert made[0].desc.startswith("pilot 1/2 pilot-constant-r0.25") and "evaluating" not in made[0].desc


def test_the_recipe_swaps_the_trainers_bar_and_keeps_it_off_when_disabled(tmp_path):
    class FakeTrainer:
        def __init__(self, disable):
            self.args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          per_device_eval_batch_size=8, gradient_accumulation_steps=2,
                                          report_to="none", use_cpu=True, disable_tqdm=disable)
            self.callback_handler = CallbackHandler([DefaultFlowCallback, ProgressCallback], None, None, None, None)

        def remove_callback(self, c):
            self.callback_handler.remove_callback(c)

        def add_callback(self, c):
            self.callback_handler.add_callback(c)

    on = FakeTrainer(False)
    swap_progress_bar(on, block_size=128)
    (cb,) = [c for c in on.callback_handler.callbacks if isinstance(c, ProgressCallback)]
    assert type(cb) is PhaseProgressCallback and (cb.tokens_per_step, cb.eval_tokens_per_batch) == (4 * 2 * 128,
                                                                                                   8 * 128)
    off = FakeTrainer(True)
    off.callback_handler.remove_callback(ProgressCallback)  # what disable_tqdm means: the Trainer prints instead
    swap_progress_bar(off, block_size=128)
    assert not any(isinstance(c, ProgressCallback) for c in off.callback_handler.callbacks)


def test_tokens_per_second_reads_well():
    assert [tokens_per_second(t, 1.0) for t in (12, 12_345, 3_400_000)] == ["12 tok/s", "12.3k tok/s",
                                                                             "3.4M tok/s"]
    assert tokens_per_second(100, 0.0) == "- tok/s"
