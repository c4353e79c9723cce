"""Shared fixtures: a tiny tokenizer and a tiny Llama built from config, saved like a real checkpoint."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest

# before anything imports huggingface_hub, which reads these once: tests never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# under pytest-xdist the workers share the cores: each gets its share of torch threads (set before torch loads;
# oversubscribed OpenMP threads spin and wait on each other)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))


def pytest_configure(config):
    """The fast lane must exercise every module (tests/exercised.py: its import hook goes in before anything here
    imports hf_cpt, so this file imports hf_cpt only inside fixtures)."""
    from .exercised import ExercisedModules

    config.pluginmanager.register(ExercisedModules(config), "hf-cpt-exercised-modules")


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests are opt-in: they run only with HF_CPT_GPU_TESTS=1 on a machine with CUDA."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    if os.environ.get("HF_CPT_GPU_TESTS") != "1":
        reason = "GPU test: opt in with HF_CPT_GPU_TESTS=1 on a machine with CUDA (bench/gpu_run.sh does)"
    else:
        import torch

        if torch.cuda.is_available():
            return
        reason = "HF_CPT_GPU_TESTS=1 but this machine has no CUDA device"
    for item in gpu:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from hf_cpt.testing import make_tiny_tokenizer  # not at the top: see `pytest_configure`

    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny causal LM checkpoint on disk (safetensors + tokenizer), loadable with `from_pretrained`."""
    from hf_cpt.testing import make_tiny_llama

    out = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def tiny_run_dict(model_dir: Path, **train) -> dict:
    """A complete run config for the tiny model on the embedded corpora, CPU-quick."""
    t = dict(max_steps=4, learning_rate=1e-3, per_device_train_batch_size=2, per_device_eval_batch_size=4,
             eval_steps=2, logging_steps=1, warmup_steps=0, lr_scheduler_type="constant")
    t.update(train)
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"block_size": 32, "max_eval_blocks": 4, "replay_ratio": 0.25},
        "train": t,
        "monitor": {"tolerance": 0.5},
    }


class _StderrLines(logging.Handler):
    """What `main()` and the libraries' own handlers would print to stderr, written to the current `sys.stderr`
    (the runner's): hf-cpt's INFO lines as `hf-cpt: ...`, any other library's warnings."""

    def __init__(self):
        super().__init__()
        self.seen: list[logging.LogRecord] = []  # a record that reaches two of the loggers below prints once

    def emit(self, record: logging.LogRecord) -> None:
        own = record.name == "hf_cpt" or record.name.startswith("hf_cpt.")
        if record in self.seen or record.levelno < (logging.INFO if own else logging.WARNING):
            return
        self.seen.append(record)
        sys.stderr.write(("hf-cpt: " if own else "") + record.getMessage() + "\n")


# transformers and datasets print their warnings through handlers of their own (they do not propagate)
_LOGGERS = ("", "hf_cpt", "transformers", "datasets", "huggingface_hub")
_SILENT_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # hidden by default


def invoke_like_main(args: list[str]) -> tuple[int, str]:
    """Run the typer app in-process as `main()` does; its exit status and everything a terminal would show on
    stderr: the app's own output, log lines, and Python warnings (`python` shows all but the silent kinds)."""
    from typer.testing import CliRunner

    from hf_cpt.cli.main import app

    handler = _StderrLines()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    own, level = loggers[1], loggers[1].level
    for logger in loggers:
        logger.addHandler(handler)
    own.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(app, args, prog_name="hf-cpt")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        own.setLevel(level)
    shown = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught
                    if not issubclass(w.category, _SILENT_WARNINGS))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        shown += "Traceback (in-process):\n" + "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.stderr + shown


