"""Multi-process (gloo, CPU) training and crash/resume: the same data and results as one uninterrupted process."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..conftest import invoke_like_main, tiny_run_dict
from .launch import ENV

pytestmark = pytest.mark.timeout(1800)  # the first test to ask for `launches` pays for the batched launches


@pytest.mark.slow  # reads the batched launches (launch.py): one process, torchrun with 2 processes
def test_two_ranks_train_on_disjoint_slices_of_the_one_process_stream(launches):
    single = json.loads((launches.dir("one", "ddp") / "rank0.json").read_text())
    ranks = [json.loads((launches.dir("two", "ddp") / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    for step in range(4):
        r0, r1 = ranks[0]["seen"][step], ranks[1]["seen"][step]
        assert not {tuple(x) for x in r0} & {tuple(x) for x in r1}  # disjoint
        assert r0 + r1 == single["seen"][step]  # together: the one-process global batch
    # same global batch, same data: the loss curves agree up to the order of float reductions
    for a, b in zip(single["losses"], ranks[0]["losses"]):
        assert abs(a - b) < 1e-4


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "hf_cpt.cli.main", *args], env=ENV, capture_output=True,
                          text=True, **kw)


@pytest.mark.slow  # `hf-cpt train --nproc 2` (its own torchrun); the one-process run is the batched launches' `cli`
def test_cli_two_process_run_matches_one_process(tmp_path, launches):
    cfg = yaml.safe_load((launches.root / "run.yaml").read_text())
    cfg["train"]["per_device_train_batch_size"] = 1  # same global batch on two processes
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg))
    b = _cli(["train", str(tmp_path / "two.yaml"), "-o", str(tmp_path / "o2"), "--nproc", "2"])
    assert b.returncode == 0, b.stderr[-3000:]
    m1 = json.loads((launches.dir("one", "cli") / "run" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "o2" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m1["train_tokens"] == m2["train_tokens"]
    l1 = [r["loss"] for r in m1["log_history"] if "loss" in r]
    l2 = [r["loss"] for r in m2["log_history"] if "loss" in r]
    assert len(l1) == len(l2) == 4 and max(abs(x - y) for x, y in zip(l1, l2)) < 1e-4
    assert b.stdout.count("Adapted model written") == 1  # only the main process reports and writes


@pytest.mark.slow  # three CLI processes
def test_sigkill_after_a_checkpoint_then_resume_gives_bitwise_identical_weights(tmp_path, tiny_model_dir):
    cfg = tiny_run_dict(tiny_model_dir, max_steps=10, save_steps=2, eval_steps=5)
    cfg["active_forgetting"] = {"every_k_updates": 3}
    cfg["schedule"] = {"schedule": "rewarm", "warmup_steps": 2}
    cfg["train"].pop("warmup_steps")
    cfg["train"].pop("lr_scheduler_type")  # the `schedule` block defines the LR
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ref = _cli(["train", str(path), "-o", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "crash"
    ckpts = Path(str(out) + ".checkpoints")
    target = ckpts / f"checkpoint-{random.Random(0).choice([2, 4, 6])}" / "trainer_state.json"
    proc = subprocess.Popen([sys.executable, "-m", "hf_cpt.cli.main", "train", str(path), "-o", str(out)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists() and not out.exists()  # killed mid-run: no output directory, checkpoints kept

    code, stderr = invoke_like_main(["train", str(path), "-o", str(out)])  # refused before any training
    assert code == 2 and "--resume" in stderr
    resumed = _cli(["train", str(path), "-o", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    w_ref = load_file(tmp_path / "ref" / "model.safetensors")
    w_res = load_file(out / "model.safetensors")
    assert w_ref.keys() == w_res.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k
    m_ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    m_res = json.loads((out / "metrics.json").read_text())
    assert m_res["train_tokens"] == m_ref["train_tokens"] and m_res["resumed_from"]
    assert m_res["eval_history"] == m_ref["eval_history"]
    assert not ckpts.exists()  # removed after success (train.keep_checkpoints: false)


def test_resume_refuses_checkpoints_from_another_config(tmp_path, tiny_model_dir):
    cfg = tiny_run_dict(tiny_model_dir, max_steps=4, save_steps=2)
    cfg["train"]["keep_checkpoints"] = True
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # one process, so the CLI runs in-process: what is tested is the refusal, not a launch
    code, stderr = invoke_like_main(["train", str(path), "-o", str(tmp_path / "out")])
    assert code == 0, stderr[-3000:]
    cfg["data"]["replay_ratio"] = 0.5
    path.write_text(yaml.safe_dump(cfg))
    code, stderr = invoke_like_main(["train", str(path), "-o", str(tmp_path / "out"), "--resume", "--overwrite"])
    assert code == 2 and "`data.replay_ratio`: 0.25 -> 0.5" in stderr
    code, stderr = invoke_like_main(["train", str(path), "-o", str(tmp_path / "other"), "--resume"])
    assert code == 2 and "nothing to resume" in stderr
