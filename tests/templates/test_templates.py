import pytest
import yaml

from hf_cpt.config import CPTConfig
from hf_cpt.templates import list_templates, load_template, template_text

REQUIRED = {"quickstart", "medical", "legal", "finance", "code", "new-language"}


def test_all_required_templates_ship_with_descriptions():
    names = list_templates()
    assert REQUIRED <= set(names)
    assert all(desc for desc in names.values())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_template_parses_into_the_python_dataclasses(name):
    cfg = load_template(name)
    assert isinstance(cfg, CPTConfig)
    # the YAML text is commented (it is meant to be edited) and equals the parsed object
    text = template_text(name)
    assert "#" in text
    assert CPTConfig.from_dict(yaml.safe_load(text)) == cfg
    assert cfg.output_dir


def test_quickstart_is_fully_offline():
    cfg = load_template("quickstart")
    assert cfg.model.name_or_path.startswith("embedded:")
    assert cfg.data.domain.train.startswith("embedded:")
    assert all(s.path.startswith("embedded:") for s in cfg.data.eval_sets.values())


def test_unknown_template_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'medical'"):
        load_template("medicl")


def test_accelerate_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig

    from hf_cpt.templates import ACCELERATE_CONFIGS, accelerate_config

    for name in ACCELERATE_CONFIGS:
        cfg = ClusterConfig.from_yaml_file(accelerate_config(name))
        assert str(cfg.distributed_type).endswith("FSDP")
    assert "fsdp_version: 2" in open(accelerate_config("fsdp")).read()
    with pytest.raises(ValueError, match=r"unknown accelerate config 'deepspeed_zero3' \(available: fsdp\)"):
        accelerate_config("deepspeed_zero3")  # not shipped: no test could run it
