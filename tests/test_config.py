import pytest
import yaml

from hf_cpt.config import CPTConfig, DataConfig, SourceConfig, TrainConfig


def test_defaults_are_valid_and_round_trip_through_yaml():
    cfg = CPTConfig()
    again = CPTConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert cfg.data.domain.train == "embedded:python-docs/train"


def test_nested_dicts_build_dataclasses_and_yaml_floats_are_coerced():
    cfg = CPTConfig.from_dict({"train": {"learning_rate": "5e-5", "max_steps": 10},
                               "data": {"domain": {"train": "a.jsonl"}, "replay_ratio": 0}})
    assert isinstance(cfg.data.domain, SourceConfig)
    assert cfg.train.learning_rate == pytest.approx(5e-5)
    assert isinstance(cfg.data.replay_ratio, float)


@pytest.mark.parametrize(
    "data, field",
    [
        ({"data": {"replay_ratio": 1.5}}, "`data.replay_ratio` must be in [0, 1]"),
        ({"data": {"replay_ratio": -0.1}}, "`data.replay_ratio` must be in [0, 1]"),
        ({"data": {"block_size": 0}}, "`data.block_size`"),
        ({"data": {"domain": {"eval": "x.jsonl"}}}, "`data.domain.train` is required"),
        ({"train": {"learning_rate": -1}}, "`train.learning_rate` must be > 0"),
        ({"train": {"learning_rate": "fast"}}, "`train.learning_rate` must be a number"),
        ({"train": {"warmup_steps": 50, "max_steps": 10}}, "`train.warmup_steps` (50) is longer than the run"),
        ({"train": {"max_steps": 2.5}}, "`train.max_steps` must be an integer"),
        ({"train": {"training_args": {"lerning_rate": 1}}}, "did you mean `train.learning_rate`"),
        ({"train": {"training_args": {"max_grad_nrm": 1}}}, "did you mean `train.training_args.max_grad_norm`"),
        ({"train": {"training_args": {"learning_rate": 1}}}, "set `train.learning_rate` instead"),
        ({"model": {"dtype": "float8"}}, "`model.dtype` must be one of"),
        ({"monitor": {"action": "explode"}}, "`monitor.action` must be one of"),
        ({"monitor": {"tolerance": -1}}, "`monitor.tolerance`"),
        ({"data": {"replay_rate": 0.2}}, "unknown field `data.replay_rate`; did you mean `data.replay_ratio`?"),
        ({"modle": {}}, "unknown field `modle`; did you mean `model`?"),
        ({"data": {"general": None, "replay_ratio": 0.1}}, "no `data.general` corpus is set"),
    ],
)
def test_bad_input_names_the_field(data, field):
    with pytest.raises(ValueError) as e:
        CPTConfig.from_dict(data)
    assert field in str(e.value)


def test_python_api_validates_too():
    with pytest.raises(ValueError, match="`replay_ratio` must be in"):
        DataConfig(replay_ratio=2)
    with pytest.raises(ValueError, match="`warmup_steps`"):
        TrainConfig(max_steps=5, warmup_steps=6)


def test_from_yaml_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CPTConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping at the top level"):
        CPTConfig.from_yaml(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("train:\n  max_steps: 7\n")
    assert CPTConfig.from_yaml(ok).train.max_steps == 7


def test_replay_stages_are_parsed_and_validated_by_path():
    cfg = CPTConfig.from_dict({"data": {"replay_stages": [{"start": 0.8, "replay_ratio": 0.05}]}})
    assert cfg.data.replay_stages[0].replay_ratio == 0.05
    with pytest.raises(ValueError, match=r"`data.replay_stages\[0\].start` must be a fraction in \[0, 1\)"):
        CPTConfig.from_dict({"data": {"replay_stages": [{"start": 1.5, "replay_ratio": 0.05}]}})
    with pytest.raises(ValueError, match=r"`data.replay_stages\[1\].start` must come after"):
        CPTConfig.from_dict({"data": {"replay_stages": [{"start": 0.5, "replay_ratio": 0.1},
                                                        {"start": 0.2, "replay_ratio": 0.1}]}})
    with pytest.raises(ValueError, match=r"`data.granularity` must be one of"):
        CPTConfig.from_dict({"data": {"granularity": "document"}})
