"""Parameter-side options that cost no compute: which parameters weight decay touches, and freezing the bottom layers.

**Weight decay groups.** Decaying the token embeddings pulls every row towards zero, rows of tokens the batch never
saw included, and decaying norm gains and biases pulls them off their trained values; neither regularises anything
useful. OLMo (Groeneveld et al. 2024, "OLMo: Accelerating the Science of Language Models"; OLMo-2 2025) applies
weight decay to the weight matrices only:

    decay(p) = weight_decay   if p is a weight matrix of a linear/attention/MLP layer
               0              if p is an embedding (input, or an untied output head), a norm gain, or a bias

`transformers.Trainer` already leaves norms and biases out; hf-cpt leaves the embeddings out too, by default
(`train.decay_embeddings: false`). The rule is one function, [`decay_parameter_names`], which both the Trainer's
own optimizer (its `get_decay_parameter_names`, so any `training_args.optim` keeps working) and the rewarming
optimizer (embeddings in their own LR group, `hf_cpt.callbacks.rewarm`) use.

**Freezing the bottom N layers** (`train.freeze_layers: N`): the N transformer blocks nearest the embeddings get
`requires_grad = False` before the optimizer is built, so they neither update nor hold optimizer state. Lower layers
carry the most general features; freezing them is a cheap way to learn less and forget less (the embeddings, the
upper blocks, the final norm and the head still train).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from .registry import Technique, TrainerParts, names

if TYPE_CHECKING:  # pragma: no cover
    from .config import CPTConfig

# the name patterns `transformers.Trainer.get_decay_parameter_names` uses, plus modules whose class is a norm
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)", re.IGNORECASE)
_TOKEN_ROWS = "trainable_tokens"  # peft's trainable-token rows (`trainable_tokens_delta`): embedding rows of LoRA runs


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def embedding_parameter_ids(model: torch.nn.Module) -> set[int]:
    """`id`s of the token-embedding parameters: every `nn.Embedding` (position/type embeddings included), the input
    embeddings and the output head (tied or not) when the model exposes them."""
    ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if isinstance(module, torch.nn.Module):
            ids |= {id(p) for p in module.parameters()}
    return ids


def decay_parameter_names(model: torch.nn.Module, decay_embeddings: bool = False) -> list[str]:
    """Names of the parameters weight decay applies to: all but norms, biases and (unless `decay_embeddings`) the
    token embeddings and output head. Frozen parameters are listed too (the optimizer skips them anyway)."""
    skip = embedding_parameter_ids(model) if not decay_embeddings else set()
    norm_ids = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    return [n for n, p in model.named_parameters()
            if not _NO_DECAY_NAMES.search(n) and id(p) not in norm_ids and id(p) not in skip
            and (decay_embeddings or _TOKEN_ROWS not in n)]


def layer_stack(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of transformer blocks, bottom first: the `nn.ModuleList` with `config.num_hidden_layers`
    entries (the longest one when the config does not say)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    wanted = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    matching = [m for m in lists if len(m) == wanted] or lists
    if not matching:
        raise ValueError(f"`train.freeze_layers`: {type(model).__name__} has no list of transformer blocks "
                         "(nn.ModuleList) to freeze; remove `train.freeze_layers`")
    return max(matching, key=len)


def check_freeze_layers(model: torch.nn.Module, n: int) -> torch.nn.ModuleList:
    """The layer stack of `model`, once `n` is known to fit it (raises `ValueError` naming `train.freeze_layers`)."""
    layers = layer_stack(model)
    if n > len(layers):
        raise ValueError(f"`train.freeze_layers` is {n} but the model has {len(layers)} layers: set at most "
                         f"{len(layers)}")
    return layers


def freeze_bottom_layers(model: torch.nn.Module, n: int) -> list[str]:
    """Set `requires_grad = False` on the bottom `n` transformer blocks of `model`; returns the frozen names.

    Raises:
        ValueError: `n` is more than the model has blocks.
    """
    layers = check_freeze_layers(model, n)
    frozen = {id(p) for layer in list(layers)[:n] for p in layer.parameters()}
    out = []
    for name, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            out.append(name)
    return out


# --- registry entry ---------------------------------------------------------------------------------------------------
def _enabled(cfg: CPTConfig) -> bool:
    return cfg.train.weight_decay > 0 or cfg.train.freeze_layers > 0


def _preflight(cfg: CPTConfig, model: Any, args: Any) -> None:
    if cfg.train.freeze_layers:  # too many layers, or no layer stack: before any data is built
        check_freeze_layers(model, cfg.train.freeze_layers)


def _setup(parts: TrainerParts) -> None:
    t = parts.cfg.train
    if t.freeze_layers:
        freeze_bottom_layers(parts.model, t.freeze_layers)
    # the Trainer's own optimizer asks this for its decay group (the rewarming optimizer calls the same rule)
    parts.decay_parameter_names = lambda model: decay_parameter_names(model, t.decay_embeddings)


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    train = config.get("train") or {}
    lines = []
    if train.get("weight_decay"):
        lines.append(f"weight decay {train['weight_decay']} on weight matrices"
                     + (" and embeddings; none on norms or biases" if train.get("decay_embeddings") else
                        "; none on embeddings, norms or biases"))
    if train.get("freeze_layers"):
        lines.append(f"bottom {train['freeze_layers']} transformer layers frozen")
    return lines


TECHNIQUE = Technique(
    name="parameter groups",
    key="train.decay_embeddings",  # with `train.weight_decay` and `train.freeze_layers`
    exports=names("param_groups", "decay_parameter_names", "freeze_bottom_layers"),
    functional=names("param_groups", "decay_parameter_names", "freeze_bottom_layers", "embedding_parameter_ids"),
    enabled=_enabled,
    preflight=_preflight,
    setup=_setup,
    card=_card,
)
