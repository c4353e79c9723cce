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

PEFT LoRA adapters are merged by `hf_cpt.merge_lora` with the same reader and writer.

This module is a pure core: torch and safetensors, no transformers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
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
            del tensor, data  # freed before the next one is produced: one tensor in memory at a time
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


def checkpoint_layout(reader: CheckpointReader, keys: Iterable[str], extra: Mapping[str, str] | None = None
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

    layout, sharded = checkpoint_layout(adapted, specs)
    summary.files = write_checkpoint(output_dir, layout, specs, produce, sharded)
    summary.tensors = len(specs)
    return summary


__all__ = ["CheckpointReader", "MergeSummary", "check_alpha", "interpolate_tensor", "merge_checkpoints",
           "checkpoint_layout", "tied_partner", "write_checkpoint", "write_safetensors"]
