"""A key given twice in a config's YAML is refused at every depth (PyYAML would keep the last one silently), with
one line naming the key's dotted path, both lines and the file; everything else loads exactly as `yaml.safe_load`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hf_cpt.cli.main import app
from hf_cpt.config import CPTConfig
from hf_cpt.templates import list_templates, load_template, template_text
from hf_cpt.yaml_loader import DuplicateKeyError, load_yaml

ROOT = Path(__file__).resolve().parents[1]

DUPLICATES = {  # text, the dotted path named, the two lines
    "top level": ("output_dir: runs/a\nseed: 1\noutput_dir: runs/b\n", "output_dir", (1, 3)),
    "nested": ("train:\n  max_steps: 5\n  learning_rate: 0.001\n  max_steps: 50\n", "train.max_steps", (2, 4)),
    "three deep": ("data:\n  domain:\n    train: a.jsonl\n    eval: b.jsonl\n    train: c.jsonl\n",
                   "data.domain.train", (3, 5)),
    "a whole block": ("train:\n  max_steps: 5\nmonitor: {}\ntrain:\n  max_steps: 6\n", "train", (1, 4)),
    "in a list item": ("data:\n  replay_stages:\n    - start: 0.5\n      replay_ratio: 0.1\n"
                       "    - start: 0.8\n      replay_ratio: 0.2\n      start: 0.9\n",
                       "data.replay_stages[1].start", (5, 7)),
    "flow mapping": ("monitor: {tolerance: 0.1, action: stop, tolerance: 0.2}\n", "monitor.tolerance", (1, 1)),
    "quoted and plain": ("train:\n  'max_steps': 5\n  max_steps: 6\n", "train.max_steps", (2, 3)),
    "equal after parsing": ("data:\n  1: a\n  0x1: b\n", "data.1", (2, 3)),  # both the int 1
}


@pytest.mark.parametrize("name", list(DUPLICATES))
def test_a_duplicate_key_is_refused_naming_its_path_and_both_lines(name):
    text, path, (first, second) = DUPLICATES[name]
    assert yaml.safe_load(text) is not None  # PyYAML alone accepts it: the second value silently wins
    with pytest.raises(DuplicateKeyError) as e:
        load_yaml(text, source="config file 'run.yaml'")
    assert str(e.value) == (f"config file 'run.yaml' sets `{path}` twice (lines {first} and {second}): YAML would "
                            "silently keep only the last one; remove one of them")


def test_merge_keys_and_aliases_are_not_duplicates():
    text = ("base: &base {max_steps: 5, learning_rate: 0.001}\n"
            "train:\n  <<: *base\n  max_steps: 6\n"  # overriding a merged key is what merges are for
            "again:\n  <<: [*base, {max_steps: 7}]\n"
            "same: *base\n")
    assert load_yaml(text) == yaml.safe_load(text)
    assert load_yaml(text)["train"] == {"max_steps": 6, "learning_rate": 0.001}


def test_a_self_referencing_alias_terminates():
    text = "a: &a\n  b: *a\n  c: 1\n"
    data = load_yaml(text)
    assert data["a"]["b"] is data["a"] and data["a"]["c"] == 1


def test_invalid_yaml_is_still_a_yaml_error():
    with pytest.raises(yaml.YAMLError):
        load_yaml("train: [1, 2\n")


@pytest.mark.parametrize("name", list(list_templates()))
def test_the_shipped_templates_load_as_before(name):
    assert load_yaml(template_text(name)) == yaml.safe_load(template_text(name))
    load_template(name)


def test_every_yaml_block_of_the_docs_loads_as_before():
    blocks = [b for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
              for b in re.findall(r"```yaml\n(.*?)```", f.read_text(encoding="utf-8"), re.S)]
    assert blocks
    for block in blocks:
        assert load_yaml(block) == yaml.safe_load(block), block


def test_from_yaml_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 5\n  max_steps: 50\n")
    with pytest.raises(ValueError, match=re.escape(f"config file {str(path)!r} sets `train.max_steps` twice "
                                                   "(lines 2 and 3)")):
        CPTConfig.from_yaml(path)


def test_hf_cpt_train_stops_with_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: some/model\ndata:\n  replay_ratio: 0.1\n  block_size: 64\n"
                    "  replay_ratio: 0.5\n")
    result = CliRunner().invoke(app, ["train", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"Error: config file {str(path)!r} sets `data.replay_ratio` twice (lines 4 and 6): YAML would "
                     "silently keep only the last one; remove one of them"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
