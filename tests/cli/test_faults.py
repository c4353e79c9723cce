"""Faults under test (issue 36), each with its expected outcome as `hf-cpt train` shows it (in-process: the
recipe and the CLI's one-line error are what is tested, not the process boundary):

- a damaged checkpoint file on `--resume` (truncated optimizer state, an empty RNG state, truncated weights, a
  scheduler file that is not a torch archive): one `Error:` line naming the file and the checkpoint to fall back
  to, before anything loads; deleting that checkpoint as told resumes from the one before;
- a full disk while the run writes (a small tmpfs, skipped where it cannot be mounted): one `Error:` line saying
  the disk is full, and no staging directory, output or lock left on it.

Concurrent runs (the lock) are in tests/test_output_lock.py, SIGINT/SIGTERM in tests/cli/test_interrupt.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hf_cpt.recipe import checkpoint_dir

from ..conftest import invoke_like_main, tiny_run_dict

pytestmark = pytest.mark.timeout(300)


def _one_error(code: int, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("hf-cpt: ")]
    assert code == 2 and "Traceback" not in stderr, f"exit {code}:\n{stderr[-4000:]}"
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, stderr[-4000:]
    return errors[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A run killed after its last checkpoint: `checkpoint-2` and `checkpoint-4` kept, no output directory."""
    root = tmp_path_factory.mktemp("faults")
    cfg = tiny_run_dict(tiny_model_dir, max_steps=4, save_steps=2, eval_steps=4, keep_checkpoints=True)
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    code, stderr = invoke_like_main(["train", str(root / "run.yaml"), "-o", str(root / "out")])
    assert code == 0, stderr[-3000:]
    shutil.rmtree(root / "out")
    assert {p.name for p in checkpoint_dir(root / "out").glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    return root


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "optimizer.pt": _truncate,
    "rng_state.pth": lambda p: p.write_bytes(b""),
    "model.safetensors": _truncate,
    "scheduler.pt": lambda p: p.write_bytes(b"not a torch archive"),
}


@pytest.mark.slow  # the fixture trains once (~10 s); the fast lane checks the same files in test_a_damaged_file...
@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_checkpoint_file_on_resume_is_one_line_naming_it(tmp_path, finished_run, monkeypatch, name):
    shutil.copy(finished_run / "run.yaml", tmp_path / "run.yaml")
    shutil.copytree(checkpoint_dir(finished_run / "out"), checkpoint_dir(tmp_path / "out"))
    last = checkpoint_dir(tmp_path / "out") / "checkpoint-4"
    DAMAGE[name](last / name)
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail(
        "weights loaded before the damaged checkpoint was refused")))
    code, stderr = invoke_like_main(["train", str(tmp_path / "run.yaml"), "-o", str(tmp_path / "out"), "--resume"])
    line = _one_error(code, stderr)
    assert f"{name} in {str(last)!r} is damaged" in line, line
    assert f"delete {str(last)!r} to resume from checkpoint-2" in line, line
    assert last.is_dir() and not (tmp_path / "out").exists()  # nothing deleted or written for the user


@pytest.mark.slow  # a second training run (~10 s): the outcome the message promises
def test_deleting_the_damaged_checkpoint_as_told_resumes_from_the_one_before(tmp_path, finished_run):
    shutil.copy(finished_run / "run.yaml", tmp_path / "run.yaml")
    shutil.copytree(checkpoint_dir(finished_run / "out"), checkpoint_dir(tmp_path / "out"))
    last = checkpoint_dir(tmp_path / "out") / "checkpoint-4"
    _truncate(last / "optimizer.pt")
    shutil.rmtree(last)
    code, stderr = invoke_like_main(["train", str(tmp_path / "run.yaml"), "-o", str(tmp_path / "out"), "--resume"])
    assert code == 0, stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_file_in_a_checkpoint_is_refused_naming_it_and_the_way_on(tmp_path, name):
    """The same check on a checkpoint made by hand (fast lane): the torch files are zip archives with CRCs, the
    safetensors header must cover its file."""
    import torch
    from safetensors.torch import save_file

    from hf_cpt.recipe.train import check_checkpoint_files

    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        save_file({"w": torch.arange(4096.0)}, ckpt / "model.safetensors")
        for torch_file in ("optimizer.pt", "rng_state.pth", "scheduler.pt"):
            torch.save({"state": torch.arange(4096.0)}, ckpt / torch_file)
        check_checkpoint_files(ckpt)  # intact: accepted
    last = tmp_path / "checkpoint-4"
    DAMAGE[name](last / name)
    with pytest.raises(ValueError) as caught:
        check_checkpoint_files(last)
    assert f"{name} in {str(last)!r} is damaged" in str(caught.value)
    assert f"delete {str(last)!r} to resume from checkpoint-2" in str(caught.value)
    with pytest.raises(ValueError, match="to start over"):  # no earlier checkpoint: start over
        DAMAGE[name](tmp_path / "checkpoint-2" / name)
        check_checkpoint_files(tmp_path / "checkpoint-2")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: room for the config and the lock, not for the run's outputs."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30)


@pytest.mark.slow  # a training run (~8 s) onto the small disk
def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path, small_disk, tiny_model_dir):
    cfg = tiny_run_dict(tiny_model_dir, max_steps=2, eval_steps=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (200 << 10))  # what is left cannot hold the weights (~100 KiB) and the plot
    out = small_disk / "out"
    code, stderr = invoke_like_main(["train", str(tmp_path / "run.yaml"), "-o", str(out)])
    line = _one_error(code, stderr)
    assert "no space left on the disk holding" in line and "free space" in line, line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no output, staging dir or lock
