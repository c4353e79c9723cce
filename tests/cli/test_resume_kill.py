"""`hf-cpt train` killed with SIGKILL at seeded points, then run again: the same result as an uninterrupted run
(bitwise weights, token counts, eval history, step count), and no staging directory left behind."""

from __future__ import annotations

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

from ..conftest import tiny_run_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # every test launches CLI processes
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
MAX_STEPS = 6


def _cli(args):
    return subprocess.run([sys.executable, "-m", "hf_cpt.cli.main", *args], env=ENV, capture_output=True, text=True)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """The config and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("resume")
    cfg = tiny_run_dict(tiny_model_dir, max_steps=MAX_STEPS, save_steps=2, eval_steps=2)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _ok(_cli(["train", str(path), "-o", str(root / "ref")]))
    return path, root / "ref"


def _staged(out: Path, name: str) -> bool:
    return any((p / name).exists() for p in out.parent.glob(f".{out.name}.tmp-*"))


# where to kill: each a condition on the files the run has written so far
KILL_POINTS = {
    "before-first-checkpoint": lambda out, ck: _staged(out, "") and not (ck / "checkpoint-2").exists(),
    "between-checkpoints": lambda out, ck: (ck / "checkpoint-2" / "trainer_state.json").exists(),
    "after-last-checkpoint": lambda out, ck: (ck / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").exists(),
    "while-writing-outputs": lambda out, ck: _staged(out, "model.safetensors"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_matches_the_uninterrupted_run(tmp_path, run, point):
    path, ref = run
    out = tmp_path / "crash"
    ckpts = Path(str(out) + ".checkpoints")
    delay = random.Random(f"{point}-0").uniform(0, 0.05)  # seeded jitter past the point
    proc = subprocess.Popen([sys.executable, "-m", "hf_cpt.cli.main", "train", str(path), "-o", str(out)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not KILL_POINTS[point](out, ckpts) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before {point}: {proc.stderr.read()[-3000:]}"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not out.exists()
    assert list(tmp_path.glob(".crash.tmp-*")), "the kill should leave a staging dir for the rerun to clean"
    assert (tmp_path / "crash.lock").exists()  # left behind, but the kernel released it: the rerun takes it over

    resumable = any((p / "trainer_state.json").exists() for p in ckpts.glob("checkpoint-*"))
    again = _ok(_cli(["train", str(path), "-o", str(out), *(["--resume"] if resumable else [])]))

    assert not list(tmp_path.glob(".crash.tmp-*")), "stale staging dirs of the killed run remain"
    assert not ckpts.exists()
    assert not list(tmp_path.glob("crash.lock*")), "the lock the killed run left was not taken over and removed"
    w_ref, w_out = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert w_ref.keys() == w_out.keys()
    for key in w_ref:
        assert torch.equal(w_ref[key], w_out[key]), key
    m_ref = json.loads((ref / "metrics.json").read_text())
    m_out = json.loads((out / "metrics.json").read_text())
    assert m_out["global_step"] == m_ref["global_step"] == MAX_STEPS
    assert m_out["train_tokens"] == m_ref["train_tokens"]
    assert m_out["eval_history"] == m_ref["eval_history"]
    steps = [h["step"] for h in m_out["log_history"] if "loss" in h]
    assert steps == list(range(1, MAX_STEPS + 1)), again.stderr[-2000:]
