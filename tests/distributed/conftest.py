import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from ..conftest import tiny_run_dict
from .launch import Launches, launch_all


@pytest.fixture(scope="session")
def launches(tmp_path_factory, tiny_model_dir):
    """Every scenario of the distributed tests, run once per session in a few batched launches (launch.py).

    Under pytest-xdist (`-n auto`, the README's command) the workers share them: the first worker to get here
    launches, under a file lock in the directory all workers' temp dirs live in, and records the result; the others
    wait on the lock and read it (pytest-xdist's documented pattern for a session fixture that must run once;
    `--dist loadgroup` would do it too, but it does not group with pytest 9.2 and pytest-xdist 3.8)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _launch(tmp_path_factory.mktemp("launches"), tiny_model_dir)
    shared = tmp_path_factory.getbasetemp().parent
    record = shared / "launches.json"
    with FileLock(str(shared / "launches.lock")):
        if not record.exists():
            out = _launch(shared / "launches", tiny_model_dir)
            record.write_text(json.dumps({**dataclasses.asdict(out), "root": str(out.root)}))
    saved = json.loads(record.read_text())
    return Launches(**{**saved, "root": Path(saved["root"])})


def _launch(root: Path, tiny_model_dir: Path) -> Launches:
    from hf_cpt.config import CPTConfig, DataConfig
    from hf_cpt.recipe.prepare import prepare_config
    from hf_cpt.testing import make_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    store = root / "store"
    prepare_config(CPTConfig(data=DataConfig(block_size=32, replay_ratio=0.25, prepared_dir=str(store))),
                   make_tiny_tokenizer())
    # `hf-cpt train` in one process vs FSDP (and vs DDP, test_ddp.py): the same global batch of 2 blocks, with the
    # techniques whose recipe path differs under FSDP: the rewarm optimizer built in `create_optimizer` (FSDP
    # refuses `Trainer(optimizers=...)`), active forgetting (once refused by the recipe under FSDP), and the
    # parameter groups (no decay on embeddings, norms, biases; the bottom block frozen before wrapping)
    cfg = tiny_run_dict(tiny_model_dir, max_steps=4, per_device_train_batch_size=2)
    cfg["train"].pop("warmup_steps")
    cfg["train"].pop("lr_scheduler_type")  # the `schedule` block defines the LR
    cfg["schedule"] = {"schedule": "rewarm", "warmup_steps": 2, "embedding_lr_ratio": 0.5}
    cfg["active_forgetting"] = {"every_k_updates": 3}
    cfg["train"] |= {"weight_decay": 0.1, "freeze_layers": 1}  # decay groups and a frozen block, sharded too
    run_yaml = root / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(cfg))
    return launch_all(root, store, run_yaml)
