"""A seeded property-style fuzz of the config: random wrong types, NaN and infinities, out-of-range values and
unknown keys at every depth of `CPTConfig`, each refused with one clear line naming the field; a sample goes
through `hf-cpt train` in-process, which must print exactly one `Error:` line, no traceback, and leave nothing
behind (issue 36). Fast: a few hundred configs, no model."""

from __future__ import annotations

import dataclasses
import math
import random
import types
import typing

import pytest
import yaml

from hf_cpt.config import CPTConfig
from hf_cpt.validation import ConfigTypeError

from .conftest import invoke_like_main

SEED, CONFIGS, THROUGH_CLI = 36, 400, 25
NUMBERS = (int, float)


def _members(tp) -> list:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return list(typing.get_args(tp))
    return [tp]


def all_fields(cls=CPTConfig, prefix: str = ""):
    """`(dotted path, type hint)` of every field of `cls` and of the dataclasses below it."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "extensions":
            continue
        yield prefix + f.name, hints[f.name]
        for member in _members(hints[f.name]):
            if dataclasses.is_dataclass(member):
                yield from all_fields(member, prefix + f.name + ".")


def _accepts(tp, value) -> bool:
    """Whether a value of `value`'s kind is of a type the hint `tp` declares (so it is no wrong-type probe)."""
    for member in _members(tp):
        origin = typing.get_origin(member) or member
        if member is typing.Any or member is type(None) and value is None:
            return True
        if origin is bool and isinstance(value, bool):
            return True
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if origin is float and isinstance(value, NUMBERS) and not isinstance(value, bool):
            return True
        if origin is str and isinstance(value, str):
            return True
        if origin is list and isinstance(value, (list, str)):
            return True
        if (origin is dict or dataclasses.is_dataclass(member)) and isinstance(value, dict):
            return True
    return False


ANY_INTEGER = {"vocab.seed", "active_forgetting.seed"}  # seeds of draws: any integer is one
WRONG = [True, 7, 2.5, "ten", [1, 2], {"zz_unknown": 1}, None]


def mutations(rng: random.Random, fields: list):
    """`(config data, the dotted path the error must name)`: wrong types, NaN/inf, out-of-range numbers, unknown
    keys at every depth."""
    while True:
        path, tp = rng.choice(fields)
        if any(m is typing.Any or typing.get_origin(m) is dict for m in _members(tp)):
            continue  # plain-data blocks (`training_args`, `cmr`) take any value
        kind = rng.random()
        if kind < 0.25:  # an unknown key beside the field, or inside it when it is a block
            block = any(dataclasses.is_dataclass(m) for m in _members(tp))
            named = (path if block else path.rpartition(".")[0]) + ".zz_unknown"
            yield _with(named.lstrip("."), 1), named.lstrip(".")
        elif kind < 0.45 and any(m in NUMBERS for m in _members(tp)):
            yield _with(path, rng.choice([math.nan, math.inf, -math.inf])), path
        elif kind < 0.6 and any(m in NUMBERS for m in _members(tp)) and path not in ANY_INTEGER:
            yield _with(path, -10**9 if int in _members(tp) else -1e30), path  # below every field's range
        else:
            wrong = [v for v in WRONG if not _accepts(tp, v)]
            if wrong:
                yield _with(path, rng.choice(wrong)), path


# blocks whose defaults alone are incomplete: what they need besides the probed field
COMPLETE = {"downstream": {"tasks": ["hf_cpt_kjv_mc"]}, "synth": {"eval_tokens": 64},
            "prediction": {"steps": [0], **{f"{role}{end}": [3.0] for role in ("general", "domain")
                                            for end in ("", "_lo", "_hi")}}}


def _with(dotted: str, value) -> dict:
    cfg: dict = {"model": {"name_or_path": "m"}, "train": {"max_steps": 8}}
    if dotted.startswith("downstream."):
        cfg["downstream"] = dict(COMPLETE["downstream"])
    if dotted.startswith("data.synth."):
        cfg["data"] = {"synth": dict(COMPLETE["synth"])}
    if dotted.startswith("monitor.prediction."):
        cfg["monitor"] = {"prediction": dict(COMPLETE["prediction"])}
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return cfg


def _cases() -> list:
    rng = random.Random(SEED)
    gen = mutations(rng, list(all_fields()))
    return [next(gen) for _ in range(CONFIGS)]


CASES = _cases()


def test_the_fuzz_reaches_every_depth_and_kind():
    depths = {path.count(".") for _, path in CASES}
    assert depths >= {0, 1, 2}, depths
    assert sum(path.endswith("zz_unknown") for _, path in CASES) > 50
    assert len({path for _, path in CASES}) > 60


def test_every_fuzzed_config_is_refused_naming_its_field():
    problems = []
    for data, path in CASES:
        try:
            CPTConfig.from_dict(data)
        except (ValueError, ConfigTypeError) as e:
            line = " ".join(str(e).split())
            if f"`{path}" not in line:
                problems.append(f"{path}: {line}")
        except Exception as e:  # a bug: anything else escapes with a traceback
            problems.append(f"{path}: {type(e).__name__}: {e}")
        else:
            problems.append(f"{path}: accepted {data}")
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("index", range(0, CONFIGS, CONFIGS // THROUGH_CLI))
def test_a_fuzzed_config_through_the_cli_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, index):
    data, path = CASES[index]
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True))
    before = {p.name for p in tmp_path.iterdir()}
    code, stderr = invoke_like_main(["train", str(config), "-o", str(tmp_path / "out")])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and f"`{path}" in lines[0], stderr
    assert {p.name for p in tmp_path.iterdir()} == before
