"""Shared fixtures: a tiny tokenizer and a tiny Llama built from config, saved like a real checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# before anything imports huggingface_hub, which reads these once: tests never download
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_cpt.testing import make_tiny_llama, make_tiny_tokenizer  # noqa: E402


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
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny causal LM checkpoint on disk (safetensors + tokenizer), loadable with `from_pretrained`."""
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
