"""The README is an interface: its two set-up commands and its Python example must stay true."""

import re
from pathlib import Path

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


def test_the_python_example_keeps_the_settings_the_doc_test_shrinks():
    """The example itself runs in tests/test_docs.py (with every README block, shrunk to two steps, and the
    monitor's history checked there); here: the settings that shrinking replaces are still in it."""
    code = re.search(r"```python\n(.*?)\n```", README, flags=re.S).group(1)
    for old in ("max_steps=40", "eval_steps=10", "max_eval_blocks=16", '"runs/mine"', "monitor.summary()"):
        assert old in code, f"the README example no longer contains {old!r}: update this test with it"
