"""Named held-out sets (`data.eval_sets`): any number, general or domain, each labelled by its name everywhere."""

import json

import pytest

from hf_cpt.config import CPTConfig, EvalSetConfig
from tests.conftest import tiny_run_dict

KJV, DOCS = "embedded:kjv/validation", "embedded:python-docs/validation"


def _named(**data) -> dict:
    return {"data": {"general": None, "replay_ratio": 0.0, **data}}


def test_short_and_long_forms_and_the_order_of_sets():
    cfg = CPTConfig.from_dict({**_named(eval_sets={"bible": KJV, "docs2": {"path": DOCS, "kind": "domain"},
                                                   "web": {"path": KJV, "text_field": "text"}}),
                               "monitor": {"general": "bible"}})
    assert cfg.data.eval_sets["bible"] == EvalSetConfig(KJV)  # the short form is a general set
    assert cfg.data.held_out_kinds() == {"bible": "general", "web": "general", "domain": "domain",
                                         "docs2": "domain"}
    assert cfg.general_sets() == ["bible", "web"]
    cfg.check_held_out_sets()  # no general training source, nothing replayed: valid
    again = CPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # YAML round trip
    assert again.data.eval_sets == cfg.data.eval_sets
    # the built-in sets fold into the same mechanism
    default = CPTConfig()
    assert default.data.held_out_kinds() == {"general": "general", "domain": "domain"}
    assert default.data.held_out_files()["general"][1] == "data.general.eval"


@pytest.mark.parametrize("sets, error", [
    ({"general": KJV}, r"`data.eval_sets.general`: 'general' is taken"),
    ({"avg_x": KJV}, r"`data.eval_sets.avg_x`: 'avg_x' is taken"),
    ({"a.b": KJV}, r"`data.eval_sets`: the set name 'a.b' must start with a letter"),
    ({"w": {"path": KJV, "kind": "upstream"}}, r"`data.eval_sets.w.kind` must be one of general, domain"),
    ({"w": 3}, r"`data.eval_sets.w` must be a path or a mapping"),
    ({"w": "self"}, r"`data.eval_sets.w.path`: `self` text is the `general_self` set"),
])
def test_bad_sets_are_refused_naming_the_field(sets, error):
    with pytest.raises(ValueError, match=error):
        CPTConfig.from_dict(_named(eval_sets=sets))


def test_the_monitor_points_at_sets_of_its_kind():
    with pytest.raises(ValueError, match=r"set `monitor.general` to one of \['bible'\]"):
        CPTConfig.from_dict(_named(eval_sets={"bible": KJV})).check_held_out_sets()
    with pytest.raises(ValueError, match=r"`monitor.general` is 'docs2', a domain set"):
        CPTConfig.from_dict({**_named(eval_sets={"docs2": {"path": DOCS, "kind": "domain"}}),
                             "monitor": {"general": "docs2"}}).check_held_out_sets()


def test_a_missing_file_is_named_before_training(tmp_path):
    from hf_cpt.recipe.data import check_data_paths

    cfg = CPTConfig.from_dict(_named(eval_sets={"web": str(tmp_path / "nope.jsonl")}))
    with pytest.raises(FileNotFoundError, match=r"`data.eval_sets.web.path`"):
        check_data_paths(cfg.data)


def test_a_run_without_a_general_source_evaluates_and_labels_every_named_set(tiny_model_dir, tmp_path):
    from hf_cpt.recipe import run_cpt

    run = tiny_run_dict(tiny_model_dir, max_steps=2, eval_steps=2)
    run["data"] = {**run["data"], "general": None, "replay_ratio": 0.0,
                   "eval_sets": {"bible": KJV, "bible2": {"path": KJV}, "docs2": {"path": DOCS, "kind": "domain"}}}
    run["monitor"] = {**run["monitor"], "general": "bible"}
    result = run_cpt(CPTConfig.from_dict(run), output_dir=tmp_path / "out")
    f = result.metrics["forgetting"]
    for name in ("bible", "bible2"):  # KL to the base on every general set
        assert f[f"{name}_loss_end"] is not None and f[f"{name}_kl_end"] >= 0, name
    assert f["docs2_loss_end"] is not None and "docs2_kl_end" not in f and "domain_kl_end" not in f
    assert result.metrics["train_tokens"].keys() == {"domain"}  # nothing replayed
    assert [g["guarded_set"] for g in f["guards"]] == ["bible"]
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "| bible |" in card and "| docs2 |" in card
    assert (tmp_path / "out" / "forgetting.png").is_file()


def test_masked_runs_build_the_named_sets_too(tiny_tokenizer):
    import copy

    from hf_cpt.recipe.masked_data import build_masked_data

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})

    cfg = CPTConfig.from_dict({"objective": "mlm", "masking": "random",
                               "data": {"block_size": 32, "max_eval_blocks": 2, "replay_ratio": 0.0,
                                        "general": None, "eval_sets": {"bible": KJV}},
                               "monitor": {"general": "bible", "kl": False}})
    _, eval_sets, _, _ = build_masked_data(cfg, tokenizer)
    assert set(eval_sets) == {"bible", "domain"} and len(eval_sets["bible"]) == 2


def test_the_plot_draws_named_domain_sets_on_the_domain_panel(tmp_path, monkeypatch):
    import matplotlib.axes

    from hf_cpt.plotting import plot_forgetting

    drawn = []
    original = matplotlib.axes.Axes.plot

    def record(self, *args, **kwargs):
        drawn.append((self.get_title(), kwargs.get("label", "").split(":")[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    history = [{"step": s, "bible_loss": 3.0 + s, "domain_loss": 4.0 - s, "docs2_loss": 5.0 - s} for s in (0, 1)]
    plot_forgetting(history, tmp_path / "p.png", general="bible", domain_sets=["docs2"])
    assert ("domain held-out loss", "docs2") in drawn and ("domain held-out loss", "domain") in drawn
    assert ("general held-out loss", "bible") in drawn
