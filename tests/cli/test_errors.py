"""The CLI tells bad input from bugs: a user error is one line and exit status 2; a programming error (a bare
`TypeError`, an `ImportError` of an installed package, ...) keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

import hf_cpt.recipe
from hf_cpt.cli.main import app
from hf_cpt.import_utils import MissingDependencyError
from hf_cpt.validation import ConfigTypeError

runner = CliRunner()


def _train(tmp_path, data) -> object:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return runner.invoke(app, ["train", str(path)])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_a_value_error_from_the_config_is_one_line(tmp_path):
    line = _one_error_line(_train(tmp_path, {"data": {"replay_ratio": 1.5}}))
    assert line.startswith("Error: `data.replay_ratio` must be in [0, 1]")


def test_a_wrong_type_in_the_config_is_one_line(tmp_path):
    line = _one_error_line(_train(tmp_path, {"data": [1, 2]}))
    assert line == "Error: `data` must be a mapping of fields, got list"
    with pytest.raises(ConfigTypeError):  # the marked kind of TypeError the CLI treats as bad input
        from hf_cpt.config import CPTConfig

        CPTConfig.from_dict({"data": [1, 2]})


def test_a_missing_optional_package_is_one_line(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise MissingDependencyError("X needs the `lm_eval` package, which is not installed. Install it with: "
                                     "pip install 'hf-cpt[eval]'")

    monkeypatch.setattr(hf_cpt.recipe, "load_config", missing)
    line = _one_error_line(_train(tmp_path, {}))
    assert "pip install 'hf-cpt[eval]'" in line


@pytest.mark.parametrize("bug", [TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'"),
                                 ImportError("cannot import name 'gone' from 'transformers'"),
                                 AttributeError("'NoneType' object has no attribute 'train'")])
def test_a_programming_error_is_not_disguised_as_bad_input(tmp_path, monkeypatch, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(hf_cpt.recipe, "load_config", broken)
    result = _train(tmp_path, {})
    assert result.exit_code != 2
    assert result.exception is bug  # it propagates as itself, with its traceback
    assert not any(line.startswith("Error: ") for line in result.output.splitlines())


@pytest.mark.slow  # a process launch (~10 s): the in-process tests above cover the fast lane
def test_the_traceback_of_a_bug_reaches_stderr():
    # the process boundary is what is tested: what a user sees when the library has a bug
    code = ("import hf_cpt.recipe as r\n"
            "def bug(*args, **kwargs):\n"
            "    return None + 1\n"
            "r.load_config = bug\n"
            "from hf_cpt.cli.main import app\n"
            "app(['train', 'x.yaml'], prog_name='hf-cpt')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert "TypeError: unsupported operand" in proc.stderr
    assert not any(line.startswith("Error: ") for line in proc.stderr.splitlines())
