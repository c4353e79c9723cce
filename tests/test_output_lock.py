"""One run per output directory: an flock lock next to it (never inside), the holder named to a second run, a lock
left by `kill -9` taken over, and `run_cpt` holding it from before it writes anything until it ends."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hf_cpt.recipe.train as train_module
from hf_cpt.cli.main import app
from hf_cpt.config import CPTConfig
from hf_cpt.output_lock import OutputDirBusyError, OutputDirLock, lock_files
from hf_cpt.recipe import checkpoint_dir, run_cpt

from .conftest import tiny_run_dict

HOLD = ("import sys, time\nfrom hf_cpt.output_lock import OutputDirLock\n"
        "held = OutputDirLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")


def test_a_second_lock_names_the_holder_and_the_fix(tmp_path):
    out = tmp_path / "runs" / "a"
    lock, owner = lock_files(out)
    with OutputDirLock(out):
        assert lock.parent == owner.parent == out.parent and not out.exists()  # next to it, never inside
        record = json.loads(owner.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(OutputDirBusyError) as e:
            OutputDirLock(out).acquire()  # a separate lock object: what a second run does
        assert str(e.value) == (f"`output_dir` {str(out)!r} is in use by pid {os.getpid()} on "
                                f"{socket.gethostname()} (started {record['started']}). Wait for that run to "
                                "finish or stop it, or choose another `output_dir`")
        with OutputDirLock(tmp_path / "runs" / "b"):  # another directory is free
            pass
    assert not lock.exists() and not owner.exists()
    assert not (tmp_path / "runs").exists()  # made for the lock, removed with it: nothing was written there
    with OutputDirLock(out):  # released: free again
        pass


def test_a_lock_left_by_kill_9_is_not_held_and_is_taken_over(tmp_path, caplog):
    out = tmp_path / "a"
    lock, owner = lock_files(out)
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirBusyError, match=f"in use by pid {child.pid} on {socket.gethostname()}"):
            OutputDirLock(out).acquire()
    finally:
        child.kill()  # SIGKILL: no cleanup runs in the child
        child.wait()
        child.stdout.close()
    assert lock.exists() and json.loads(owner.read_text())["pid"] == child.pid  # left behind...
    with caplog.at_level(logging.INFO, logger="hf_cpt"), OutputDirLock(out):  # ...but not held
        assert json.loads(owner.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {child.pid} on {socket.gethostname()}" in caplog.text
    assert not lock.exists() and not owner.exists()


@pytest.mark.parametrize("where", ["under a file", "under /proc"])
def test_an_unwritable_place_is_one_clear_error_not_a_busy_one(tmp_path, where):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out" if where == "under a file" else Path("/proc/hf_cpt_out")
    if where == "under /proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    with pytest.raises(ValueError, match="cannot be written .*choose a directory you can create and write to"):
        OutputDirLock(out).acquire()  # filelock alone reports a lock file it cannot create as "not acquired"


@pytest.fixture
def cfg(tiny_model_dir):
    return CPTConfig.from_dict(tiny_run_dict(tiny_model_dir, max_steps=1, eval_steps=1))


@pytest.mark.slow  # a training run
def test_run_cpt_holds_the_lock_until_it_ends_and_removes_it(tmp_path, cfg, monkeypatch):
    out = tmp_path / "out"
    seen = []
    real = train_module._train_and_write

    def train_and_check(*args, **kwargs):
        with pytest.raises(OutputDirBusyError, match=f"pid {os.getpid()}"):
            run_cpt(cfg, output_dir=out)  # a second run while the first trains
        seen.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_train_and_write", train_and_check)
    run_cpt(cfg, output_dir=out)
    assert seen and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock files left, none inside `out`


def test_a_second_run_stops_before_it_touches_checkpoints_or_loads_the_model(tmp_path, cfg, monkeypatch):
    out = tmp_path / "out"
    cfg = cfg.override({"train.save_steps": 1})
    partial = checkpoint_dir(out) / "checkpoint-1"  # what the first run may be writing right now
    partial.mkdir(parents=True)
    monkeypatch.setattr(train_module, "build_model", lambda cfg: pytest.fail("the model was loaded"))
    with OutputDirLock(out):
        for resume in (False, True):  # a resume would otherwise delete the checkpoint being written
            with pytest.raises(OutputDirBusyError, match="is in use by pid"):
                run_cpt(cfg, output_dir=out, resume=resume)
    assert partial.is_dir() and not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_failed_run_leaves_no_lock_and_no_directory(tmp_path, cfg):
    bad = cfg.override({"data.domain.train": str(tmp_path / "missing.jsonl")})
    with pytest.raises(FileNotFoundError):
        run_cpt(bad, output_dir=tmp_path / "new" / "parent" / "out")
    assert list(tmp_path.iterdir()) == []


def test_hf_cpt_train_into_a_busy_output_dir_is_one_line(tmp_path, tiny_model_dir):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run_dict(tiny_model_dir, max_steps=1, eval_steps=1)))
    out = tmp_path / "out"
    with OutputDirLock(out):
        result = CliRunner().invoke(app, ["train", str(path), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: `output_dir` {str(out)!r} is in use by pid "
                                                   f"{os.getpid()} on {socket.gethostname()} (started ")
    assert lines[0].endswith("Wait for that run to finish or stop it, or choose another `output_dir`")
