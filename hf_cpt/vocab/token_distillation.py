"""Token Distillation: new input embeddings learnt so the model's hidden states with the new token match those it
computes from the old multi-subword segmentation.

"Token Distillation: Attention-aware Input Embeddings for New Tokens" (Dobler, Elliott & de Melo, ICLR 2026,
arXiv 2505.20133). For a snippet s of domain text, the teacher is the frozen model on the *old* segmentation, the
student the same model on the *new* one, where only the new rows E_new are free. With h^(l) the hidden state after
block l and A(s) the pairs (old position j, new position i) that end at the same character (the same text seen so
far), the rows minimise

    L(E_new) = mean_{s, (j, i) in A(s), i >= first new token of s} || h^(l)_student(s)[i] - h^(l)_teacher(s)[j] ||^2

Heuristic inits (subword means, OFA) only combine existing rows, but a word split into pieces is assembled by the
first transformer layers, not stored in the embedding table; distilling the hidden states recovers it.

Here, unlike the reference (one new phrase merged per snippet), every new token in a snippet is merged at once, so
one forward/backward pass trains all the new tokens it contains: that is what makes 5,000 tokens CPU-feasible.
Snippets are chunks of the domain corpus chosen greedily until each new token has `per_token` of them.

Precision: the forward/backward passes run under bfloat16 autocast where the hardware has fast bfloat16 matrix
products (CPUs with AVX512-BF16/AMX, CUDA GPUs with bf16), which is 2-3x faster on CPU; the new rows, the Adam state
and the loss stay float32, and teacher and student share the precision. `precision="float32"` turns it off.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DistillContext:
    """One snippet, segmented both ways.

    Attributes:
        old_ids: the old tokenizer's ids (teacher input).
        new_ids: the extended tokenizer's ids (student input).
        old_pos / new_pos: aligned positions (same end character) from the first new token on.
    """

    old_ids: list[int]
    new_ids: list[int]
    old_pos: list[int]
    new_pos: list[int]


def _ends(offsets: Sequence[tuple[int, int]]) -> dict[int, int]:
    """End character -> last position ending there (byte pieces of one character share an end)."""
    return {e: k for k, (_, e) in enumerate(offsets)}


def _context(text: str, old_tokenizer: Any, tokenizer: Any, first_new_id: int) -> DistillContext | None:
    old = old_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    new = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    first = next((k for k, i in enumerate(new["input_ids"]) if i >= first_new_id), None)
    if first is None:
        return None
    old_end, new_end = _ends(old["offset_mapping"]), _ends(new["offset_mapping"])
    pairs = sorted((new_end[e], old_end[e]) for e in new_end.keys() & old_end.keys() if new_end[e] >= first)
    if not pairs:
        return None
    return DistillContext(old["input_ids"], new["input_ids"], [j for _, j in pairs], [i for i, _ in pairs])


def mine_distill_contexts(texts: Sequence[str], old_tokenizer: Any, tokenizer: Any, first_new_id: int, *,
                          per_token: int = 2, length: int = 32, seed: int = 0) -> list[DistillContext]:
    """Snippets of `texts` that show every new token (id >= `first_new_id`) `per_token` times where the corpus has
    them: the corpus, segmented with the extended tokenizer, is cut into chunks of `length` tokens; chunks are
    visited in a seeded random order and kept when they hold a new token that still needs contexts."""
    if not any(t and t.strip() for t in texts):
        raise ValueError("`init=distill` needs domain texts to take contexts from (`vocab.corpus` or "
                         "`data.domain.train`); got none")
    chunks: list[tuple[str, set[int]]] = []
    enc = tokenizer([t for t in texts if t and t.strip()], add_special_tokens=False, return_offsets_mapping=True)
    for text, ids, offs in zip([t for t in texts if t and t.strip()], enc["input_ids"], enc["offset_mapping"]):
        for k in range(0, len(ids), length):
            part = ids[k:k + length]
            news = {i for i in part if i >= first_new_id}
            if news:
                chunks.append((text[offs[k][0]:offs[min(k + length, len(ids)) - 1][1]], news))
    random.Random(seed).shuffle(chunks)
    need: dict[int, int] = {}
    out = []
    for text, news in chunks:
        if any(need.get(i, per_token) > 0 for i in news):
            ctx = _context(text, old_tokenizer, tokenizer, first_new_id)
            if ctx is None:
                continue
            out.append(ctx)
            for i in news:
                need[i] = need.get(i, per_token) - 1
    return out


def _block_list(model: Any) -> torch.nn.ModuleList:
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__} for `distill_layer`")


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _hidden(model: Any, block: torch.nn.Module | None, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states after `block`: the forward pass stops there (later blocks are never computed). `None`: the
    base model's output (after the last block and its final norm, as `hidden_states[-1]` in transformers)."""
    if block is None:
        return model.base_model(inputs_embeds=embeds, attention_mask=mask)[0]

    def stop(_module: Any, _inputs: Any, output: Any) -> None:
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    handle = block.register_forward_hook(stop)
    try:
        model.base_model(inputs_embeds=embeds, attention_mask=mask)
    except _Stop as s:
        return s.hidden
    finally:
        handle.remove()
    raise RuntimeError("the forward pass did not reach the distillation layer")


def _batch(contexts: Sequence[DistillContext], which: str, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [getattr(c, which) for c in contexts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids, mask


def _targets(contexts: Sequence[DistillContext], which: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.tensor([r for r, c in enumerate(contexts) for _ in getattr(c, which)], dtype=torch.long)
    cols = torch.tensor([p for c in contexts for p in getattr(c, which)], dtype=torch.long)
    return rows, cols


DISTILL_PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_precision(model: Any, precision: str = "auto") -> str:
    """`auto` -> `bfloat16` when the model is float32 and its device multiplies bfloat16 fast, else `float32`;
    `float32` and `bfloat16` as given (`bfloat16` is honoured even where it is slow).

    Raises:
        ValueError: an unknown precision, or `bfloat16` for a model on neither CPU nor CUDA (no autocast there).
    """
    if precision not in DISTILL_PRECISIONS:
        raise ValueError(f"`distill_precision` must be one of {', '.join(DISTILL_PRECISIONS)}, got {precision!r}")
    param = next(model.parameters())
    device = param.device.type
    if precision == "bfloat16" and device not in ("cpu", "cuda"):
        raise ValueError(f"`distill_precision: bfloat16` needs a CPU or CUDA model, this one is on {param.device}; "
                         "use `float32` or `auto`")
    if precision != "auto":
        return precision
    if device == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        fast = device == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if fast and param.dtype == torch.float32 else "float32"


def init_distill(model: Any, old: torch.Tensor, start: torch.Tensor, contexts: Sequence[DistillContext], *,
                 steps: int = 1, lr: float = 1e-3, batch_size: int = 16, layer: int = -1, seed: int = 0,
                 precision: str = "auto", progress: bool = True,
                 evaluate: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Token Distillation rows for new tokens `len(old)`, `len(old) + 1`, ... (see the module docstring).

    Args:
        model: the live model (its weights are only read; nothing in it changes).
        old: the old input embedding rows [V, d] (frozen).
        start: starting rows for the new tokens [N, d] (e.g. `init_subword_mean`).
        contexts: snippets from `mine_distill_contexts`.
        steps: passes over the contexts.
        lr: Adam learning rate of the new rows.
        batch_size: contexts per forward/backward pass.
        layer: the transformer block whose output is matched (1-based; -1: the final hidden states, after the last
            block and the final norm).
        seed: order of the contexts.
        precision: `auto` (bfloat16 autocast where the device has fast bfloat16, see `resolve_precision`),
            `float32` or `bfloat16`.
        progress: show a tqdm bar.
        evaluate: also measure the mismatch after training on every context (one more forward pass each).

    Returns:
        `(rows [N, d] in old's dtype, stats)`: `mse_first_pass` (mean loss during the first pass) and, with
        `evaluate`, `mse_after`; `bfloat16` is 1.0 when the passes ran under bfloat16 autocast.
    """
    from tqdm.auto import tqdm

    from ..callbacks.progress import bars_disabled

    use_bf16 = resolve_precision(model, precision) == "bfloat16"
    device_type = next(model.parameters()).device.type

    # -1: the model's final hidden states (normalised, what the head reads), as the reference's default
    block = None if layer == -1 else _block_list(model)[layer if layer < 0 else layer - 1]
    n_old = old.shape[0]
    dtype = next(model.parameters()).dtype
    table = old.detach().to(dtype)
    new = torch.nn.Parameter(start.detach().float().clone())
    opt = torch.optim.Adam([new], lr=lr)
    pad = 0
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()  # no dropout: teacher and student see the same function
    for p in model.parameters():
        p.requires_grad_(False)
    order = list(range(len(contexts)))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    teacher: dict[int, torch.Tensor] = {}

    def embed(ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= n_old
        out = table[ids.clamp(max=n_old - 1)]
        return torch.where(is_new[..., None], new[(ids - n_old).clamp(min=0)].to(dtype), out)

    def mismatch(b: int) -> torch.Tensor:
        chunk = [contexts[k] for k in batches[b]]
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
            if b not in teacher:
                with torch.no_grad():
                    ids, mask = _batch(chunk, "old_ids", pad)
                    h = _hidden(model, block, table[ids], mask)
                    teacher[b] = h[_targets(chunk, "old_pos")].detach()
            ids, mask = _batch(chunk, "new_ids", pad)
            h = _hidden(model, block, embed(ids), mask)
        return torch.nn.functional.mse_loss(h[_targets(chunk, "new_pos")].float(), teacher[b].float())

    stats: dict[str, float] = {"contexts": float(len(contexts)), "bfloat16": float(use_bf16)}
    try:
        rng = random.Random(seed)
        bar = tqdm(total=steps * len(batches), desc="token distillation",
                   disable=not progress or bars_disabled())  # redirected: no carriage returns in the log
        first: list[float] = []
        for step in range(steps):
            visit = list(range(len(batches)))
            if step:
                rng.shuffle(visit)
            for b in visit:
                loss = mismatch(b)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step == 0:
                    first.append(loss.item())
                bar.update(1)
                bar.set_postfix(mse=f"{first[-1] if step == 0 else loss.item():.4f}")
        bar.close()
        if first:
            stats["mse_first_pass"] = sum(first) / len(first)
        if evaluate:
            with torch.no_grad():
                after = [float(mismatch(b)) for b in range(len(batches))]
            stats["mse_after"] = sum(after) / max(len(after), 1)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    return new.detach().to(old.dtype), stats


def distill_mismatch(model: Any, old: torch.Tensor, rows: torch.Tensor, contexts: Sequence[DistillContext], *,
                     layer: int = -1, batch_size: int = 16, precision: str = "auto") -> float:
    """The mean hidden-state mismatch `init_distill` minimises, for given new rows (e.g. to compare inits)."""
    _, stats = init_distill(model, old, rows, contexts, steps=0, layer=layer, batch_size=batch_size,
                            precision=precision, progress=False, evaluate=True)
    return stats["mse_after"]
