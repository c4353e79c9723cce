"""The plan check's pure core (`hf_cpt.prediction`) and its glue in the forgetting monitor: predicted vs measured at
every evaluation, and one warning when a measurement leaves the band."""

import logging

import pytest
from transformers import TrainerControl, TrainerState

from hf_cpt.callbacks.forgetting import ForgettingMonitorCallback, ForgettingMonitorConfig
from hf_cpt.config import CPTConfig
from hf_cpt.prediction import (PredictionConfig, compare_prediction, describe_departure, first_departure,
                               inside_band, predicted_loss)


def _prediction(**changes):
    block = dict(steps=[0, 4, 8], general=[2.0, 2.2, 2.1], general_lo=[1.9, 2.1, 2.0], general_hi=[2.1, 2.3, 2.2],
                 domain=[3.0, 2.6, 2.4], domain_lo=[2.9, 2.5, 2.3], domain_hi=[3.1, 2.7, 2.5])
    block.update(changes)
    return PredictionConfig(**block)


def test_predicted_loss_at_stored_steps_and_between_them_against_a_naive_reference():
    p = _prediction()
    assert predicted_loss(p, "general", 4) == (2.2, 2.1, 2.3)
    assert predicted_loss(p, "domain", 0) == (3.0, 2.9, 3.1)
    # step 6: halfway from 4 to 8 in every series (naive linear interpolation)
    for role, (a, b) in (("general", (4, 8)), ("domain", (4, 8))):
        got = predicted_loss(p, role, 6)
        i, j = p.steps.index(a), p.steps.index(b)
        want = tuple((getattr(p, k)[i] + getattr(p, k)[j]) / 2 for k in (role, f"{role}_lo", f"{role}_hi"))
        assert got == pytest.approx(want)
    assert predicted_loss(p, "general", 9) is None  # outside the stored steps: not predicted
    assert inside_band(2.0, 1.9, 2.1) and not inside_band(2.2, 1.9, 2.1) and not inside_band(float("nan"), 0, 9)
    with pytest.raises(ValueError, match="`role`"):
        predicted_loss(p, "medical", 0)


def test_compare_prediction_records_every_evaluation_and_the_first_departure():
    history = [{"step": 0, "general_loss": 2.0, "domain_loss": 3.05},
               {"step": 4, "general_loss": 2.25, "domain_loss": 2.9},  # domain above its band
               {"step": 8, "general_loss": 2.5, "domain_loss": 2.4},  # general above its band
               {"step": 12, "general_loss": 2.6}]  # beyond the prediction: not checked
    out = compare_prediction(history, _prediction(source="test"))
    assert [e["step"] for e in out["evals"]] == [0, 4, 8]
    assert [e["general_inside"] for e in out["evals"]] == [True, True, False]
    assert [e["domain_inside"] for e in out["evals"]] == [True, False, True]
    assert out["evals"][1] == {"step": 4, "general_measured": 2.25, "general_predicted": 2.2, "general_lo": 2.1,
                               "general_hi": 2.3, "general_inside": True, "domain_measured": 2.9,
                               "domain_predicted": 2.6, "domain_lo": 2.5, "domain_hi": 2.7, "domain_inside": False}
    assert (out["general_inside"], out["general_checked"], out["domain_inside"], out["domain_checked"]) == (2, 3, 2, 3)
    d = out["first_departure"]
    assert out["left_band"] and d == {"role": "domain", "set": "domain", "step": 4, "measured": 2.9,
                                      "predicted": 2.6, "lo": 2.5, "hi": 2.7}
    line = describe_departure(d)
    assert "\n" not in line and "measured 2.9000 at step 4, above the predicted band 2.5000-2.7000" in line
    inside = compare_prediction(history[:1], _prediction())
    assert not inside["left_band"] and first_departure(inside["evals"]) is None


@pytest.mark.parametrize("changes, match", [
    ({"steps": []}, "`steps` must be a non-empty list"),
    ({"steps": [0, 8, 4]}, "`steps` must increase"),
    ({"general": [2.0, 2.2]}, r"`general` must hold one loss per step \(3\)"),
    ({"domain_hi": [3.1, 2.5, 2.5]}, r"`domain_lo\[1\]` <= `domain\[1\]` <= `domain_hi\[1\]` does not hold"),
    ({"general_lo": [1.9, float("nan"), 2.0]}, r"`general_lo\[1\]` must be a finite number"),
    ({"replay_ratio": 1.5}, "`replay_ratio` must be"),
])
def test_prediction_config_refuses_bad_blocks_with_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        _prediction(**changes)


def test_a_prediction_made_for_another_run_is_refused_naming_the_setting():
    block = {"steps": [0, 4], "general": [2.0, 2.1], "general_lo": [1.9, 2.0], "general_hi": [2.1, 2.2],
             "domain": [3.0, 2.8], "domain_lo": [2.9, 2.7], "domain_hi": [3.1, 2.9], "replay_ratio": 0.25,
             "learning_rate": 1e-3, "max_steps": 4}
    ok = CPTConfig.from_dict({"train": {"max_steps": 4, "learning_rate": 1e-3}, "data": {"replay_ratio": 0.25},
                              "monitor": {"prediction": block}})
    assert ok.monitor.prediction == PredictionConfig(**block)
    assert CPTConfig.from_dict(ok.to_dict()) == ok  # round-trips through YAML data
    with pytest.raises(ValueError, match=r"made for `data.replay_ratio` 0.25, but the run has 0.5"):
        ok.override({"data.replay_ratio": 0.5})
    with pytest.raises(ValueError, match=r"made for `train.max_steps` 4, but the run has 8"):
        ok.override({"train.max_steps": 8})
    with pytest.raises(ValueError, match=r"`merge_base.ship` measures the merge at the end"):
        ok.override({"merge_base": {"alpha": 0.5}})
    with pytest.raises(ValueError, match=r"`monitor.prediction.general` must hold one loss per step"):
        CPTConfig.from_dict({"monitor": {"prediction": {**block, "general": [2.0]}}})


def _state(step):
    s = TrainerState()
    s.global_step, s.max_steps = step, 8
    return s


def _evaluate(cb, step, general, domain):
    # the Trainer evaluates a dict of sets one by one: one on_evaluate call per set
    cb.on_evaluate(None, _state(step), TrainerControl(), metrics={"eval_general_loss": general})
    cb.on_evaluate(None, _state(step), TrainerControl(), metrics={"eval_domain_loss": domain})


def test_the_monitor_warns_once_when_a_measurement_leaves_the_band_also_after_a_resume(caplog):
    cb = ForgettingMonitorCallback(ForgettingMonitorConfig(tolerance=1.0, prediction=_prediction()))
    with caplog.at_level(logging.WARNING, logger="hf_cpt"):
        _evaluate(cb, 0, 2.0, 3.0)
        assert "left its plan" not in caplog.text
        _evaluate(cb, 4, 2.5, 2.0)  # both sets outside at once: one line
        _evaluate(cb, 6, 2.5, 2.0)  # between stored steps: interpolated, outside again, no second line
        data = cb.state()
        resumed = type(cb)(**data["args"])  # what Trainer._load_callback_state does
        for k, v in data["attributes"].items():
            setattr(resumed, k, v)
        _evaluate(resumed, 8, 3.0, 1.0)
    lines = [r.getMessage() for r in caplog.records if "left its plan" in r.getMessage()]
    assert len(lines) == 1 and "general loss on 'general' measured 2.5000 at step 4, above" in lines[0]
    assert resumed.config.prediction == cb.config.prediction
    summary = resumed.summary()["prediction"]
    assert [e["step"] for e in summary["evals"]] == [0, 4, 6, 8]
    assert summary["general_inside"] == 1 and summary["general_checked"] == 4 and summary["left_band"]
