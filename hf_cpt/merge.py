"""Merging an adapted model with its base, streamed tensor by tensor through safetensors.

Weight interpolation (WiSE-FT, "Robust fine-tuning of zero-shot models", Wortsman et al. 2022; the task-vector
view of "Editing Models with Task Arithmetic", Ilharco et al. 2023) trades the domain gain against forgetting
after training, with no data:

    W(alpha) = W_base + alpha * (W_adapted - W_base)        alpha = 0: the base, alpha = 1: the adapted model

Each tensor is computed with `torch.lerp` in float32 and cast back to the stored dtype; lerp is exact at both
ends (it computes `end - (end - start) * (1 - w)` for w >= 0.5), so alpha 0 gives the base and alpha 1 the adapted
model bit for bit. Memory: one output tensor and its two inputs (plus, for LoRA, `B @ A`) at a time — the output
files are written header first (every shape and dtype is known from the inputs' headers) and then one tensor
after another, so a 70B merge never holds a shard.

Rows the base does not have (a vocabulary-extended embedding or untied head: adapted rows > base rows, the
same trailing shape) are taken from the adapted model; so are rows from `new_rows_from` on (new tokens that took
padding rows the base had). A key stored on one side only because of weight tying (a tied head is not saved)
is read from its tied partner; any other key mismatch is refused, naming the keys.

A PEFT LoRA adapter merges as `W + alpha * scale * (B @ A)` with `scale = lora_alpha / r` (`/ sqrt(r)` with
`use_rslora`), `modules_to_save` (and trained biases) interpolated whole, and peft's trainable-token rows
interpolated towards their saved values. DoRA, LoRA biases and LoRA on embeddings or convolutions are refused.

This module is a pure core: torch and safetensors, no transformers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# names of input embeddings and output heads across architectures: a head missing from one checkpoint is tied
# to the embedding of the same model (transformers does not save a tied head)
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                      "tok_embeddings.weight", "shared.weight")
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight", "output.weight")
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


# --- pure tensor functions ------------------------------------------------------------------------------------------
def interpolate_tensor(base: torch.Tensor, adapted: torch.Tensor, alpha: float,
                       new_rows_from: int | None = None, name: str = "tensor") -> torch.Tensor:
    """`base + alpha * (adapted - base)` in float32, cast to `adapted`'s dtype; rows the base lacks (and rows from
    `new_rows_from` on) come from `adapted`.

    Args:
        base: the base model's tensor.
        adapted: the adapted model's tensor: the same shape, or more rows (dim 0) with the same trailing shape.
        alpha: 0 gives `base`, 1 gives `adapted` (both exactly); other values extrapolate or interpolate.
        new_rows_from: rows `>= new_rows_from` are taken from `adapted` (new tokens placed in padding rows).
        name: the key, for error messages.
    """
    check_alpha(alpha)
    if base.shape[1:] != adapted.shape[1:] or base.dim() != adapted.dim() or adapted.shape[:1] < base.shape[:1]:
        raise ValueError(f"`{name}` has shape {tuple(base.shape)} in the base and {tuple(adapted.shape)} in the "
                         "adapted model: only extra rows (an extended vocabulary) can differ")
    if not adapted.is_floating_point():
        if not torch.equal(base, adapted):
            raise ValueError(f"`{name}` is an integer tensor that differs between base and adapted model: "
                             "nothing to interpolate")
        return adapted.clone()
    rows = base.shape[0] if base.dim() else None
    head = adapted[:rows] if rows is not None else adapted
    out = torch.lerp(base.to(torch.float32), head.to(torch.float32), float(alpha)).to(adapted.dtype)
    if rows is not None and adapted.shape[0] > rows:
        out = torch.cat([out, adapted[rows:]])
    if new_rows_from is not None and out.dim() and new_rows_from < out.shape[0]:
        out[new_rows_from:] = adapted[new_rows_from:]
    return out


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


def check_alpha(alpha: float) -> float:
    """`alpha` must be a finite number (values outside [0, 1] extrapolate)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"`alpha` must be a finite number (0: the base, 1: the adapted model), got {alpha!r}")
    return float(alpha)


# --- reading and writing safetensors checkpoints --------------------------------------------------------------------
class CheckpointReader:
    """The tensors of a safetensors checkpoint directory (`model.safetensors`, or shards listed in
    `model.safetensors.index.json`; or one named file), read one tensor at a time from memory-mapped files."""

    def __init__(self, directory: str | Path, filename: str | None = None) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / SAFE_INDEX
        if filename is not None:
            files = [filename]
        elif index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.directory / SAFE_SINGLE).is_file():
            files = [SAFE_SINGLE]
        else:
            found = sorted(p.name for p in self.directory.glob("*.bin")) if self.directory.is_dir() else []
            raise FileNotFoundError(f"{str(self.directory)!r} has no {SAFE_SINGLE} or {SAFE_INDEX}"
                                    + (f" (only {found[0]}: convert it to safetensors first)" if found else ""))
        self.files = files
        self._handles = {f: safe_open(str(self.directory / f), framework="pt") for f in files}
        self.file_of: dict[str, str] = {}
        for f, handle in self._handles.items():
            for key in handle.keys():
                self.file_of[key] = f
        self.metadata = self._handles[files[0]].metadata() or {}

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.file_of[key]].get_tensor(key)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """`(dtype, shape)` from the header, without reading the tensor."""
        piece = self._handles[self.file_of[key]].get_slice(key)
        dtype = piece.get_dtype()
        if dtype not in _DTYPES:
            raise ValueError(f"`{key}` has safetensors dtype {dtype}, which hf-cpt cannot merge")
        return _DTYPES[dtype], tuple(piece.get_shape())


def write_safetensors(path: str | Path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Write a safetensors file whose tensors come one at a time from `produce(key)`: the header (every key's
    dtype and shape, from `specs`) first, then each tensor's bytes, so only one tensor is in memory at once.

    Returns:
        the bytes of tensor data written.
    """
    order = sorted(specs, key=lambda k: (-_itemsize(specs[k][0]), k))  # widest first: every offset aligned
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        dtype, shape = specs[key]
        size = math.prod(shape) * _itemsize(dtype)
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for key in order:
            tensor = produce(key)
            dtype, shape = specs[key]
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{key}: produced {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                fh.write(memoryview(data.view(torch.uint8).numpy()))
    return offset


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def write_checkpoint(output_dir: str | Path, layout: Mapping[str, list[str]],
                     specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                     produce: Callable[[str], torch.Tensor], sharded: bool) -> list[str]:
    """Write the tensors `layout` assigns to each file (`{file name: keys}`) into `output_dir`, with a
    `model.safetensors.index.json` when `sharded`. Returns the files written."""
    out = Path(output_dir)
    total = 0
    weight_map = {}
    for name, keys in layout.items():
        total += write_safetensors(out / name, {k: specs[k] for k in keys}, produce, {"format": "pt"})
        weight_map.update({k: name for k in keys})
    if sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return list(layout)


def _layout(reader: CheckpointReader, keys: Iterable[str], extra: Mapping[str, str] | None = None
            ) -> tuple[dict[str, list[str]], bool]:
    """The output files mirror `reader`'s: `{file: keys}`, and whether it is sharded."""
    layout: dict[str, list[str]] = {f: [] for f in reader.files}
    for key in keys:
        layout[reader.file_of.get(key) or reader.file_of[(extra or {})[key]]].append(key)
    sharded = (reader.directory / SAFE_INDEX).is_file()
    if not sharded:
        layout = {SAFE_SINGLE: [k for ks in layout.values() for k in ks]}
    return {f: ks for f, ks in layout.items() if ks}, sharded


def tied_partner(key: str, available: Iterable[str]) -> str | None:
    """The input embedding a missing output head `key` is tied to, among `available` keys (same prefix)."""
    suffix = next((s for s in HEAD_SUFFIXES if key == s or key.endswith("." + s)), None)
    if suffix is None:
        return None
    candidates = [k for k in available if any(k == s or k.endswith("." + s) for s in EMBEDDING_SUFFIXES)]
    return candidates[0] if len(candidates) == 1 else None


# --- merging full checkpoints ---------------------------------------------------------------------------------------
@dataclass
class MergeSummary:
    """What a merge wrote: the tensors interpolated, those taken from one side, the files."""

    alpha: float
    kind: str  # "full" or "lora"
    tensors: int = 0
    extended_rows: dict[str, list[int]] = field(default_factory=dict)  # key -> [base rows, adapted rows]
    # output key -> the key it was read from on the side that ties it (the output unties that head)
    tied: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # keys not written (a tied head of the other side)
    lora_modules: int = 0
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("alpha", "kind", "tensors", "extended_rows", "tied", "dropped",
                                                "lora_modules", "files")}


def merge_checkpoints(base_dir: str | Path, adapted_dir: str | Path, output_dir: str | Path, alpha: float,
                      new_rows_from: int | None = None) -> MergeSummary:
    """Write `base + alpha * (adapted - base)` of two safetensors checkpoints of one architecture into
    `output_dir` (an existing directory; weights only), tensor by tensor. The output's keys and shard layout
    follow the adapted checkpoint.

    Args:
        base_dir / adapted_dir: directories with `model.safetensors` or a sharded index.
        alpha: 0: the base, 1: the adapted model (both bitwise); see the module docstring.
        new_rows_from: rows of the vocabulary matrices (embeddings, heads, and any tensor whose row count
            differs) from this index on are taken from the adapted model.

    Raises:
        ValueError: keys on one side only (not explained by tying), or shapes that differ beyond extra rows.
    """
    alpha = check_alpha(alpha)
    base, adapted = CheckpointReader(base_dir), CheckpointReader(adapted_dir)
    summary = MergeSummary(alpha=alpha, kind="full")
    source = {k: k for k in adapted.keys() if k in base}
    for key in adapted.keys():
        if key not in base:
            partner = tied_partner(key, base.keys())
            if partner is None:
                continue
            source[key] = summary.tied[key] = partner
    for key in base.keys():
        if key not in adapted and tied_partner(key, adapted.keys()) is not None:
            summary.dropped.append(key)
    only_adapted = sorted(set(adapted.keys()) - set(source))
    only_base = sorted(set(base.keys()) - set(adapted.keys()) - set(summary.dropped))
    if only_adapted or only_base:
        raise ValueError("the base and adapted checkpoints hold different tensors (not one architecture?): "
                         + "; ".join(f"only in the {side}: {', '.join(keys[:5])}"
                                     + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                                     for side, keys in (("adapted model", only_adapted), ("base", only_base)) if keys))
    specs = {k: adapted.spec(k) for k in source}
    for key, (_, shape) in specs.items():
        base_shape = base.spec(source[key])[1]
        if base_shape != shape:
            if shape[1:] != base_shape[1:] or not shape or shape[0] < base_shape[0]:
                raise ValueError(f"`{key}` has shape {base_shape} in the base and {shape} in the adapted model: "
                                 "only extra rows (an extended vocabulary) can differ")
            summary.extended_rows[key] = [base_shape[0], shape[0]]
    vocab_keys = set(summary.extended_rows) | {k for k in source if any(
        k == s or k.endswith("." + s) for s in EMBEDDING_SUFFIXES + HEAD_SUFFIXES)}

    def produce(key: str) -> torch.Tensor:
        rows_from = new_rows_from if key in vocab_keys else None
        return interpolate_tensor(base.get(source[key]), adapted.get(key), alpha, rows_from, name=key)

    layout, sharded = _layout(adapted, specs)
    summary.files = write_checkpoint(output_dir, layout, specs, produce, sharded)
    summary.tensors = len(specs)
    return summary


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

    layout, sharded = _layout(base, specs, {head: partner for head, (_, partner) in plan.untied.items()})
    summary = MergeSummary(alpha=alpha, kind="lora", tied={h: p for h, (_, p) in plan.untied.items()})
    summary.files = write_checkpoint(output_dir, layout, specs, produce, sharded)
    summary.tensors = len(specs)
    summary.lora_modules = len(plan.pairs)
    return summary


__all__ = ["CheckpointReader", "MergeSummary", "interpolate_tensor", "lora_delta", "lora_scale",
           "merge_checkpoints", "merge_lora_checkpoint", "plan_lora_merge", "read_adapter_config", "tied_partner",
           "write_safetensors"]
