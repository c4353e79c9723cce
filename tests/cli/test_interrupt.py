"""`hf-cpt train` stopped by SIGINT or SIGTERM: its last line says what was kept and gives the exact command to go
on, it exits 130 / 143, and it leaves no output, staging or lock files; the printed `--resume` command finishes the
run. (Subprocesses: the signal and the exit status are what is tested.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hf_cpt.cli.main import app

from ..conftest import tiny_run_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # every test launches CLI processes
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
MAX_STEPS = 16  # long enough that a signal at the first checkpoint lands mid-run


def _cli(args: list[str], cwd: Path, **kwargs):
    return [sys.executable, "-m", "hf_cpt.cli.main", *args], dict(cwd=cwd, env=ENV, text=True, **kwargs)


def _signal_when(ready, sig: int, args: list[str], cwd: Path) -> tuple[int, list[str]]:
    cmd, kwargs = _cli(args, cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = subprocess.Popen(cmd, **kwargs)
    deadline = time.time() + 240
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal:\n" + proc.stderr.read()[-3000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, [line for line in err.splitlines() if line.strip()]


def _write_config(tmp_path: Path, model_dir: Path, save_steps: int) -> None:
    cfg = tiny_run_dict(model_dir, max_steps=MAX_STEPS, save_steps=save_steps, eval_steps=MAX_STEPS)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))


def test_sigint_keeps_the_last_checkpoint_and_prints_the_command_that_resumes_it(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    _write_config(tmp_path, tiny_model_dir, save_steps=2)
    ckpts = tmp_path / "out.checkpoints"
    # relative paths, typed as a user would: the resume command must repeat them as given
    code, lines = _signal_when(lambda: (ckpts / "checkpoint-2" / "trainer_state.json").exists(), signal.SIGINT,
                               ["train", "run.yaml", "-o", "out"], tmp_path)
    shown = "\n".join(lines[-5:])
    assert code == 130, shown
    found = re.fullmatch(rf"Interrupted \(SIGINT\): kept checkpoint (\S+) \(step (\d+) of {MAX_STEPS}\); "
                         r"resume with: (.+)", lines[-1])
    assert found, shown
    kept, step, command = found.groups()
    assert Path(kept) == ckpts.resolve() / f"checkpoint-{step}" and (Path(kept) / "trainer_state.json").is_file()
    assert command == "hf-cpt train run.yaml -o out --resume"
    assert sum("Interrupted" in line for line in lines) == 1 and not any("Traceback" in line for line in lines)
    # no output dir, staging dir or lock files; an interrupted save (a newer, incomplete checkpoint) is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.checkpoints", "run.yaml"]
    steps = sorted(int(p.name[11:]) for p in ckpts.glob("checkpoint-*"))
    assert steps[-1] == int(step) and all((ckpts / f"checkpoint-{s}" / "trainer_state.json").is_file() for s in steps)

    monkeypatch.chdir(tmp_path)  # the command as printed, run in-process (no second interpreter start)
    done = CliRunner().invoke(app, shlex.split(command)[1:])
    assert done.exit_code == 0, done.output[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith(f"checkpoint-{step}") and metrics["global_step"] == MAX_STEPS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run.yaml"]


def test_sigterm_without_checkpoints_says_nothing_was_kept(tmp_path, tiny_model_dir):
    _write_config(tmp_path, tiny_model_dir, save_steps=0)
    code, lines = _signal_when(lambda: any(tmp_path.glob(".out.tmp-*")), signal.SIGTERM,
                               ["train", "run.yaml", "-o", "out"], tmp_path)
    assert code == 143, "\n".join(lines[-5:])
    assert lines[-1] == ("Interrupted (SIGTERM): nothing was kept (`train.save_steps` is 0, so the run writes no "
                         "checkpoints); start again with: hf-cpt train run.yaml -o out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # the staging dir and the lock went too
