"""TEST-ONLY: run the real `Trainer` + accelerate FSDP2 path on CPU processes (gloo), so sharded training can be
tested without GPUs. Never import this from `hf_cpt`: users on CPU get DDP, and `hf-cpt train` refuses FSDP there.

Why a shim is needed. accelerate turns an `fsdp_plugin` into `DistributedType.FSDP` only for multi-accelerator
processes (`AcceleratorState.__init__` checks `MULTI_GPU`, `MULTI_XPU`, ...); a `MULTI_CPU` process keeps the
plugin out of its state and trains plain data parallel. Everything downstream (`Accelerator._prepare_fsdp2`,
`fully_shard`, DTensor parameters, `get_state_dict`, FSDP checkpointing, the Trainer's `is_fsdp_enabled`) is
device-agnostic and runs on CPU with gloo (torch 2.13). So the shim changes exactly one decision:

    after the original `AcceleratorState.__init__`, if the process is `MULTI_CPU` and was given an `fsdp_plugin`,
    set `distributed_type = FSDP` (in the shared state too) and keep the plugin.

Nothing else is patched. The other CPU-specific settings are plain arguments, returned by [`fsdp_args`]:
`use_cpu=True` (device cpu, gloo backend), mixed precision off (fp32: no `bf16`/`fp16`, so accelerate builds no
`MixedPrecisionPolicy`), and `cpu_ram_efficient_loading: false` (the model is built on every rank; no meta-device
load + broadcast from rank 0).

hf-cpt's own CPU refusal (`hf_cpt.recipe.train.check_sharding`: "FSDP was requested ... but these processes have
no GPU") stays for users. The workers that build a `transformers.Trainer` from hf-cpt's public pieces never meet
it; the one that runs `hf-cpt train` itself under FSDP (worker.py `cli`) lifts it for its own process with
[`allow_recipe_fsdp`], which adds `MULTI_CPU` to the process types the recipe accepts for FSDP: the shim is what
makes a `MULTI_CPU` process really shard, so the refusal's reason does not hold there.

Lifetime: [`install`] patches the class for the rest of the process and is idempotent; [`uninstall`] restores it.
Workers call `install()` once, in a process of their own (torchrun), never in the pytest process.
"""

from __future__ import annotations

import functools
from typing import Any

_ORIGINAL: dict[str, Any] = {}


def install() -> None:
    """Let `MULTI_CPU` processes given an `fsdp_plugin` take accelerate's FSDP branch (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if "init" in _ORIGINAL:
        return
    original = AcceleratorState.__init__

    @functools.wraps(original)
    def __init__(self, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # the original ends by publishing its decision to PartialState; publish ours the same way
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    _ORIGINAL["init"] = original
    AcceleratorState.__init__ = __init__


def allow_recipe_fsdp() -> None:
    """Let `hf-cpt train`'s recipe accept FSDP on `MULTI_CPU` processes (only after [`install`]; see above)."""
    from hf_cpt.recipe import train

    if "capable" not in _ORIGINAL:
        _ORIGINAL["capable"] = train._FSDP_CAPABLE
        train._FSDP_CAPABLE = (*train._FSDP_CAPABLE, "MULTI_CPU")


def uninstall() -> None:
    """Restore accelerate's own `AcceleratorState.__init__` and the recipe's CPU refusal."""
    from accelerate.state import AcceleratorState

    original = _ORIGINAL.pop("init", None)
    if original is not None:
        AcceleratorState.__init__ = original
    capable = _ORIGINAL.pop("capable", None)
    if capable is not None:
        from hf_cpt.recipe import train

        train._FSDP_CAPABLE = capable


def fsdp_args(wrap: tuple[str, ...] = ("LlamaDecoderLayer",), **fsdp_config: Any) -> dict[str, Any]:
    """`TrainingArguments` keywords for FSDP2 full sharding on CPU, fp32: each `wrap` class its own FSDP unit, the
    rest (embeddings, final norm, lm_head) in the root unit."""
    config = {"version": 2, "reshard_after_forward": True, "cpu_ram_efficient_loading": False,
              "state_dict_type": "FULL_STATE_DICT", "transformer_layer_cls_to_wrap": list(wrap), **fsdp_config}
    return {"fsdp": True, "fsdp_config": config, "use_cpu": True, "bf16": False, "fp16": False}
