"""Downstream evaluation through the recipe: `downstream:` in a run reaches metrics.json, the plot and the model
card; `hf-cpt eval` prints the side-by-side table whose columns equal the scores logged during training."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from hf_cpt.cli.main import app
from hf_cpt.config import CPTConfig
from hf_cpt.recipe import compare_models, run_cpt
from hf_cpt.recipe.evaluate import EvalComparison, comparison_rows

from ..conftest import tiny_run_dict

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.timeout(600)
runner = CliRunner()
TASKS = ["hf_cpt_python_docs_mc", "hf_cpt_kjv_mc"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    cfg = tiny_run_dict(tiny_model_dir, max_steps=2, eval_steps=2)
    cfg["monitor"]["kl"] = False
    cfg["downstream"] = {"tasks": TASKS, "limit": 5, "batch_size": 5, "tolerance_metric": "hf_cpt_kjv_mc/acc",
                         "tolerance": 1.0}
    out = tmp_path_factory.mktemp("downstream") / "run"
    run_cpt(CPTConfig.from_dict(cfg), output_dir=out)
    return out


@pytest.mark.slow  # the module's run: training with lm-eval
def test_run_records_downstream_scores_in_metrics_plot_and_card(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    d = m["downstream"]
    assert [r["step"] for r in d["history"]] == [0, 2] and d["tasks"] == TASKS and d["limit"] == 5
    keys = {f"{t}/{x}" for t in TASKS for x in ("acc", "acc_norm")}
    assert set(d["start"]) == set(d["end"]) == keys and d["tolerance_breached"] is False
    logged = [r for r in m["log_history"] if "eval_downstream/hf_cpt_kjv_mc/acc" in r]
    assert [r["step"] for r in logged] == [0, 2]
    assert logged[-1]["eval_downstream/hf_cpt_kjv_mc/acc"] == d["end"]["hf_cpt_kjv_mc/acc"]
    card = ModelCard.load(run_dir / "README.md")
    results = card.data.eval_results
    assert {(r.dataset_name, r.metric_type) for r in results} == {tuple(k.split("/")) for k in keys}
    assert all(r.metric_value == d["end"][f"{r.dataset_name}/{r.metric_type}"] for r in results)
    before_after = card.data.to_dict()["hf_cpt"]["downstream"]["hf_cpt_python_docs_mc/acc"]
    assert before_after["before"] == d["start"]["hf_cpt_python_docs_mc/acc"]
    assert "## Downstream evaluation" in card.text and "| hf_cpt_kjv_mc/acc |" in card.text
    assert (run_dir / "forgetting.png").stat().st_size > 0


@pytest.mark.slow  # lm-eval on two models
def test_cli_eval_prints_base_vs_adapted_equal_to_the_training_logs(run_dir, tiny_model_dir):
    # defaults from the run: its base model, tasks, limit and batch size
    result = runner.invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"base: {tiny_model_dir}" in result.output
    header = next(line for line in result.output.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "metric", "base", "adapted", "Δ"]
    d = json.loads((run_dir / "metrics.json").read_text())["downstream"]
    table = json.loads((run_dir / "downstream_eval.json").read_text())
    assert table["settings"]["limit"] == 5 and len(table["rows"]) == 4
    for row in table["rows"]:
        key = f"{row['task']}/{row['metric']}"
        assert row["base"] == d["start"][key] and row["adapted"] == d["end"][key]
        assert row["delta"] == pytest.approx(row["adapted"] - row["base"])
        assert row["adapted_stderr"] is not None  # closed-form stderr of a mean metric
        assert f"{row['task']}  " in result.output


@pytest.mark.slow  # lm-eval task indexing
def test_cli_eval_bad_input_is_one_line(run_dir, tiny_model_dir, tmp_path):
    unknown = runner.invoke(app, ["eval", str(run_dir), "--tasks", "hf_cpt_kjv"])
    assert unknown.exit_code == 2
    assert "unknown lm-eval task 'hf_cpt_kjv'; close names: hf_cpt_kjv_mc" in unknown.output
    assert len(unknown.output.strip().splitlines()) == 1
    no_tasks = runner.invoke(app, ["eval", str(tiny_model_dir)])
    assert no_tasks.exit_code == 2 and "pass lm-eval task names" in no_tasks.output
    missing = runner.invoke(app, ["eval", str(run_dir), "--include-path", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "`include_path`" in missing.output and "is not a directory" in missing.output
    with pytest.raises(ValueError, match="is a directory"):
        compare_models(str(run_dir), output=tmp_path)


def test_downstream_in_a_config_is_checked_before_the_model_loads(tmp_path, tiny_model_dir):
    cfg = tiny_run_dict(tiny_model_dir)
    cfg["downstream"] = {"tasks": ["hf_cpt_kjv_mc"], "metrics": ["f1"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = runner.invoke(app, ["train", str(path), "-o", str(tmp_path / "out")])
    assert out.exit_code == 2 and "`metrics`: no task in ['hf_cpt_kjv_mc'] reports 'f1'" in out.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="`downstream`: lm-eval scores causal language models"):
        CPTConfig.from_dict({**tiny_run_dict(tiny_model_dir), "objective": "mlm",
                             "downstream": {"tasks": ["hf_cpt_kjv_mc"]}})


def test_comparison_rows_and_table_without_running_lm_eval():
    base = {"t/acc": 0.5, "t/acc_stderr": 0.1, "u/f1": 0.2}
    adapted = {"t/acc": 0.75, "t/acc_stderr": 0.05}
    rows = comparison_rows(base, adapted)
    assert [(r["task"], r["metric"]) for r in rows] == [("t", "acc"), ("u", "f1")]
    assert rows[0]["delta"] == 0.25 and rows[0]["base_stderr"] == 0.1 and rows[0]["adapted_stderr"] == 0.05
    assert rows[1]["adapted"] is None and rows[1]["delta"] is None
    table = EvalComparison("adapted", "base", {}, rows).table().splitlines()
    assert table[0].split() == ["task", "metric", "base", "adapted", "Δ"]
    assert "0.5000 ± 0.1000" in table[2] and "0.7500 ± 0.0500" in table[2] and "+0.2500" in table[2]
    assert table[3].split()[-2:] == ["n/a", "n/a"]
