"""Merging a PEFT LoRA adapter into its base, streamed tensor by tensor (the reader and writer of
`hf_cpt.merge`), at a strength alpha:

    W(alpha) = W + alpha * scale * (B @ A)        scale = lora_alpha / r  (lora_alpha / sqrt(r) with use_rslora)

alpha 1 is peft's `merge_and_unload`, alpha 0 the base bitwise. `modules_to_save` (and trained biases) are
interpolated whole, peft's trainable-token rows towards their saved values; a saved copy of a head the base ties
to its embedding is written untied, as peft's merge does. DoRA, LoRA biases and LoRA on embeddings or
convolutions are refused, naming the fix. A pure core: torch and safetensors, no peft or transformers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .merge import (CheckpointReader, MergeSummary, check_alpha, checkpoint_layout, interpolate_tensor, tied_partner,
                    write_checkpoint)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, fan_in_fan_out: bool = False
               ) -> torch.Tensor:
    """The float32 weight update `scale * (B @ A)` of one LoRA Linear (transposed when the layer stores
    `fan_in_fan_out`, e.g. GPT-2's Conv1D).

    Args:
        lora_a: `(r, in)`. lora_b: `(out, r)`. scale: `lora_alpha / r`, or `lora_alpha / sqrt(r)` (rsLoRA).
    """
    delta = (lora_b.to(torch.float32) @ lora_a.to(torch.float32)) * scale
    return delta.T if fan_in_fan_out else delta


def lora_scale(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """peft's LoRA scaling: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


# --- merging a LoRA adapter -----------------------------------------------------------------------------------------
@dataclass
class LoraPlan:
    """How each base key changes under an adapter: LoRA pairs, whole tensors, trainable-token rows."""

    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)  # base key -> (lora_A key, lora_B key)
    whole: dict[str, str] = field(default_factory=dict)  # base key -> adapter key (modules_to_save, biases)
    tokens: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # base key -> (delta key, rows)
    untied: dict[str, tuple[str, str]] = field(default_factory=dict)  # head the base ties -> (adapter key, embedding)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """`adapter_config.json` of a PEFT LoRA adapter, refusing what this merge does not support.

    Raises:
        ValueError: not LoRA, DoRA, LoRA biases, or a setting the merge cannot honour.
    """
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{str(adapter_dir)!r} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    config = json.loads(path.read_text(encoding="utf-8"))
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise ValueError(f"{str(adapter_dir)!r} is a {kind} adapter: only LoRA adapters can be merged "
                         "(merge it with peft's `merge_and_unload` and pass the saved model instead)")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(flag):
            raise ValueError(f"{str(adapter_dir)!r} uses {what} (`{flag}: true`), which `hf-cpt merge` does not "
                             "merge: merge it with peft's `merge_and_unload`, save, and merge that model")
    if config.get("layer_replication"):
        raise ValueError(f"{str(adapter_dir)!r} uses `layer_replication`: not supported by `hf-cpt merge`")
    if (Path(adapter_dir) / ADAPTER_WEIGHTS).is_file() is False:
        raise FileNotFoundError(f"{str(adapter_dir)!r} has no {ADAPTER_WEIGHTS} (safetensors only)")
    return config


def plan_lora_merge(adapter_keys: Iterable[str], base_keys: Iterable[str], config: Mapping[str, Any]) -> LoraPlan:
    """Match every adapter tensor to the base tensor it changes.

    Raises:
        ValueError: LoRA on a non-Linear layer (embedding, convolution), or adapter tensors matching no base key.
    """
    base_keys = set(base_keys)
    plan = LoraPlan()
    halves: dict[str, dict[str, str]] = {}
    unmatched = []
    for key in adapter_keys:
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".lora_embedding_" in name or ".lora_magnitude_vector" in name:
            raise ValueError(f"adapter tensor `{key}` is a LoRA on an embedding (or DoRA): only Linear LoRA layers "
                             "are merged; merge it with peft's `merge_and_unload` instead")
        lora = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if lora:
            halves.setdefault(f"{lora.group(1)}.weight", {})[lora.group(2)] = key
            continue
        tokens = re.fullmatch(r"(.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?", name)
        if tokens:
            target = f"{tokens.group(1)}.weight"
            plan.tokens[target] = (key, _token_rows(config.get("trainable_token_indices"), tokens.group(1)))
            continue
        target = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
        if target in base_keys:
            plan.whole[target] = key
        elif tied_partner(target, base_keys) is not None:
            # a saved copy of a head the base ties to its embedding: the merge unties it, as peft's does
            plan.untied[target] = (key, tied_partner(target, base_keys))
        else:
            unmatched.append(key)
    for target, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter for `{target}` has lora_{''.join(pair)} only: the adapter file is incomplete")
        if target not in base_keys:
            unmatched.append(pair["A"])
            continue
        plan.pairs[target] = (pair["A"], pair["B"])
    if unmatched:
        raise ValueError(f"adapter tensors that match no tensor of the base model (another base?): "
                         f"{', '.join(sorted(unmatched)[:5])}")
    return plan


def _token_rows(indices: Any, module: str) -> list[int]:
    if isinstance(indices, Mapping):
        found = [v for k, v in indices.items() if module == k or module.endswith("." + k)]
        if len(found) != 1:
            raise ValueError(f"`trainable_token_indices` names no single entry for `{module}`: {indices}")
        return [int(i) for i in found[0]]
    if not indices:
        raise ValueError(f"the adapter trains token rows of `{module}` but `trainable_token_indices` is empty")
    return [int(i) for i in indices]


def _module_scale(target: str, rank: int, config: Mapping[str, Any]) -> float:
    """peft's scale for one module: `alpha_pattern` entries (matched like peft: the key ends the module name)
    override `lora_alpha`; the rank comes from the tensor shapes (so `rank_pattern` is honoured)."""
    module = target[: -len(".weight")]
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return lora_scale(alpha, rank, bool(config.get("use_rslora")))


def merge_lora_checkpoint(base_dir: str | Path, adapter_dir: str | Path, output_dir: str | Path,
                          alpha: float = 1.0) -> MergeSummary:
    """Write the base with a PEFT LoRA adapter merged at strength `alpha` into `output_dir` (weights only), tensor
    by tensor: `W + alpha * scale * B @ A` for LoRA Linears, `lerp(W, saved, alpha)` for `modules_to_save`,
    biases and trainable-token rows. The output's keys and layout follow the base checkpoint.

    Args:
        base_dir: the model the adapter was trained on (safetensors).
        adapter_dir: `adapter_config.json` + `adapter_model.safetensors`.
        alpha: 1: the adapter fully merged (peft's `merge_and_unload`), 0: the base bitwise.
    """
    alpha = check_alpha(alpha)
    config = read_adapter_config(adapter_dir)
    base, adapter = CheckpointReader(base_dir), CheckpointReader(adapter_dir, ADAPTER_WEIGHTS)
    plan = plan_lora_merge(adapter.keys(), base.keys(), config)
    for target, key in plan.whole.items():
        if base.spec(target)[1] != adapter.spec(key)[1]:
            raise ValueError(f"adapter tensor `{key}` has shape {adapter.spec(key)[1]} but the base's `{target}` "
                             f"has {base.spec(target)[1]}: the adapter was trained on another base")
    for target, (a_key, _) in plan.pairs.items():
        if len(adapter.spec(a_key)[1]) != 2:
            raise ValueError(f"adapter tensor `{a_key}` is not a Linear LoRA (shape {adapter.spec(a_key)[1]}): "
                             "LoRA on convolutions is not merged; use peft's `merge_and_unload`")
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    specs = {k: base.spec(k) for k in base.keys()}
    specs.update({head: base.spec(partner) for head, (_, partner) in plan.untied.items()})

    def produce(key: str) -> torch.Tensor:
        if key in plan.untied:
            saved, partner = plan.untied[key]
            weight = base.get(partner)
            return interpolate_tensor(weight, adapter.get(saved).to(weight.dtype), alpha, name=key)
        weight = base.get(key)
        if key in plan.pairs:
            a, b = adapter.get(plan.pairs[key][0]), adapter.get(plan.pairs[key][1])
            delta = lora_delta(a, b, _module_scale(key, a.shape[0], config), fan_in_fan_out)
            # W + alpha * delta in float32: alpha 0 is W exactly, alpha 1 is peft's `W + delta`
            return torch.add(weight.to(torch.float32), delta, alpha=alpha).to(weight.dtype)
        if key in plan.whole:
            return interpolate_tensor(weight, adapter.get(plan.whole[key]).to(weight.dtype), alpha, name=key)
        if key in plan.tokens:
            delta_key, rows = plan.tokens[key]
            index = torch.tensor(rows, dtype=torch.long)
            saved = weight.index_copy(0, index, adapter.get(delta_key).to(weight.dtype))
            return interpolate_tensor(weight, saved, alpha, name=key)
        return weight

    layout, sharded = checkpoint_layout(base, specs, {head: partner for head, (_, partner) in plan.untied.items()})
    summary = MergeSummary(alpha=alpha, kind="lora", tied={h: p for h, (_, p) in plan.untied.items()})
    summary.files = write_checkpoint(output_dir, layout, specs, produce, sharded)
    summary.tensors = len(specs)
    summary.lora_modules = len(plan.pairs)
    return summary


__all__ = ["LoraPlan", "lora_delta", "lora_scale", "merge_lora_checkpoint", "plan_lora_merge",
           "read_adapter_config"]
