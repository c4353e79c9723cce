import math

import pytest
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments, default_data_collator

from hf_cpt.callbacks.forgetting import (
    ForgettingMonitorCallback,
    ForgettingMonitorConfig,
    compute_forgetting,
    exceeds_tolerance,
)
from hf_cpt.config import DataConfig
from hf_cpt.recipe.data import build_eval_sets, build_train_set
from hf_cpt.testing import make_tiny_llama


def test_compute_forgetting_against_naive_reference():
    history = [
        {"step": 0, "general_loss": 2.0, "domain_loss": 4.0},
        {"step": 5, "general_loss": 2.2},
        {"step": 10, "general_loss": 2.5, "domain_loss": 3.0},
    ]
    out = compute_forgetting(history)
    assert out["general_loss_start"] == 2.0 and out["general_loss_end"] == 2.5
    assert out["general_delta"] == pytest.approx(0.5) and out["general_delta_rel"] == pytest.approx(0.25)
    assert out["domain_delta"] == pytest.approx(-1.0) and out["domain_delta_rel"] == pytest.approx(-0.25)
    empty = compute_forgetting([])
    assert empty["general_delta"] is None and empty["domain_loss_end"] is None


@pytest.mark.parametrize(
    "baseline, current, tol, mode, expected",
    [(2.0, 2.09, 0.05, "relative", False), (2.0, 2.11, 0.05, "relative", True),
     (2.0, 2.09, 0.1, "absolute", False), (2.0, 2.11, 0.1, "absolute", True), (2.0, 1.0, 0.0, "relative", False)],
)
def test_exceeds_tolerance(baseline, current, tol, mode, expected):
    assert exceeds_tolerance(baseline, current, tol, mode) is expected


def _state(step, max_steps=10):
    s = TrainerState()
    s.global_step, s.max_steps = step, max_steps
    return s


@pytest.mark.parametrize("action, stops", [("stop", True), ("warn", False), ("none", False)])
def test_breach_stops_or_warns(action, stops, caplog):
    cb = ForgettingMonitorCallback(tolerance=0.1, action=action)
    control = TrainerControl()
    cb.on_evaluate(None, _state(0), control, metrics={"eval_general_loss": 2.0})
    cb.on_evaluate(None, _state(0), control, metrics={"eval_domain_loss": 3.0})
    cb.on_evaluate(None, _state(4), control, metrics={"eval_general_loss": 2.1, "eval_domain_loss": 2.8})
    assert not control.should_training_stop and cb.breach_step is None
    with caplog.at_level("WARNING"):
        cb.on_evaluate(None, _state(8), control, metrics={"eval_general_loss": 2.5})
    assert control.should_training_stop is stops
    assert cb.breach_step == 8
    assert ("rose from 2.0000 to 2.5000" in caplog.text) is (action != "none")
    assert cb.history == [
        {"step": 0, "general_loss": 2.0, "domain_loss": 3.0},
        {"step": 4, "general_loss": 2.1, "domain_loss": 2.8},
        {"step": 8, "general_loss": 2.5},
    ]
    assert cb.summary()["tolerance_breached"] is True


def test_state_round_trip_rebuilds_an_equal_callback():
    cb = ForgettingMonitorCallback(ForgettingMonitorConfig(tolerance=0.3, action="stop", domain="medical"))
    cb.on_evaluate(None, _state(0), TrainerControl(), metrics={"eval_general_loss": 1.0, "eval_medical_loss": 2.0})
    cb.breach_step = 7
    data = cb.state()
    # what Trainer._load_callback_state does on resume
    new = type(cb)(**data["args"])
    for k, v in data["attributes"].items():
        setattr(new, k, v)
    assert new.config == cb.config and new.history == cb.history and new.breach_step == 7


def test_config_validation():
    with pytest.raises(ValueError, match="`tolerance_mode`"):
        ForgettingMonitorConfig(tolerance_mode="percent")
    with pytest.raises(ValueError, match="must differ"):
        ForgettingMonitorConfig(general="x", domain="x")


def _trainer(tmp_path, tiny_tokenizer, monitor, max_steps=5, eval_on_start=True, eval_strategy="steps", lr=1e-3):
    data = DataConfig(block_size=32, max_eval_blocks=4)
    train = build_train_set(data, tiny_tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=lr,
        eval_strategy=eval_strategy, eval_steps=2, eval_on_start=eval_on_start, report_to="none",
        save_strategy="no", logging_steps=1, use_cpu=True, lr_scheduler_type="constant",
    )
    return Trainer(model=make_tiny_llama(len(tiny_tokenizer)), args=args, train_dataset=train,
                   eval_dataset=build_eval_sets(data, tiny_tokenizer), data_collator=default_data_collator,
                   callbacks=[monitor])


@pytest.mark.slow  # trains a tiny model for several steps with evaluations (>5 s under load)
def test_trainer_records_step_zero_every_eval_step_and_the_end(tmp_path, tiny_tokenizer):
    monitor = ForgettingMonitorCallback(tolerance=100.0)
    trainer = _trainer(tmp_path, tiny_tokenizer, monitor, max_steps=5)
    trainer.train()
    assert [r["step"] for r in monitor.history] == [0, 2, 4, 5]  # 5 is not an eval step: evaluated at the end
    assert all(set(r) == {"step", "general_loss", "domain_loss"} for r in monitor.history)
    # the losses went through the Trainer's own logging, so every integration saw them
    logged = [h for h in trainer.state.log_history if "eval_general_loss" in h]
    assert len(logged) == 4
    assert math.isclose(logged[0]["eval_general_loss"], monitor.history[0]["general_loss"])
    # training on the mix lowers the domain loss of a random model
    assert monitor.history[-1]["domain_loss"] < monitor.history[0]["domain_loss"]


@pytest.mark.slow  # trains a tiny model for several steps with evaluations (>5 s under load)
def test_trainer_stops_when_general_loss_rises(tmp_path, tiny_tokenizer):
    # a huge learning rate wrecks a freshly initialised model: the general loss rises past 0 tolerance
    monitor = ForgettingMonitorCallback(tolerance=0.0, action="stop")
    trainer = _trainer(tmp_path, tiny_tokenizer, monitor, max_steps=20, lr=5.0)
    trainer.train()
    assert monitor.breach_step is not None
    assert trainer.state.global_step == monitor.breach_step < 20


def test_trainer_without_evaluation_is_a_clear_error(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="eval_on_start=True"):
        _trainer(tmp_path, tiny_tokenizer, ForgettingMonitorCallback(), eval_on_start=False).train()
    with pytest.raises(ValueError, match="eval_strategy='steps'"):
        _trainer(tmp_path, tiny_tokenizer, ForgettingMonitorCallback(), eval_strategy="no").train()


def test_the_guard_names_its_set_metric_and_bound():
    """The summary, and the one sentence the CLI, the card and the plot legend take from it, say which set and
    which number the tolerance applies to (a KJV loss that falls because the KJV is replayed must not read as
    'not breached' for the model's general knowledge)."""
    from hf_cpt.monitoring import describe_guard

    cb = ForgettingMonitorCallback(ForgettingMonitorConfig(general="general_self", tolerance_metric="kl",
                                                           tolerance_mode="absolute", tolerance=0.2, action="none"))
    state, control = TrainerState(), TrainerControl()
    for step, kl in ((0, 0.0), (10, 0.15), (20, 0.25)):
        record = {"step": step, "general_self_loss": 3.4, "general_self_kl": kl, "domain_loss": 3.0}
        cb.history.append(record)
        cb._check(0, record, state, control)
    (s,) = cb.summary()["guards"]
    assert (s["guarded_set"], s["tolerance_metric"], s["tolerance_bound"], s["breach_step"]) == ("general_self", "kl",
                                                                                                 0.2, 20)
    assert describe_guard(s) == ("KL to the base on `general_self` <= 0.2000 nats (absolute tolerance 0.2): "
                                 "breached, first at step 20")
    loss = ForgettingMonitorCallback(ForgettingMonitorConfig(tolerance=0.1))
    loss.history.append({"step": 0, "general_loss": 3.0, "domain_loss": 3.0})
    assert describe_guard(loss.summary()["guards"][0]) == ("held-out loss on `general` <= 3.3000 nats/token "
                                                           "(relative tolerance 0.1): not breached")


def test_several_guards_each_with_its_bound_action_and_breach(caplog):
    """KL <= 0.2 on general_self and loss <= +0.1 nats on general: each guard checks its own set once per
    evaluation, breaches on its own, and only the one that says `stop` stops training."""
    from hf_cpt.monitoring import describe_guards

    cfg = ForgettingMonitorConfig(general="general_self", action="warn", guards=[
        {"set": "general_self", "metric": "kl", "tolerance": 0.2},
        {"set": "general", "metric": "loss", "tolerance": 0.1, "mode": "absolute", "action": "stop"}])
    assert cfg.guards[0].mode == "absolute" and cfg.tolerance is None and cfg.tolerance_metric is None
    cb, control = ForgettingMonitorCallback(cfg), TrainerControl()
    with caplog.at_level("WARNING"):
        for step, kl, loss in ((0, 0.0, 3.0), (10, 0.3, 3.05), (20, 0.35, 3.2)):
            # the Trainer evaluates a dict of sets one by one: one on_evaluate call per set
            cb.on_evaluate(None, _state(step, 30), control, metrics={"eval_general_self_loss": 3.4,
                                                                     "eval_general_self_kl": kl})
            cb.on_evaluate(None, _state(step, 30), control, metrics={"eval_general_loss": loss})
            cb.on_evaluate(None, _state(step, 30), control, metrics={"eval_domain_loss": 3.0})
            assert control.should_training_stop is (step == 20)
    kl_warnings = [r for r in caplog.records if "'general_self'" in r.getMessage()]
    assert len(kl_warnings) == 2  # steps 10 and 20, once each
    kl_guard, loss_guard = cb.summary()["guards"]
    assert (kl_guard["breach_step"], kl_guard["action"], loss_guard["breach_step"], loss_guard["action"]) == \
        (10, "warn", 20, "stop")
    assert loss_guard["tolerance_bound"] == pytest.approx(3.1) and cb.summary()["breach_step"] == 10
    assert describe_guards(cb.summary()) == (
        "KL to the base on `general_self` <= 0.2000 nats (absolute tolerance 0.2): breached, first at step 10; "
        "held-out loss on `general` <= 3.1000 nats/token (absolute tolerance 0.1): breached, first at step 20")
    # resumable: the per-guard breaches come back with the checkpoint; an old checkpoint's single breach_step too
    data = cb.state()
    new = type(cb)(**data["args"])
    for k, v in data["attributes"].items():
        setattr(new, k, v)
    assert new.config == cfg and new.breach_steps == [10, 20]


@pytest.mark.parametrize("monitor, match", [
    ({"guards": [{"set": "general", "metric": "kl", "tolerance": 0.2, "mode": "relative"}]},
     "`monitor.guards[0].mode` is relative but `monitor.guards[0].metric` kl"),
    ({"guards": [{"set": "general", "metric": "accuracy"}]}, "`monitor.guards[0].metric`"),
    ({"guards": [{"set": "general", "tolerance": -1}]}, "`monitor.guards[0].tolerance`"),
    ({"guards": [{"set": "general", "bound": 1}]}, "unknown field `monitor.guards[0].bound`"),
    ({"guards": [{"set": "general"}, {"set": "general"}]}, "`monitor.guards[1]` repeats the guard on loss"),
    ({"tolerance": 0.3, "guards": [{"set": "general"}]}, "`monitor.tolerance` is set next to `monitor.guards`, which replace it"),
    ({"kl": False, "guards": [{"set": "general", "metric": "kl"}]}, "`monitor.guards[0]` guards the KL to the base, "
                                                                    "which this run does not measure"),
    ({"guards": [{"set": "domain", "metric": "kl"}]}, "measured on the general sets only"),
])
def test_guard_config_errors_name_the_field(monitor, match):
    from hf_cpt.config import CPTConfig

    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")):
        CPTConfig.from_dict({"monitor": monitor})


def test_a_guard_on_a_set_the_run_does_not_evaluate_is_refused():
    from hf_cpt.config import CPTConfig

    cfg = CPTConfig.from_dict({"data": {"general": {"train": "a.jsonl", "eval": "b.jsonl"},
                                        "domain": {"train": "c.jsonl", "eval": "d.jsonl"}},
                               "monitor": {"guards": [{"set": "general"}, {"set": "general_self", "metric": "kl"}]}})
    with pytest.raises(ValueError, match=r"`monitor.guards\[1\].set` is 'general_self', which is not a held-out "
                                         r"set of this run \(sets: \['general', 'domain'\]\)"):
        cfg.check_held_out_sets()


def test_the_shorthand_is_one_guard_and_follows_general():
    """The single-guard spelling of earlier versions still works: a one-entry list on `general` (which an
    override of `monitor.general` moves), and its saved recipe reads back the same."""
    from hf_cpt.config import CPTConfig

    cfg = CPTConfig.from_dict({"monitor": {"general": "general_self", "tolerance_metric": "kl",
                                           "tolerance_mode": "absolute", "tolerance": 0.2}})
    (guard,) = cfg.monitor.active_guards
    assert (guard.set, guard.metric, guard.tolerance, guard.mode) == ("general_self", "kl", 0.2, "absolute")
    assert CPTConfig.from_dict(cfg.to_dict()) == cfg
    listed = CPTConfig.from_dict({"monitor": {"guards": [{"set": "general_self", "metric": "kl", "tolerance": 0.2}]}})
    assert listed.monitor.active_guards == [guard] and CPTConfig.from_dict(listed.to_dict()) == listed
    assert listed.override({"monitor.action": "stop"}).monitor.guards == [guard]
