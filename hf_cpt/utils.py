"""Small helpers shared by the techniques: model unwrapping, version drift, atomic output directories."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .output_lock import pid_alive as _pid_alive


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return the bare model under DDP/FSDP/`torch.compile`/accelerate wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, torch.nn.Module):
                model = inner
                break
    return model


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested_sharding(args: Any) -> str | None:
    """`"FSDP"` or `"DeepSpeed"` when the run asks for sharded training, from `TrainingArguments` (`fsdp`,
    `deepspeed`) or from `accelerate launch` (which tells the processes through `ACCELERATE_USE_FSDP` /
    `ACCELERATE_USE_DEEPSPEED`, not through the arguments); None otherwise."""
    fsdp = getattr(args, "fsdp", None)
    if (fsdp not in (None, False, "", [], ()) and fsdp != "no") or _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if getattr(args, "deepspeed", None) or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    return None


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are really sharded: FSDP2 (`DTensor` parameters), FSDP1 (a
    `FullyShardedDataParallel` module) or DeepSpeed ZeRO-3 (parameters carrying `ds_id`)."""
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            return True
    for p in model.parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            return True
        if hasattr(p, "ds_id"):
            return True
    return False


def check_unsharded(key: str, why: str, sharding: str | None) -> None:
    """Refuse `sharding` (`"FSDP"`, `"DeepSpeed"`, ...) for the technique configured by `key`, which cannot run
    sharded because of `why`; the one wording of that refusal (the recipe before loading the model, a callback
    used on its own at train start)."""
    if sharding:
        raise ValueError(f"`{key}` does not support {sharding} ({why}) yet: train with DDP or a single process, "
                         f"or remove `{key}`")


def check_top_k(name: str, k: int, model: Any) -> None:
    """Refuse a top-k larger than the output vocabulary (the field is named `name` in the error) of `model`: a
    loaded model, or its transformers config (`vocab_size`, checked before any weights load)."""
    if hasattr(model, "get_output_embeddings"):
        vocab = model.get_output_embeddings().weight.shape[0]
    else:
        text = model.get_text_config() if hasattr(model, "get_text_config") else model
        vocab = getattr(text, "vocab_size", None)
        if not isinstance(vocab, int):
            return
    if k > vocab:
        raise ValueError(f"`{name}` ({k}) is larger than the model's vocabulary ({vocab}): use at most {vocab}")


# --- patching a model's forward: one visible, reversible step ------------------------------------------------------
FORWARD_PATCH = "hf_cpt_forward_patch"  # the attribute recording it on the model


class ForwardPatch:
    """The record of a replaced `model.forward`: which hf-cpt feature replaced it (`name`), the forward it
    replaced (`original`, what the new one calls through), and its settings (`options`). Kept on the model as
    `model.hf_cpt_forward_patch`; [`unpatch_forward`] restores the model's own forward."""

    def __init__(self, name: str, original: Any, options: dict[str, Any]) -> None:
        self.name, self.original, self.options = name, original, options

    def __repr__(self) -> str:
        return f"ForwardPatch({self.name!r}, options={self.options!r})"


def patch_forward(model: torch.nn.Module, name: str, forward: Any, **options: Any) -> ForwardPatch:
    """Replace `model.forward` by `forward` (a function taking the model first) and record it as
    [`ForwardPatch`] on the model. Patching again with the same `name` only updates `options`; another patch
    already in place is refused (undo it first with [`unpatch_forward`])."""
    import functools
    import types

    patch = getattr(model, FORWARD_PATCH, None)
    if patch is not None:
        if patch.name != name:
            raise ValueError(f"{type(model).__name__}.forward is already patched by {patch.name!r}; call "
                             f"`hf_cpt.utils.unpatch_forward(model)` before applying {name!r}")
        patch.options.update(options)
        return patch
    patch = ForwardPatch(name, model.forward, dict(options))
    model.forward = types.MethodType(functools.wraps(type(model).forward)(forward), model)
    setattr(model, FORWARD_PATCH, patch)
    return patch


def forward_patch(model: Any) -> ForwardPatch | None:
    """The [`ForwardPatch`] recorded on `model`, or None when its forward is its own."""
    return getattr(model, FORWARD_PATCH, None)


def unpatch_forward(model: torch.nn.Module, name: str | None = None) -> bool:
    """Restore the forward [`patch_forward`] replaced (only a patch called `name`, when given); returns whether
    there was one to undo."""
    patch = forward_patch(model)
    if patch is None or (name is not None and patch.name != name):
        return False
    del model.forward  # the instance attribute; the class's forward shows through again
    delattr(model, FORWARD_PATCH)
    return True


# --- FSDP2 ----------------------------------------------------------------------------------------------------------
def is_fsdp2_module(module: torch.nn.Module) -> bool:
    """Whether `module` is an FSDP2 unit (`fully_shard` was applied to it); False where torch has no distributed."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a `DTensor` (an FSDP2-sharded parameter, gradient or optimizer state)."""
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


@contextlib.contextmanager
def unsharded_root(model: torch.nn.Module) -> Iterator[None]:
    """Gather an FSDP2 root unit's own parameters (embeddings, final norm, a head kept in the root) for code that
    calls its submodules directly (`model.get_decoder()(...)`, `model.get_output_embeddings()(...)`): FSDP2 only
    gathers a unit around its `forward`. Sub-units (decoder layers, an `lm_head` of its own) gather themselves when
    called. A no-op for unsharded models. Every rank must enter it (an all-gather)."""
    if not is_fsdp2_module(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def get_processing_class(kwargs: dict[str, Any]) -> Any:
    """The tokenizer/processor passed to a callback hook (`processing_class` in recent transformers,
    `tokenizer` in older ones)."""
    return kwargs.get("processing_class", kwargs.get("tokenizer"))


def is_nonempty_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.exists() and (not p.is_dir() or any(p.iterdir()))


class DiskFullError(OSError):
    """The disk (or quota) filled up while a run wrote its checkpoints or outputs: bad circumstances, not a bug,
    so the CLI shows it as one line; raised from the library's own error (torch, safetensors and the Trainer
    each report a full disk in their own words)."""

    def __str__(self) -> str:
        return str(self.strerror)


_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT
_FULL_WORDS = ("no space left on device", "disk quota exceeded", "file write failed")


def disk_full_error(error: BaseException, *places: str | os.PathLike) -> DiskFullError | None:
    """A [`DiskFullError`] naming the place when `error` (or an error it came from) says the disk is full, or one
    of `places` has under 1 MiB free (torch reports ENOSPC as "file write failed"); else None."""
    seen: BaseException | None = error
    full = False
    while seen is not None and not full:
        full = (isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS) or any(
            w in str(seen).lower() for w in _FULL_WORDS)
        seen = seen.__cause__ or seen.__context__
    where = next((str(p) for p in places if os.path.exists(p)), None)
    if not full and where is not None and not isinstance(error, ValueError):  # a refusal is never a full disk
        full = shutil.disk_usage(where).free < (1 << 20)
    if not full:
        return None
    return DiskFullError(28, f"no space left on the disk holding {where or 'the output'!r} while the run wrote its "
                             "checkpoints or outputs; free space (or point `output_dir` at a larger disk) and run "
                             "again (with --resume if a checkpoint was kept)")


def make_staging_dir(final: str | os.PathLike, overwrite: bool = False) -> Path:
    """A fresh temporary directory next to `final`, to be moved there by [`commit_staging_dir`].

    Raises:
        FileExistsError: `final` exists and is not empty, and `overwrite` is False.
    """
    final = Path(final).expanduser().resolve()
    if final.exists() and not final.is_dir():
        raise ValueError(f"`output_dir` {str(final)!r} is a file: choose a directory path")
    if is_nonempty_dir(final) and not overwrite:
        raise FileExistsError(
            f"`output_dir` {str(final)!r} exists and is not empty; choose another `output_dir` or pass "
            "`overwrite=True` (CLI: --overwrite)"
        )
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging_dirs(final)
        # the owner's pid and host in the name let a later run tell a killed run's leftovers from a live one
        prefix = f".{final.name}.tmp-{os.getpid()}-{socket.gethostname()}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    except OSError as e:
        raise ValueError(f"`output_dir` {str(final)!r} cannot be written ({e.strerror or e}): choose a directory "
                         "you can create and write to") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like a normal dir
    return tmp


def remove_stale_staging_dirs(final: str | os.PathLike) -> list[Path]:
    """Delete the staging directories (`.<name>.tmp-*`) that killed runs writing `final` left behind; those of
    a live process on this host, or of another host, are kept. Returns the removed paths."""
    final = Path(final).expanduser().resolve()
    host = socket.gethostname()
    removed = []
    for path in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        owner = path.name[len(final.name) + 6:]
        pid, _, rest = owner.partition("-")
        if pid.isdigit() and rest.rpartition("-")[0] != host:
            continue  # written from another machine (shared filesystem): cannot tell whether it is alive
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def commit_staging_dir(tmp: Path, final: str | os.PathLike) -> None:
    """Move the finished `tmp` to `final`, replacing an existing `final` only now."""
    final = Path(final).expanduser().resolve()
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on success move it to `final`, on failure delete it.

    A crash or an exception never leaves a half-written `final`. With `overwrite`, an existing `final` is
    replaced only once the new one is complete.
    """
    tmp = make_staging_dir(final, overwrite)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_staging_dir(tmp, final)


def add_callback_before_integrations(trainer: Any, callback: Any) -> Any:
    """Add `callback` to `trainer` ahead of its reporting integrations (TensorBoard, W&B, ...), so metrics it
    adds to the `logs` of `on_log` reach them too. Uses only the Trainer's public `pop_callback`/`add_callback`."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    integration_types = tuple(INTEGRATION_TO_CALLBACK.values())
    moved = [cb for cb in list(trainer.callback_handler.callbacks) if isinstance(cb, integration_types)]
    for cb in moved:
        trainer.pop_callback(cb)
    trainer.add_callback(callback)
    for cb in moved:
        trainer.add_callback(cb)
    return callback
