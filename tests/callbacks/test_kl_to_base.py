"""KL to the base model inside a stock Trainer: logged with the evaluation, recorded by the monitor."""

import pytest
import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments, default_data_collator

from hf_cpt.callbacks.forgetting import ForgettingMonitorCallback, ForgettingMonitorConfig, compute_forgetting
from hf_cpt.callbacks.kl_to_base import KLToBaseCallback, attach_kl_to_base
from hf_cpt.config import DataConfig
from hf_cpt.base_targets import compute_base_targets, evaluate_kl
from hf_cpt.recipe.data import build_eval_sets, build_train_set
from hf_cpt.testing import make_tiny_llama


def _trainer(tmp_path, tok, model, callbacks, steps=4):
    data = DataConfig(block_size=32, max_eval_blocks=4)
    args = TrainingArguments(str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                             eval_strategy="steps", eval_steps=2, eval_on_start=True, report_to="none",
                             save_strategy="no", ignore_data_skip=True, disable_tqdm=True, use_cpu=True)
    evals = build_eval_sets(data, tok)
    trainer = Trainer(model=model, args=args, train_dataset=build_train_set(data, tok), eval_dataset=evals,
                      data_collator=default_data_collator, callbacks=callbacks)
    return trainer, evals


@pytest.mark.slow  # trains a tiny model for several steps with evaluations (>5 s under load)
def test_kl_is_logged_with_the_evaluation_and_recorded_by_the_monitor(tmp_path, tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    monitor = ForgettingMonitorCallback(ForgettingMonitorConfig(tolerance=1.0, action="none", kl_top_k=8))
    trainer, evals = _trainer(tmp_path, tiny_tokenizer, model, [monitor])
    kl = attach_kl_to_base(trainer, KLToBaseCallback({"general": evals["general"]}, top_k=8))
    trainer.train()
    hist = monitor.history
    assert [r["step"] for r in hist] == [0, 2, 4]
    assert hist[0]["general_kl"] == pytest.approx(0.0, abs=1e-6) and hist[0]["general_top1_agree"] == 1.0
    assert hist[-1]["general_kl"] > 1e-4 and "domain_kl" not in hist[-1]
    logged = [r for r in trainer.state.log_history if "eval_general_kl" in r]
    assert [r["step"] for r in logged] == [0, 2, 4]
    # the logged value is the estimator on the live model against the step-0 targets
    t = kl.targets["general"]
    ids = torch.tensor(evals["general"]["input_ids"])
    assert evaluate_kl(model, ids, t["ids"], t["logprobs"])["kl"] == pytest.approx(hist[-1]["general_kl"], rel=1e-5)
    assert compute_forgetting(hist)["general_kl_end"] == hist[-1]["general_kl"]


def test_precomputed_targets_are_required_after_step_0(tmp_path, tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer))
    ids = torch.randint(0, len(tiny_tokenizer), (3, 16))
    cb = KLToBaseCallback({"general": ids}, top_k=4)
    state = TrainerState()
    state.global_step = 5
    with pytest.raises(ValueError, match="pass `targets`"):
        cb.on_log(None, state, TrainerControl(), logs={"eval_general_loss": 1.0}, model=model)
    cb.compute_targets(model)
    expected = compute_base_targets(model, ids, 4)
    assert torch.equal(cb.targets["general"]["ids"], expected["ids"])
    logs = {"eval_general_loss": 1.0}
    cb.on_log(None, state, TrainerControl(), logs=logs, model=model)
    assert logs["eval_general_kl"] == pytest.approx(0.0, abs=1e-6) and logs["eval_general_top1_agree"] == 1.0


def test_kl_guard_needs_an_absolute_tolerance_and_stops_on_kl():
    with pytest.raises(ValueError, match="`tolerance_metric` kl .* `tolerance_mode: absolute`"):
        ForgettingMonitorConfig(tolerance_metric="kl")
    cb = ForgettingMonitorCallback(tolerance=0.05, tolerance_mode="absolute", tolerance_metric="kl", action="stop")
    control = TrainerControl()
    s = TrainerState()
    for step, kl in ((0, 0.0), (2, 0.04), (4, 0.06)):
        s.global_step = step
        cb.on_evaluate(None, s, control, metrics={"eval_general_loss": 2.0, "eval_general_kl": kl})
        assert control.should_training_stop is (step == 4)
    assert cb.breach_step == 4
