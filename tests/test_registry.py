"""The technique registry drives the config, the preflight, the Trainer, the model card and the exports: a toy
technique in one module plus one registry line is configured, validated, trained, carded and exported; every
built-in technique has exactly one entry, and the code it drives names none of them."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import re
import typing
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import hf_cpt
from hf_cpt import registry
from hf_cpt.config import CPTConfig

from .conftest import tiny_run_dict

TOY = "tests.toy_technique"


@pytest.fixture
def toy(monkeypatch):
    """The one registry line: the toy's module appended to `TECHNIQUE_MODULES` (for this test only)."""
    import hf_cpt.functional  # noqa: F401  (imported before: its page lists the built-in cores only)

    monkeypatch.setattr(registry, "TECHNIQUE_MODULES", [*registry.TECHNIQUE_MODULES, TOY])
    module = importlib.import_module(TOY)
    for calls in module.CALLS.values():
        calls.clear()
    return module


def test_a_toy_technique_is_configured_from_a_dict_and_round_trips(toy, tmp_path):
    cfg = CPTConfig.from_dict({"toy": {"every": 2}})
    assert cfg.toy == toy.ToyConfig(every=2)
    assert CPTConfig().toy is None  # registered but unset
    data = cfg.to_dict()
    assert data["toy"] == {"every": 2} and "extensions" not in data  # a top-level block, as in the YAML
    assert "toy" not in CPTConfig().to_dict()
    assert CPTConfig.from_dict(data) == cfg
    assert cfg.override({"toy.every": 3}).toy.every == 3
    assert CPTConfig().override({"toy": {"every": 4}}).toy.every == 4
    cfg.save_pretrained(tmp_path)
    assert CPTConfig.from_pretrained(tmp_path) == cfg
    assert cfg.training_diff(cfg.override({"toy.every": 3})) == ["`toy.every`: 2 -> 3"]


def test_an_unregistered_block_is_an_unknown_field():
    with pytest.raises(ValueError, match="unknown field `toy`"):
        CPTConfig.from_dict({"toy": {"every": 2}})


def test_a_toy_technique_is_validated_with_one_clear_line(toy, tmp_path):
    with pytest.raises(ValueError, match=r"^`toy.every` must be an integer >= 1, got 0$"):
        CPTConfig.from_dict({"toy": {"every": 0}})
    with pytest.raises(ValueError, match=r"`toy.every` \(500\) is longer than the run"):  # its `check`
        CPTConfig.from_dict({"toy": {"every": 500}})
    with pytest.raises(ValueError, match=r"`toy.every` must be an integer >= 1"):
        CPTConfig.from_dict({"toy": {"every": 2}}).override({"toy.every": -1})
    from hf_cpt.cli.main import app

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"toy": {"every": 0}}))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == ["Error: `toy.every` must be an integer >= 1, got 0"], result.output
    assert "Traceback" not in result.output


def test_a_toy_technique_is_trained_carded_and_recorded(toy, tmp_path, tiny_model_dir):
    from hf_cpt.recipe import run_cpt

    cfg = CPTConfig.from_dict({**tiny_run_dict(tiny_model_dir, max_steps=2, eval_steps=2), "toy": {"every": 1}})
    result = run_cpt(cfg, output_dir=tmp_path / "out")
    assert toy.CALLS["preflight"] == ["LlamaForCausalLM"]  # once, with the loaded model
    assert len(toy.CALLS["attached"]) == 1  # the hook its setup returned got the built Trainer
    assert type(toy.CALLS["attached"][0]).__name__ == "Trainer"
    trainer = toy.CALLS["attached"][0]
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, toy.ToyCallback)]
    assert callback.count == 2  # its callback ran on every update
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "- toy: every 1-th update counted" in card
    saved = yaml.safe_load((tmp_path / "out" / "hf_cpt_config.yaml").read_text(encoding="utf-8"))
    assert saved["toy"] == {"every": 1}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["global_step"] == 2
    # the run-level hooks: the model first, the Trainer's settings, the first and last steps of the run
    assert toy.CALLS["model"] == ["LlamaForCausalLM"]
    assert trainer.args.logging_nan_inf_filter is False
    assert toy.CALLS["before_run"] == [["hub_token"]]
    assert toy.CALLS["after_run"] == [(True, "state from before_run")]  # once the output directory is complete
    assert result.metrics["toy_after_run"] == "state from before_run"


def test_a_toy_technique_is_exported(toy):
    import hf_cpt.functional as F

    assert hf_cpt.ToyCallback is toy.ToyCallback and hf_cpt.ToyConfig is toy.ToyConfig
    assert {"ToyCallback", "ToyConfig"} <= set(hf_cpt.__all__)
    assert hf_cpt._GROUPS["toy"] == {"ToyConfig": TOY, "ToyCallback": TOY}
    assert F.count_updates is toy.count_updates
    assert registry.techniques()["toy"] is toy.TECHNIQUE


def test_every_built_in_technique_has_exactly_one_entry():
    entries = registry.techniques()
    modules = registry.TECHNIQUE_MODULES
    assert len(set(modules)) == len(modules) == len(entries)
    for module, (name, entry) in zip(modules, entries.items()):
        assert importlib.import_module(module).TECHNIQUE is entry, module
    keys = [t.key for t in entries.values() if t.key is not None]
    assert len(keys) == len(set(keys))
    exported = [n for t in entries.values() for n in t.exports]
    assert len(exported) == len(set(exported))  # a public name belongs to one technique
    default = CPTConfig()
    hints = typing.get_type_hints(CPTConfig)
    for entry in entries.values():
        if entry.key is None:
            continue
        *parents, leaf = entry.key.split(".")
        owner = default
        for part in parents:
            owner = getattr(owner, part)
        assert leaf in {f.name for f in dataclasses.fields(owner)}, entry.key  # a declared field
        if entry.config is not None and not parents:
            assert entry.config in typing.get_args(hints[leaf]) or hints[leaf] is entry.config, entry.key


def test_the_functional_page_and_exports_come_from_the_registry():
    import hf_cpt.functional as F

    assert set(F.__all__) == set(registry.functional_cores())
    assert len(F.__all__) >= 44  # every core listed before the registry, still there
    for name in ("reset_embeddings", "lr_multiplier", "tolerance_bound", "fit_cmr_law", "pack_documents",
                 "chunked_linear_cross_entropy", "topk_kl", "init_ofa", "build_mix_schedule"):
        assert name in F.__all__, name
    for group in registry.exports().values():
        assert set(group) <= set(hf_cpt.__all__)


# what the registry replaced: no code it drives spells out a technique
def _technique_words() -> list[str]:
    words = {t.key.split(".")[-1] for t in registry.techniques().values() if t.key not in (None, "data", "monitor")}
    return sorted(words | {"kl", "trainable", "new_rows_first"})


@pytest.mark.parametrize("target", ["hf_cpt.recipe.train:build_trainer", "hf_cpt.recipe.train:preflight",
                                    "hf_cpt.recipe.train:check_sharding", "hf_cpt.recipe.train:build_data",
                                    "hf_cpt.model_card:recipe_lines", "hf_cpt.config:CPTConfig.__post_init__"])
def test_no_if_chain_names_a_technique(target):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    src = inspect.getsource(obj)
    allowed = set()
    if attr == "CPTConfig.__post_init__":  # the `masking` field's own forms (a kind name, the masked-LM default)
        src = src.split("known = extension_techniques")[1]
    if attr == "build_data":  # masked runs read data of their own (tagged chunks), not the token-exact mixer
        allowed = {"masking"}
    found = [w for w in _technique_words() if w not in allowed and re.search(rf"\.{w}\b", src)]
    assert not found, found


def test_the_registry_module_imports_only_the_standard_library():
    import ast

    tree = ast.parse(inspect.getsource(registry))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                 and n.level == 0}
    assert imported <= {"importlib", "collections", "dataclasses", "functools", "typing", "__future__"}, imported


def test_the_architecture_map_has_one_row_per_technique_and_its_paths_exist():
    from pathlib import Path

    root = Path(hf_cpt.__file__).resolve().parent.parent
    text = (root / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Map: technique -> module -> tests -> doc -> bench")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| technique")]
    entries = registry.techniques()
    assert [r[0] for r in rows] == list(entries)  # registry order, every technique once
    for (name, module, tests, doc, bench), entry_module in zip(rows, registry.TECHNIQUE_MODULES):
        origin = Path(importlib.util.find_spec(entry_module).origin).relative_to(root).as_posix()
        assert module == f"`{origin}`", name  # the entry's file (a package's `__init__.py`)
        for cell in (tests, doc, bench):
            for path in re.findall(r"`([^`]+)`", cell):
                assert (root / path).exists(), f"{name}: {path}"
        assert re.findall(r"`([^`]+)`", tests), f"{name} names no test"


def test_two_techniques_replacing_one_step_or_wanting_different_trainer_settings_are_refused(monkeypatch):
    """The registry's run-level hooks compose: one technique at most replaces the model / data step, and
    `training_args` from several entries merge unless they disagree, each refusal naming both blocks."""
    cfg = CPTConfig()
    a = registry.Technique(name="a", key="a", enabled=lambda c: True, data="x:y",
                           training_args={"ignore_data_skip": False, "seed": 1})
    b = registry.Technique(name="b", key="b", enabled=lambda c: True, data="x:z",
                           training_args={"ignore_data_skip": True})
    c = registry.Technique(name="c", key="c", enabled=lambda c: True, training_args={"seed": 1})
    monkeypatch.setattr(registry, "enabled_techniques", lambda cfg: [a, c])
    assert registry.merged_training_args(cfg) == {"ignore_data_skip": False, "seed": 1}
    monkeypatch.setattr(registry, "enabled_techniques", lambda cfg: [a, b])
    with pytest.raises(ValueError, match=r"`a` and `b` need different `ignore_data_skip`"):
        registry.merged_training_args(cfg)
    with pytest.raises(ValueError, match=r"`a` and `b` each replace the run's data step"):
        registry.single_hook(cfg, "data")
    with pytest.raises(ValueError, match=r"`data` must be 'module:function'"):
        registry.Technique(name="d", data="no_colon").hook("data")
    assert registry.Technique(name="e", model="recipe.vocab:extend_run_model").hook("model").__name__ == \
        "extend_run_model"


def test_the_recipe_names_no_optional_technique():
    """`recipe/train.py` learns about techniques from the registry only: it reads no optional technique's block
    (`cfg.masking`, `cfg.hub`, `cfg.vocab`, ...); the always-on blocks (`data`, `train`, `monitor`) it may."""
    source = (Path(hf_cpt.__file__).parent / "recipe" / "train.py").read_text(encoding="utf-8")
    always = {"data", "train", "monitor", "model", "objective", "output_dir"}
    optional = {t.key for t in registry.techniques().values() if t.key is not None} - always
    named = sorted({k for k in optional if re.search(rf"\bcfg\.{re.escape(k)}\b", source)})
    assert not named, f"recipe/train.py reads technique blocks directly: {named}"
    assert {"masking", "hub", "vocab", "schedule", "data.prepared_dir"} <= optional  # the check sees them
