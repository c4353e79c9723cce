"""Active forgetting's pure cores (plasticity pretraining, `callbacks/active_forgetting.py` for the paper and the
Trainer glue): which parameters are the token embeddings, re-initialise them, zero their optimizer state, freeze
everything else. Torch only, no transformers.
"""

from __future__ import annotations

import torch


def embedding_parameters(model: torch.nn.Module, include_untied_output: bool = False) -> list[torch.nn.Parameter]:
    """The input embedding weight (and the output head's, if untied and asked for), each once."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if not isinstance(emb, torch.nn.Module) or not hasattr(emb, "weight"):
        raise ValueError(f"{type(model).__name__} has no input embeddings (`get_input_embeddings()`): active "
                         "forgetting needs a model with a token embedding layer")
    params = [emb.weight]
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if include_untied_output and out is not None and out.weight is not emb.weight:
        params.append(out.weight)
    return params


@torch.no_grad()
def reset_embeddings(model: torch.nn.Module, generator: torch.Generator, std: float | None = None,
                     include_untied_output: bool = False) -> list[torch.nn.Parameter]:
    """Re-initialise the embeddings in place with N(0, std) (default `config.initializer_range`).

    Returns:
        the parameters that were reset.
    """
    params = embedding_parameters(model, include_untied_output)
    std = std if std is not None else float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    pad = getattr(model.get_input_embeddings(), "padding_idx", None)
    for i, p in enumerate(params):
        fresh = torch.randn(p.shape, generator=generator, dtype=torch.float32) * std  # the full (global) shape
        if i == 0 and pad is not None:
            fresh[pad] = 0.0
        _copy_whole(p, fresh.to(dtype=p.dtype))
    return params


def _copy_whole(param: torch.Tensor, whole: torch.Tensor) -> None:
    """`param.copy_(whole)`; for an FSDP2-sharded parameter (a `DTensor`) each rank copies its own rows of the same
    full draw (`src_data_rank=None`: no communication), so the sharded reset equals the unsharded one."""
    if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
        from torch.distributed.tensor import distribute_tensor

        whole = distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(whole.to(param.device))


@torch.no_grad()
def clear_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> int:
    """Zero every state tensor (moments and step) of `params` in `optimizer`; returns how many were found."""
    found = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        found += 1
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()
    return found


def relearn_embeddings(model: torch.nn.Module, include_untied_output: bool = True) -> list[str]:
    """Freeze everything but the embeddings (the paper's adaptation phase); returns the trainable names.

    Undo with `for p in model.parameters(): p.requires_grad_(True)`.
    """
    keep = {id(p) for p in embedding_parameters(model, include_untied_output)}
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            names.append(name)
    return names
