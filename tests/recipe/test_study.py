"""`hf-cpt study`: defences x seeds on any config, the Pareto front and the verdict."""

import json

import pytest
import yaml

from hf_cpt.recipe.study import check_defences, summarise, verdicts
from tests.conftest import invoke_like_main, tiny_run_dict


def _row(defence, seed, gain, kl, general=0.0, config="docs"):
    return {"config": config, "defence": defence, "seed": seed, "domain_gain": gain, "kl": kl,
            "general_delta": general}


def test_the_summary_marks_the_front_and_the_verdict_says_met_or_missed_by_how_much():
    rows = [_row("naive", 0, 1.0, 0.10), _row("naive", 1, 1.2, 0.12),
            _row("rewarm", 0, 1.0, 0.06), _row("rewarm", 1, 1.1, 0.04),     # 55 % less KL at 95 % gain: on front
            _row("lora", 0, 0.2, 0.05), _row("lora", 1, 0.2, 0.05),         # dominated by rewarm
            _row("merge 0.5", 0, 0.6, 0.01), _row("merge 0.5", 1, 0.6, 0.01)]
    (summary,) = summarise(rows).values()
    by = {s["defence"]: s for s in summary}
    assert by["rewarm"]["kl"] == pytest.approx(0.05) and by["rewarm"]["kl_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert by["rewarm"]["kl_reduction"] == pytest.approx(1 - 0.05 / 0.11)
    assert by["rewarm"]["gain_kept"] == pytest.approx(1.05 / 1.1)
    assert [s["defence"] for s in summary if s["front_kl"]] == ["naive", "rewarm", "merge 0.5"]
    (line,) = verdicts(summarise(rows))
    assert "goal MET: rewarm cuts KL to base by 55%" in line and "keeping 95%" in line
    (line,) = verdicts(summarise(rows), reduction=0.6)
    assert "goal MISSED" in line and "short by 5%" in line


def test_unknown_defences_are_refused_and_naive_always_runs_first():
    assert check_defences(["merge", "rewarm"]) == ["naive", "merge", "rewarm"]
    # a trained defence merged with its base: the training run it needs is added once
    assert check_defences(["merge:distill", "rewarm"]) == ["naive", "merge:distill", "rewarm", "distill"]
    assert check_defences(["distill", "merge:distill"]) == ["naive", "distill", "merge:distill"]
    with pytest.raises(ValueError, match=r"`defences`: unknown \['ewc'\]"):
        check_defences(["ewc"])
    for bad in ("merge:merge", "merge:ewc", "merge:"):
        with pytest.raises(ValueError, match="merge:DEFENCE"):
            check_defences([bad])


@pytest.mark.slow  # two tiny runs and two merge sweeps (~30 s under load)
def test_the_cli_runs_a_study_on_any_config(tiny_model_dir, tmp_path):
    run = tiny_run_dict(tiny_model_dir, max_steps=2, eval_steps=2, learning_rate=1e-2)
    run["data"] = {**run["data"], "general": None, "replay_ratio": 0.0, "eval_sets": {"bible": "embedded:kjv/validation"}}
    run["monitor"] = {**run["monitor"], "general": "bible"}
    (tmp_path / "docs.yaml").write_text(yaml.safe_dump(run))
    code, out = invoke_like_main(["study", str(tmp_path / "docs.yaml"), "--out", str(tmp_path / "s"),
                                  "--defences", "average,merge,merge:average", "--seeds", "0"])
    assert code == 0, out
    saved = json.loads((tmp_path / "s" / "study.json").read_text())
    (line,) = saved["verdict"]
    assert line.startswith("docs: front (domain gain vs KL) ") and "goal M" in line
    assert {r["defence"] for r in saved["rows"]} == {"naive", "average", *[f"{m} {a}" for m in ("merge",
                                                     "average+merge") for a in (0.25, 0.5, 0.75, 0.9)]}
    assert (tmp_path / "s" / "docs" / "merge-average" / "seed0" / "merge_sweep.json").is_file()
    assert (tmp_path / "s" / "study.png").is_file()
