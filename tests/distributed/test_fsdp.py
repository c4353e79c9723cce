"""FSDP is never silently degraded: on processes without GPUs, where accelerate would quietly run plain DDP with the
shipped FSDP config, `hf-cpt train` refuses with one line; guards that depend on sharding see the real setting (the
arguments, what `accelerate launch` tells the processes, and the model's parameters)."""

import subprocess
import sys

import pytest
import yaml

from hf_cpt.callbacks.active_forgetting import ActiveForgettingCallback
from hf_cpt.config import CPTConfig
from hf_cpt.recipe.train import check_sharding
from hf_cpt.templates import accelerate_config
from hf_cpt.testing import make_tiny_llama
from hf_cpt.utils import is_sharded_model, requested_sharding

from ..conftest import tiny_run_dict
from .launch import ENV

pytestmark = pytest.mark.timeout(1800)  # `launches`: see launch.py


class _Args:
    fsdp = ""
    deepspeed = None


@pytest.mark.slow  # accelerate launch
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for processes without GPUs")
def test_accelerate_launch_with_the_shipped_fsdp_config_refuses_on_cpu(tmp_path, tiny_model_dir):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tiny_run_dict(tiny_model_dir, max_steps=2)))
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config("fsdp")),
         "--num_processes", "2", "-m", "hf_cpt.cli.main", "train", str(tmp_path / "run.yaml"),
         "-o", str(tmp_path / "out")],
        env=ENV, capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode != 0, f"ran instead of refusing; stderr:\n{proc.stderr[-3000:]}"
    ours = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert ours and all("FSDP was requested" in line and "--nproc" in line for line in ours), proc.stderr[-3000:]
    assert "/hf_cpt/" not in proc.stderr  # no traceback through our code (the launcher reports its child's exit)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_requested_sharding_reads_the_arguments_and_the_launcher(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    args = _Args()
    assert requested_sharding(args) is None
    args.fsdp = ["full_shard", "auto_wrap"]
    assert requested_sharding(args) == "FSDP"
    args.fsdp = ""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # how `accelerate launch` tells the processes
    assert requested_sharding(args) == "FSDP"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert requested_sharding(args) == "DeepSpeed"


def test_active_forgetting_guard_sees_deepspeed_set_by_the_launcher(monkeypatch, tiny_model_dir):
    """The callback resets FSDP2 (DTensor) embeddings (tests/distributed/test_fsdp_equal.py) and refuses DeepSpeed
    and FSDP1; the recipe lets FSDP through (its only FSDP refusal on CPU is the one for processes without GPUs)
    and refuses DeepSpeed in the technique's preflight, before any data is built."""
    from hf_cpt.recipe.train import preflight

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match=r"`active_forgetting` does not support DeepSpeed"):
        ActiveForgettingCallback(every_k_updates=2).on_train_begin(_Args(), None, None, model=make_tiny_llama(64))
    cfg = CPTConfig.from_dict({**tiny_run_dict(tiny_model_dir), "active_forgetting": {"every_k_updates": 2}})
    with pytest.raises(ValueError, match=r"`active_forgetting` does not support DeepSpeed"):
        preflight(cfg, make_tiny_llama(64), _Args())
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # asked for, but the parameters are whole: nothing to refuse
    ActiveForgettingCallback(every_k_updates=2).on_train_begin(_Args(), None, None, model=make_tiny_llama(64))
    preflight(cfg, make_tiny_llama(64), _Args())
    # the technique is not refused under FSDP; what stops this process is that it has no GPU
    with pytest.raises(ValueError, match=r"^FSDP was requested .* no GPU") as err:
        check_sharding(cfg, _Args())
    assert "active_forgetting" not in str(err.value)


def test_active_forgetting_refuses_fsdp1_flat_parameters():
    """FSDP1 (a `FullyShardedDataParallel` module, flattened parameters that are not DTensors) is refused."""
    import torch

    fsdp1 = type("FullyShardedDataParallel", (torch.nn.Module,), {})()
    model = make_tiny_llama(64)
    model.model.fsdp1_marker = fsdp1  # what `is_sharded_model` looks for; the parameters stay plain tensors
    assert is_sharded_model(model)
    with pytest.raises(ValueError, match=r"supports FSDP2 .* but not FSDP1 or DeepSpeed ZeRO-3"):
        ActiveForgettingCallback(every_k_updates=2).on_train_begin(_Args(), None, None, model=model)


@pytest.mark.slow  # reads the batched launches (launch.py)
def test_is_sharded_model_sees_fsdp2_parameters(launches):
    """`fully_shard` by accelerate gives DTensor parameters, and `is_sharded_model` sees them (`launches.pair`
    asserts it for the sharded ranks and its absence for the one process); a plain model is not sharded."""
    single, ranks = launches.pair("plain")
    assert [r["sharded"] for r in ranks] == [True, True] and single["sharded"] is False
    assert not is_sharded_model(make_tiny_llama(64))


def test_new_rows_first_refuses_sharded_parameters():
    """Under FSDP2 the phase's gradient hooks never fire (measured: old rows moved in a sharded run), so sharded
    parameters are refused with the fix."""
    from hf_cpt.callbacks.new_rows_first import NewRowsFirstCallback

    model = make_tiny_llama(64)
    NewRowsFirstCallback(60, steps=2).on_train_begin(_Args(), None, None, model=model)  # whole parameters: fine
    model.model.fsdp1_marker = type("FullyShardedDataParallel", (__import__("torch").nn.Module,), {})()
    with pytest.raises(ValueError, match=r"`vocab.new_rows_first_steps` .* does not support sharded training"):
        NewRowsFirstCallback(60, steps=2).on_train_begin(_Args(), None, None, model=model)


def test_hf_cpt_train_refuses_new_rows_first_under_fsdp_before_any_data(monkeypatch, tiny_model_dir):
    """The same refusal from the recipe's preflight (right after the model loads), for FSDP from the arguments or
    from `accelerate launch`; without sharding the phase is accepted."""
    from hf_cpt.recipe.train import preflight

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    cfg = CPTConfig.from_dict({**tiny_run_dict(tiny_model_dir), "vocab": {"n_new_tokens": 8,
                                                                          "new_rows_first_steps": 2}})
    preflight(cfg, make_tiny_llama(64), _Args())
    args = _Args()
    args.fsdp = "full_shard"
    with pytest.raises(ValueError, match=r"^`vocab.new_rows_first_steps` .* does not support sharded training"):
        preflight(cfg, make_tiny_llama(64), args)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=r"does not support sharded training"):
        preflight(cfg, make_tiny_llama(64), _Args())
