"""`hf-cpt plan` on real pilot runs of a tiny model: the files `run_cpt` writes round-trip into the law's fit."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from hf_cpt.cli.main import app
from hf_cpt.config import CPTConfig
from hf_cpt.recipe.plan import candidate_lrs, read_pilot, run_learning_rates, schedule_name
from hf_cpt.recipe.train import run_cpt

from ..conftest import tiny_run_dict

runner = CliRunner()
STEPS = 10


@pytest.fixture(scope="module")
def pilots(tmp_path_factory, tiny_model_dir):
    """Four 10-step pilots evaluated every step: constant and cosine at replay 0.25 and 0.5."""
    root = tmp_path_factory.mktemp("pilots")
    out = {}
    for name, sched, replay in (("const25", "constant", 0.25), ("cos25", "cosine", 0.25),
                                ("const50", "constant", 0.5), ("cos50", "cosine", 0.5)):
        d = tiny_run_dict(tiny_model_dir, max_steps=STEPS, eval_steps=1, lr_scheduler_type=sched,
                          learning_rate=3e-3)
        d["data"]["replay_ratio"] = replay
        d["data"]["max_eval_blocks"] = 2
        cfg = CPTConfig.from_dict(d)
        out[name] = run_cpt(cfg, output_dir=root / name).output_dir
    return out


@pytest.mark.slow  # the module's pilot runs (~60 s under load)
def test_read_pilot_gets_the_lrs_the_trainer_used_and_both_losses(pilots):
    pilot, tokens = read_pilot(pilots["cos25"])
    assert pilot.schedule == "cosine" and pilot.domain_share == 0.75 and tokens == 2 * 32
    assert pilot.steps == tuple(range(STEPS + 1)) and len(pilot.lrs) == STEPS
    metrics = json.loads((pilots["cos25"] / "metrics.json").read_text())
    logged = {r["step"]: r["learning_rate"] for r in metrics["log_history"] if "learning_rate" in r}
    # the Trainer logs, at step s, the LR it used for update s (1-based): lrs[s - 1]
    for step, lr in logged.items():
        assert lr == pytest.approx(pilot.lrs[step - 1], rel=1e-6), step
    assert pilot.lrs[0] == pytest.approx(3e-3) and pilot.lrs[-1] < pilot.lrs[0] / 10
    assert pilot.general[0] == pytest.approx(metrics["eval_history"][0]["general_loss"])


@pytest.mark.slow  # the module's pilot runs and a fit
def test_plan_round_trips_real_runs(pilots, tmp_path):
    result = runner.invoke(app, ["plan", *map(str, pilots.values()), "--budget-steps", "20", "--tolerance", "0.5",
                                 "--bootstrap", "4", "--plot", str(tmp_path / "plan.png"), "--json",
                                 str(tmp_path / "plan.json"), "--write-config", str(tmp_path / "planned.yaml")])
    assert result.exit_code == 0, result.output
    assert "fit on 4 pilots (constant, cosine; replay ratios 0.5, 0.25)" in result.output
    assert "Plan for 20 steps (1.28e+03 tokens)" in result.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    rec = plan["recommended"]
    assert rec["schedule"] in ("constant", "cosine", "wsd") and 0.25 <= rec["replay_ratio"] <= 0.5
    assert rec["general_end"] <= plan["general_bound"] and len(plan["curves"]["general"]) == 21
    # every candidate of the default grid: 3 schedules x the pilots' peak LR x replay 0.25..0.5 in 0.05 steps
    assert len(plan["candidates"]) == 3 * 1 * 6
    # the band's top never sits below the point prediction it is reported with; feasibility reads the top
    for c in plan["candidates"]:
        assert c["general_hi"] >= c["general_end"] and c["domain_hi"] >= c["domain_end"]
        assert c["feasible"] == (c["general_hi"] <= plan["general_bound"])
    curves = plan["curves"]
    if "general_hi" in curves:
        assert all(lo <= p <= hi for lo, p, hi in zip(curves["general_lo"], curves["general"], curves["general_hi"]))
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    # the planned run's config: the recommendation, and its prediction at the run's evaluations (every step)
    assert f"Wrote {tmp_path / 'planned.yaml'}" in result.output
    planned = CPTConfig.from_yaml(tmp_path / "planned.yaml")
    assert planned.train.max_steps == 20 and planned.data.replay_ratio == pytest.approx(rec["replay_ratio"])
    assert planned.train.learning_rate == pytest.approx(rec["peak_lr"]) and planned.output_dir is None
    pred = planned.monitor.prediction
    assert pred.steps == list(range(21)) and pred.general == pytest.approx(curves["general"])
    assert all(lo <= p <= hi for lo, p, hi in zip(pred.domain_lo, pred.domain, pred.domain_hi))
    # the fitted curves go through the measured points (tiny noisy runs: within a loose margin)
    assert plan["fit"]["rmse_general"] < 0.1 and plan["fit"]["rmse_domain"] < 0.1


@pytest.mark.slow  # the module's pilot runs
def test_plan_refuses_bad_pilots_with_one_line(pilots, tmp_path):
    one = runner.invoke(app, ["plan", str(pilots["const25"]), str(pilots["const50"]), "--budget-steps", "20"])
    assert one.exit_code == 2 and "at replay ratio 0.5 use one LR schedule only (constant)" in one.output
    short = runner.invoke(app, ["plan", *map(str, pilots.values()), "--budget-steps", "6"])
    assert short.exit_code == 2 and "is below the pilots' longest run (10 steps)" in short.output
    broken = tmp_path / "nogeneral"
    shutil.copytree(pilots["cos25"], broken)
    metrics = json.loads((broken / "metrics.json").read_text())
    for row in metrics["eval_history"]:
        row.pop("general_loss", None)
    (broken / "metrics.json").write_text(json.dumps(metrics))
    missing = runner.invoke(app, ["plan", str(pilots["const25"]), str(broken), "--budget-steps", "20"])
    assert missing.exit_code == 2 and "has no `general_loss` and `domain_loss` together" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    outside = runner.invoke(app, ["plan", *map(str, pilots.values()), "--budget-steps", "20",
                                  "--replay-ratios", "0.9"])
    assert outside.exit_code == 2 and "outside the pilots' replay ratios" in outside.output
    nothing = runner.invoke(app, ["plan", str(tmp_path / "nope"), "--budget-steps", "20"])
    assert nothing.exit_code == 2 and "does not exist" in nothing.output


def test_candidate_lrs_are_the_lrs_a_schedule_block_trains_with():
    """No pilot runs: the planner's candidate curves equal what a run with the same `schedule:` block uses."""
    blocks = {"constant": {"schedule": "constant", "warmup_steps": 2},
              "cosine": {"schedule": "rewarm", "warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.1}}
    for name, block in blocks.items():
        cfg = CPTConfig.from_dict({"train": {"max_steps": 10, "learning_rate": 1e-3}, "schedule": block})
        assert schedule_name(cfg) == name
        assert run_learning_rates(cfg) == pytest.approx(candidate_lrs(name, 10, 1e-3, warmup_steps=2))
    plain = CPTConfig.from_dict({"train": {"max_steps": 4, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
                                           "warmup_steps": 0}})
    assert schedule_name(plain) == "constant" and run_learning_rates(plain) == pytest.approx([1e-3] * 4)
    wsd = candidate_lrs("wsd", 10, 1e-3, decay_fraction=0.2)
    assert wsd[:8] == pytest.approx([1e-3] * 8) and wsd[-1] < 1e-3  # stable, then the last 20 % decay
    with pytest.raises(ValueError, match="`schedules` must be among"):
        candidate_lrs("step", 10, 1e-3)
