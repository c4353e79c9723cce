"""Plan, then check the plan: a config written by the planner trains, records predicted vs measured at every
evaluation (metrics.json, the forgetting plot, the model card), and warns once when the run leaves the band."""

import json
import logging

import numpy as np
import pytest
import yaml

from hf_cpt.config import CPTConfig
from hf_cpt.dynamics import DynamicsLaw, LossLaw, PilotCurve
from hf_cpt.recipe.plan import (candidate_lrs, evaluation_steps, plan_from_pilots, plan_prediction, planned_config,
                                write_plan_config)
from hf_cpt.recipe.train import run_cpt

from ..conftest import tiny_run_dict

STEPS = 6
# a law whose losses sit near 2-3 nats: the tiny model (random weights, ~6 nats) is far outside its band
LAW = DynamicsLaw(LossLaw(2.0, 1.0, 0.5, 0.05, 0.3, 1.0, 0.2, 100.0),
                  LossLaw(1.5, 2.0, 0.5, 0.05, -0.8, 1.0, 0.2, 100.0),
                  momentum=0.9, lr_unit=1e-3, lr_before=0.0, domain_share=0.75)


@pytest.fixture(scope="module")
def plan():
    """A plan from three synthetic 6-step pilots (constant, cosine, wsd; replay 0.25) for a 6-step run."""
    pilots = []
    for kind in ("constant", "cosine", "wsd"):
        lrs = candidate_lrs(kind, STEPS, 1e-3)
        g, d = LAW.predict(lrs)
        pilots.append(PilotCurve(kind, kind, tuple(lrs), 0.75, tuple(range(STEPS + 1)), tuple(map(float, g)),
                                 tuple(map(float, d))))
    return plan_from_pilots(pilots, STEPS, tolerance=0.5, schedules=["cosine"], bootstrap=0)


def test_the_prediction_block_holds_the_plan_at_the_run_s_evaluations(plan):
    assert evaluation_steps(6, 3) == [0, 3, 6] and evaluation_steps(10, 4) == [0, 4, 8, 10]
    block = plan_prediction(plan, [0, 3, 6])
    assert block["steps"] == [0, 3, 6] and block["max_steps"] == STEPS and block["replay_ratio"] == 0.25
    for role in ("general", "domain"):
        rmse = getattr(plan.fit, f"rmse_{role}")
        assert block[role] == pytest.approx([plan.curves[role][s] for s in (0, 3, 6)])
        assert np.allclose(np.array(block[f"{role}_hi"]) - block[role], rmse)  # no bootstrap: the fit's RMSE
        assert np.allclose(np.array(block[role]) - block[f"{role}_lo"], rmse)
    with pytest.raises(ValueError, match=r"prediction steps must lie in \[0, 6\]"):
        plan_prediction(plan, [0, 12])


def test_a_planned_config_trains_records_predicted_vs_measured_and_warns_once(plan, tmp_path, tiny_model_dir,
                                                                              caplog):
    d = tiny_run_dict(tiny_model_dir, max_steps=2, eval_steps=3)
    d["monitor"]["kl"] = False  # what is checked is the loss; the KL to the base costs time here
    d["data"]["max_eval_blocks"] = 2
    base = CPTConfig.from_dict(d)
    written = write_plan_config(plan, base, tmp_path / "planned.yaml")
    cfg = CPTConfig.from_yaml(tmp_path / "planned.yaml")
    assert cfg == written and cfg == planned_config(plan, base)
    assert cfg.train.max_steps == STEPS and cfg.schedule.decay == "cosine" and cfg.data.replay_ratio == 0.25
    assert cfg.monitor.prediction.steps == [0, 3, 6]
    assert (tmp_path / "planned.yaml").read_text().startswith("# planned by `hf-cpt plan` from 3 pilots")
    with caplog.at_level(logging.WARNING, logger="hf_cpt"):  # the plan predicts the trained model: no merge
        assert planned_config(plan, base.override({"merge_base": {"alpha": 0.5}})).merge_base is None
    assert any("drops `merge_base` (alpha 0.5)" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_cpt"):
        result = run_cpt(cfg, output_dir=tmp_path / "out")
    # the prediction (2-3 nats) is deliberately wrong for the tiny model: one warning line, at the first evaluation
    lines = [r.getMessage() for r in caplog.records if "left its plan" in r.getMessage()]
    assert len(lines) == 1 and "general loss on 'general'" in lines[0] and "at step 0, above" in lines[0]
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    p = metrics["forgetting"]["prediction"]
    assert [e["step"] for e in p["evals"]] == [0, 3, 6]  # every evaluation
    for e in p["evals"]:
        for role in ("general", "domain"):
            assert e[f"{role}_lo"] <= e[f"{role}_predicted"] <= e[f"{role}_hi"]
            assert e[f"{role}_inside"] is False and e[f"{role}_measured"] > e[f"{role}_hi"]
    history = {r["step"]: r for r in metrics["eval_history"]}
    assert p["evals"][-1]["domain_measured"] == history[6]["domain_loss"]
    assert p["left_band"] and p["general_inside"] == 0 and p["general_checked"] == 3
    card = (result.output_dir / "README.md").read_text(encoding="utf-8")
    assert "### Predicted vs measured" in card and "general loss inside the predicted band at 0/3" in card
    assert "- plan check (`monitor.prediction`, hf-cpt plan from 3 pilots" in card
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["hf_cpt"]["forgetting"]["prediction"]["left_band"] is True
    assert (result.output_dir / "forgetting.png").stat().st_size > 10_000
    saved = CPTConfig.from_pretrained(result.output_dir)
    assert saved.monitor.prediction == cfg.monitor.prediction  # the recipe keeps what it was checked against


def test_the_cli_refuses_a_config_to_plan_without_where_to_write_it(tmp_path):
    from typer.testing import CliRunner

    from hf_cpt.cli.main import app

    result = CliRunner().invoke(app, ["plan", str(tmp_path), "--budget-steps", "8", "--config", "run.yaml"])
    assert result.exit_code == 2 and "`--config` goes with `--write-config`" in result.output


@pytest.mark.slow  # two pilots, a fit and the planned run (~30 s under load)
def test_plan_run_trains_pilots_plans_and_runs_the_checked_plan(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from hf_cpt.cli.main import app

    d = tiny_run_dict(tiny_model_dir)
    d["monitor"]["kl"] = False
    d["data"]["max_eval_blocks"] = 2
    d["train"]["eval_steps"] = 4
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(d))
    out = tmp_path / "planned"
    result = CliRunner().invoke(app, ["plan", "--run", "--config", str(tmp_path / "run.yaml"), "--budget-steps", "16",
                                      "--pilot-steps", "8", "--tolerance", "0.5", "--bootstrap", "0",
                                      "--schedules", "cosine", "-o", str(out), "--plot", str(tmp_path / "plan.png")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "planned.pilots").iterdir()) == ["pilot-constant-r0.25",
                                                                              "pilot-cosine-r0.25"]
    assert "fit on 2 pilots (constant, cosine; replay ratios 0.25)" in result.output
    assert "pilot cost: 16 updates, 100% of the planned run's 16 (1.02e+03 tokens)" in result.output
    assert f"Planned run in {out}: general loss inside the predicted band at" in result.output
    planned = CPTConfig.from_yaml(tmp_path / "planned.planned.yaml")
    assert planned.train.max_steps == 16 and planned.monitor.prediction.steps == [0, 4, 8, 12, 16]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["forgetting"]["prediction"]["evals"]] == [0, 4, 8, 12, 16]
