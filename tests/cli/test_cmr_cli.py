import json

import pytest
import yaml
from typer.testing import CliRunner

from hf_cpt.cli.main import app
from hf_cpt.config import CPTConfig
from hf_cpt.mixers.cmr import read_records, write_records

from ..conftest import tiny_run_dict
from ..mixers.test_cmr import synthetic

runner = CliRunner()


@pytest.mark.slow  # four pilot trainings (~24 s under load)
def test_pilot_runs_one_training_per_ratio_and_writes_records(tmp_path, tiny_model_dir):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_dict(tiny_model_dir, max_steps=6)))
    out = tmp_path / "records.csv"
    result = runner.invoke(app, ["cmr", "pilot", str(cfg), "-o", str(out), "--ratios", "0.5,0.75,1.0",
                                 "--budgets", "3"])
    assert result.exit_code == 0, result.output
    records = read_records(out)
    # per ratio: the step-0 baseline, then budgets at 2, 4, 6 updates of 2 blocks x 32 tokens
    assert sorted({r.ratio for r in records}) == [0.5, 0.75, 1.0]
    assert sorted({r.tokens for r in records}) == [0, 128, 256, 384]
    assert len(records) == 12
    base = [r.general_loss for r in records if r.tokens == 0]
    assert max(base) - min(base) < 1e-5  # the same pre-CPT model and held-out set for every pilot
    bad = runner.invoke(app, ["cmr", "pilot", str(cfg), "--ratios", "0.5,1.0", "--budgets", "3"])
    assert bad.exit_code == 2 and "`domain_ratios` needs >= 3 distinct domain shares" in bad.output
    bad = runner.invoke(app, ["cmr", "pilot", str(cfg), "--budgets", "4"])
    assert bad.exit_code == 2 and "multiple of `num_budgets`" in bad.output


def test_fit_prints_the_ratio_writes_the_plot_and_updates_a_config(tmp_path, tiny_model_dir):
    records = tmp_path / "records.csv"
    write_records(synthetic(), records)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_dict(tiny_model_dir)))
    result = runner.invoke(app, ["cmr", "fit", str(records), "--budget-tokens", "1e9", "--tolerance", "0.05",
                                 "--plot", str(tmp_path / "cmr.png"), "--bootstrap", "5", "--config", str(cfg),
                                 "--json", str(tmp_path / "cmr.json"),
                                 "--write-config", str(tmp_path / "planned.yaml")])
    assert result.exit_code == 0, result.output
    # power-law pilots: the surfaces win the leave-one-budget-out selection; every candidate is listed
    assert "estimator: surfaces (chosen by leave-one-budget-out" in result.output
    assert "lost: held-out" in result.output and "dynamics" in result.output and "dcpt" in result.output
    assert "CMR at 1e+09 tokens: domain share 0.15" in result.output and "90% interval" in result.output
    assert (tmp_path / "cmr.png").stat().st_size > 10_000
    planned = CPTConfig.from_yaml(tmp_path / "planned.yaml")
    assert abs(planned.data.replay_ratio - 0.85) < 0.02
    assert planned.data.cmr["estimator"] == "surfaces"
    saved = json.loads((tmp_path / "cmr.json").read_text())
    assert saved["selection"]["chosen"] == "surfaces" and saved["prediction"]["estimator"] == "surfaces"
    assert {c["name"] for c in saved["selection"]["candidates"]} >= {"surfaces", "dcpt", "dynamics", "saturating"}
    bad = runner.invoke(app, ["cmr", "fit", str(records), "--budget-tokens", "1e9", "--tolerance", "0"])
    assert bad.exit_code == 2 and "`tolerance` must be > 0" in bad.output
