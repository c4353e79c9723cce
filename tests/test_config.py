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
        # self-synthesised data and distillation replay
        ({"objective": "mlm", "model": {"name_or_path": "embedded:minilm-l6"}, "data": {"synth": {"eval_tokens": 64}}},
         "`data.general.train` / `data.synth`: self-synthesised data needs a causal (generating) model"),
        ({"data": {"general": {"train": "self", "eval": "embedded:kjv/validation"}}}, "`data.synth.train_tokens`"),
        ({"data": {"synth": {"train_tokens": -5}}}, "`data.synth.train_tokens` must be an integer >= 0"),
        ({"data": {"synth": {"train_tokens": 0, "eval_tokens": 0}}}, "at least one must be > 0"),
        ({"data": {"synth": {"eval_tokens": 64, "temperature": 0}}}, "`data.synth.temperature` must be > 0"),
        ({"data": {"synth": {"eval_tokens": 64, "top_p": 1.5}}}, "`data.synth.top_p`"),
        ({"data": {"domain": {"train": "self", "eval": "x"}}}, "`data.domain.train` / `data.domain.eval`"),
        ({"train": {"distill": {"weight": -0.5}}}, "`train.distill.weight` must be >= 0"),
        ({"train": {"distill": {"top_k": 0}}}, "`train.distill.top_k` must be an integer >= 1"),
        ({"train": {"distill": {"tokens": "domain"}}}, "`train.distill.tokens` must be one of"),
        ({"data": {"replay_ratio": 0}, "train": {"distill": {}}}, "`train.distill.tokens` is `replay` but the run replays"),
        ({"data": {"general": None, "replay_ratio": 0}, "monitor": {"general": "general_self"},
          "train": {"distill": {}}}, "`train.distill.tokens` is `replay`"),
        ({"train": {"distill": {}, "chunked_loss": False}}, "`train.distill` is computed inside hf-cpt's chunked loss"),
        ({"monitor": {"tolerance_metric": "kl"}}, "`monitor.tolerance_metric` kl"),
        ({"monitor": {"kl_top_k": 0}}, "`monitor.kl_top_k` must be an integer >= 1"),
    ],
)
def test_bad_input_names_the_field(data, field):
    with pytest.raises(ValueError) as e:
        CPTConfig.from_dict(data)
    assert field in str(e.value)


@pytest.mark.parametrize("data, field", [
    ({"monitor": {"general": "general_self"}}, "`monitor.general` is 'general_self', which is not a held-out set"),
    ({"data": {"domain": {"train": "a.jsonl"}}}, "`data.domain.eval` is not set"),
    ({"data": {"general": {"train": "a.jsonl"}}}, "`data.general.eval` is not set"),
])
def test_a_run_needs_the_monitors_held_out_sets(data, field):
    cfg = CPTConfig.from_dict(data)  # fine as a config (e.g. for extend-vocab) ...
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        cfg.check_held_out_sets()  # ... but not to train
    ok = CPTConfig.from_dict({"data": {"general": {"train": "a.jsonl"}, "synth": {"eval_tokens": 64}},
                              "monitor": {"general": "general_self"}})
    ok.check_held_out_sets()
    assert ok.held_out_sets() == ["general_self", "domain"]


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


def test_distill_on_is_a_deprecated_spelling_of_tokens(tmp_path, caplog):
    """YAML 1.1 reads the key `on` as the boolean true: the documented `on: replay` of earlier versions still
    works (as `tokens`), with a line naming the new key; a quoted 'on' too."""
    base = "model: {name_or_path: embedded:smollm2-135m}\ndata: {general: {train: embedded:kjv/train}}\n"
    for spelling in ("on", "'on'", "tokens"):
        path = tmp_path / "run.yaml"
        path.write_text(base + f"train:\n  distill: {{weight: 1.0, {spelling}: all}}\n")
        caplog.clear()
        with caplog.at_level("WARNING", logger="hf_cpt.config"):
            cfg = CPTConfig.from_yaml(path)
        assert cfg.train.distill.tokens == "all"
        deprecated = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
        if spelling == "tokens":
            assert not deprecated
        else:
            assert deprecated == ["`train.distill.on` is deprecated: write `train.distill.tokens` (YAML 1.1 reads "
                                  "the key `on` as a boolean)"]
    dumped = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert dumped["train"]["distill"]["tokens"] == "all" and "on" not in dumped["train"]["distill"]


@pytest.mark.parametrize("key", ["yes", "off", "no"])
def test_a_key_yaml_reads_as_a_boolean_is_named(tmp_path, key):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{name_or_path: embedded:smollm2-135m}}\ntrain:\n  {key}: 1\n")
    with pytest.raises(ValueError, match=r"`train` has the key `(True|False)`: YAML 1.1 reads an unquoted `on`"):
        CPTConfig.from_yaml(path)


def test_saved_recipe_names_the_schedule_that_ran(tmp_path):
    """A constant-LR run's hf_cpt_config.yaml says `decay: none` and no transformers scheduler (not the unused
    defaults `cosine`); the Trainer's own records name the same shape and warm-up; the old spelling still loads."""
    from hf_cpt.recipe.train import build_training_args

    cfg = CPTConfig.from_dict({"schedule": {"schedule": "constant", "warmup_steps": 2}, "train": {"max_steps": 8}})
    saved = yaml.safe_load((cfg.save_pretrained(tmp_path)).read_text())
    assert saved["schedule"]["decay"] == "none" and saved["train"]["lr_scheduler_type"] is None
    assert CPTConfig.from_pretrained(tmp_path) == cfg
    from hf_cpt.callbacks.rewarm import name_schedule_in_args

    args = build_training_args(cfg, tmp_path / "out")
    name_schedule_in_args(args, cfg.schedule)  # what the schedule's setup does to the Trainer's arguments
    assert (args.lr_scheduler_type, args.warmup_steps) == ("constant_with_warmup", 2)
    from hf_cpt.model_card import recipe_lines

    assert any("to 5e-05, then held constant," in line for line in recipe_lines(cfg.to_dict(), {}))
    wsd = CPTConfig.from_dict({"schedule": {"schedule": "wsd", "warmup_steps": 1, "decay_steps": 2},
                               "train": {"max_steps": 8}})
    wsd_args = build_training_args(wsd, tmp_path / "out")
    name_schedule_in_args(wsd_args, wsd.schedule)
    assert wsd_args.lr_scheduler_type == "warmup_stable_decay"
    plain = CPTConfig.from_dict({"train": {"max_steps": 8, "lr_scheduler_type": "linear", "warmup_steps": 3}})
    assert (build_training_args(plain, tmp_path / "out").lr_scheduler_type, plain.train.lr_scheduler_type) == \
        ("linear", "linear")
    # what earlier versions saved for such a run: the unused defaults, read as what ran
    old = CPTConfig.from_dict({"schedule": {"schedule": "constant", "decay": "cosine"},
                               "train": {"lr_scheduler_type": "cosine"}})
    assert (old.schedule.decay, old.train.lr_scheduler_type) == ("none", None)
    with pytest.raises(ValueError, match="`schedule.decay` is 'linear' but `schedule.schedule` is constant"):
        CPTConfig.from_dict({"schedule": {"schedule": "constant", "decay": "linear"}})
    with pytest.raises(ValueError, match="`train.lr_scheduler_type` is 'linear' but `schedule` defines the LR"):
        CPTConfig.from_dict({"schedule": {"schedule": "rewarm"}, "train": {"lr_scheduler_type": "linear"}})
