"""What the GPU benches share (`gpu_throughput.py`, `gpu_loss.py`, `gpu_checks.py`; `gpu_run.sh` runs them all):
the model shapes, the device line, random token blocks, the FLOP count behind MFU, and results as JSON.

MFU counts 6 * N FLOPs per trained token (forward 2N, backward 4N), with N every parameter that takes part in a
matrix product: all of them except the input embedding lookup (with tied embeddings the shared matrix counts once,
as the output head). Attention's own products (Q K^T and A V, which 6N leaves out) are reported separately as
`mfu_attn`: 6 * L * s * h more FLOPs per token for a causal model at sequence s (half of PaLM's 12 L s h, since a
causal kernel skips the masked half). Peak: 790e12 bf16 dense FLOP/s, the H200 matrix rate measured on this
workplace's machines (an 8192^3 bf16 product, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

PEAK_FLOPS = 790e12

# Llama-3.2 shapes (random weights from the config: nothing is downloaded); `tiny` is the CPU smoke shape
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
LLAMA3_VOCAB = 128256


def use_cuda(tiny: bool) -> bool:
    """CUDA unless `tiny` (the CPU smoke shape always runs on the CPU)."""
    import torch

    return torch.cuda.is_available() and not tiny


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def build_llama(shape: str, vocab: int, seq: int, dtype: Any, device: str, seed: int = 0) -> Any:
    """A Llama of `shape` with random weights, built directly on `device` in `dtype` (no CPU copy first)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(seq, 128), **SHAPES[shape])
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def matmul_params(model: Any) -> int:
    """N of the 6N rule: parameters that enter a matrix product (all but an untied input embedding)."""
    n = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb.weight is not head.weight:
        n -= emb.weight.numel()
    return n


def train_flops_per_token(model: Any, seq: int) -> tuple[float, float]:
    """(6N, 6N + causal attention products) FLOPs per trained token; see the module docstring."""
    c = model.config
    six_n = 6.0 * matmul_params(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attn = 6.0 * c.num_hidden_layers * seq * c.num_attention_heads * head_dim
    return six_n, six_n + attn


def random_blocks(n: int, seq: int, vocab: int, seed: int = 0) -> Any:
    """`n` blocks of `seq` uniform random token ids (int64), the same for every variant given the seed."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq), dtype=np.int64)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write atomically, so a run killed at its time cap leaves the last complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default
