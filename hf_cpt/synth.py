"""Self-synthesised general data: the model writes its own replay text before it is adapted.

Continual pretraining forgets what the original pretraining data taught, and that data is rarely available.
"Mitigating Catastrophic Forgetting in Large Language Models with Self-Synthesized Rehearsal" (Huang et al.,
ACL 2024) replays text sampled from the model itself instead. Here the base model samples documents

    x ~ p_base(. | prompt),   prompt = start token, or start token + a short neutral seed phrase,

with temperature / nucleus sampling, and the documents serve as the general replay stream (`train_tokens`) and as
a held-out set on which forgetting is measured (`eval_tokens`), with no corpus at all.

Choices (documented because they change the text):

* Start token: the token the tokenizer prepends itself (`<s>` for Llama-2), else its BOS token, else its EOS token
  (the document separator `hf_cpt` packs between documents, so what follows it is a new document).
* Seed prompts (`hf_cpt/data/synth/seeds.txt`) stay in the document: "The history of Rome ..." reads as a text,
  "Rome ..." without its opening does not. BOS-prompted documents are the continuation alone.
* A document ends at the first EOS or after `max_new_tokens`; special tokens are not part of its text.
* Tokens are counted as training counts them: `len(tokenizer(text, add_special_tokens=False).input_ids)`, without
  the EOS separator packing adds.
* Dedup (on by default) drops every line whose normalised form (lower case, punctuation removed, whitespace
  collapsed) was already seen in this set, then documents left empty. It removes the loops and boilerplate small
  models fall into; it also drops legitimately repeated short lines (`}`, `Yes.`), which replay can spare.

`load_or_synthesize` caches the documents (`$HF_CPT_CACHE/synth/*.jsonl.gz`, one `{"text": ...}` per line like
the embedded corpora) keyed by the weights, the vocabulary and every setting, so a run restarts without sampling
again. Train and eval sets use different seeds (`split_seeds`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .registry import Technique, names
from .validation import check_bool, check_choice, check_int, check_number

if TYPE_CHECKING:  # pragma: no cover
    from .config import CPTConfig

logger = logging.getLogger(__name__)
SELF = "self"  # `data.general.train: self`: replay text the base model writes itself (`data.synth`)
PROMPT_KINDS = ("bos", "seeds", "both")
# a round that keeps no token counts as stalled; this many in a row means the model cannot produce new text
MAX_STALLED_ROUNDS = 8
_CACHE_VERSION = 1


@dataclass
class SynthConfig:
    """Self-synthesised replay (generative rehearsal): the base model samples general text before training.

    From "Mitigating Catastrophic Forgetting in Large Language Models with Self-Synthesized Rehearsal" (Huang et
    al., ACL 2024): documents x ~ p_base(. | prompt) replace the unavailable pretraining data.
    """

    train_tokens: int = field(default=0, metadata={"help": "Tokens of synthetic replay text (0: none)."})
    eval_tokens: int = field(default=0, metadata={"help": "Tokens of a synthetic held-out set to measure forgetting "
                                                          "on (0: none)."})
    prompts: Literal["bos", "seeds", "both"] = field(
        default="both", metadata={"help": "Generate from the start token (`bos`), from short neutral opening "
                                          "phrases (`seeds`), or half and half (`both`)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0); 1 samples the model's "
                                                                "own distribution."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass in (0, 1]."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest generated document, in tokens."})
    batch_size: int = field(default=16, metadata={"help": "Documents generated per `generate` call."})
    seed: int = field(default=0, metadata={"help": "Sampling seed; train and eval sets derive disjoint seeds from "
                                                   "it."})
    dedup: bool = field(default=True, metadata={"help": "Drop lines already seen (normalised) and empty "
                                                        "documents."})

    def __post_init__(self) -> None:
        check_int("train_tokens", self.train_tokens, minimum=0)
        check_int("eval_tokens", self.eval_tokens, minimum=0)
        if self.train_tokens == 0 and self.eval_tokens == 0:
            raise ValueError("`train_tokens` / `eval_tokens`: at least one must be > 0 to synthesise any text, "
                             "got 0 and 0")
        check_choice("prompts", self.prompts, PROMPT_KINDS)
        self.temperature = check_number("temperature", self.temperature, 0.0, min_inclusive=False)
        self.top_p = check_number("top_p", self.top_p, 0.0, 1.0, min_inclusive=False)
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_bool("dedup", self.dedup)

    def synthesis_kwargs(self) -> dict[str, Any]:
        """The settings `synthesize_text` takes, as keyword arguments."""
        return {"prompts": self.prompts, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size, "dedup": self.dedup}


def split_seeds(seed: int) -> tuple[int, int]:
    """`(train_seed, eval_seed) = (2 * seed, 2 * seed + 1)`: even vs odd, so no seed's eval set ever shares a sampling
    stream with any seed's train set."""
    return 2 * seed, 2 * seed + 1


def load_seed_prompts() -> list[str]:
    """The neutral opening phrases shipped in `hf_cpt/data/synth/seeds.txt` (one per line)."""
    text = resources.files("hf_cpt").joinpath("data/synth/seeds.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


# --- pure core ------------------------------------------------------------------------------------------------------
def synthesize_text(
    model: Any,
    tokenizer: Any,
    n_tokens: int,
    *,
    prompts: str = "both",
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    dedup: bool = True,
    progress: bool = True,
) -> list[str]:
    """Sample documents from `model` until they hold at least `n_tokens` tokens.

    Batched `model.generate` (sampling, KV cache, left padding). Stops at the document that reaches the budget, so
    the total is in `[n_tokens, n_tokens + longest document)`. The global RNG is untouched and a fixed `seed` gives
    the same text (for the same model, settings and device). The model is put in eval mode and restored.

    Args:
        model: any causal LM (`model.can_generate()`).
        tokenizer: its tokenizer (counts tokens like training does, decodes the samples).
        n_tokens: token budget (>= 1).
        prompts: `bos`, `seeds` or `both` (see the module docstring).
        temperature: sampling temperature (> 0).
        top_p: nucleus mass in (0, 1] (top-k sampling is off).
        max_new_tokens: longest document, in generated tokens.
        batch_size: documents per `generate` call.
        seed: sampling seed.
        dedup: drop lines seen before (normalised) and empty documents.
        progress: show a progress bar (tokens/s; off when output is redirected, see [`PhaseBar`]).

    Raises:
        ValueError: for an encoder (masked-LM) model or a bad argument.
        RuntimeError: if `MAX_STALLED_ROUNDS` rounds in a row keep no token (e.g. a model that only emits EOS).
    """
    _check_can_generate(model)
    check_int("n_tokens", n_tokens, minimum=1)
    check_choice("prompts", prompts, PROMPT_KINDS)
    check_number("temperature", temperature, 0.0, min_inclusive=False)
    check_number("top_p", top_p, 0.0, 1.0, min_inclusive=False)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    from .callbacks.progress import PhaseBar

    start, pad, eos = _special_ids(tokenizer)
    seeds = load_seed_prompts() if prompts != "bos" else []
    choose = torch.Generator().manual_seed(seed)  # prompt choice: its own stream, independent of sampling
    device = next(model.parameters()).device
    docs: list[str] = []
    seen: set[str] = set()
    total = stalled = 0
    was_training = model.training
    model.eval()
    bar = PhaseBar("Synthesising general text", total=n_tokens, unit="tok", progress=progress)
    try:
        with _forked_rng(device, seed), torch.no_grad():
            while total < n_tokens:
                texts = [_prompt_text(prompts, seeds, choose) for _ in range(batch_size)]
                ids, mask, prompt_ids = _left_padded(tokenizer, texts, start, pad, device)
                sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
                kept = 0
                for new_ids, p_ids in zip(_sample(model, ids, mask, pad, eos, **sampling), prompt_ids):
                    doc = _document(tokenizer, p_ids, new_ids, eos, seen if dedup else None)
                    if doc is None:
                        continue
                    n = len(tokenizer(doc, add_special_tokens=False)["input_ids"])
                    docs.append(doc)
                    total += n
                    kept += n
                    if total >= n_tokens:
                        break
                bar.update(tokens=min(kept, n_tokens - bar.tokens))
                stalled = stalled + 1 if kept == 0 else 0
                if stalled >= MAX_STALLED_ROUNDS:
                    raise RuntimeError(
                        f"self-synthesis stalled: {stalled} rounds of {batch_size} samples in a row kept no text "
                        f"({total} of {n_tokens} tokens so far); the model emits only EOS/special tokens or "
                        "repeats itself. Raise `temperature`, use `prompts: seeds`, or use a text corpus for "
                        "`data.general`"
                    )
    finally:
        bar.close()
        model.train(was_training)
    return docs


def _sample(model: Any, ids: torch.Tensor, mask: torch.Tensor, pad: int, eos: int | None,
            **sampling: Any) -> list[list[int]]:
    """The new token ids of each row: nucleus sampling (top-k off) with the KV cache."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, use_cache=True,
                         pad_token_id=pad, eos_token_id=eos, **sampling)
    return out[:, ids.shape[1]:].tolist()


def _check_can_generate(model: Any) -> None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", "") or type(model).__name__
    can = getattr(model, "can_generate", None)
    if getattr(cfg, "is_encoder_decoder", False):
        kind = "an encoder-decoder"
    elif can is None or not can():
        kind = "an encoder"
    else:
        return
    raise ValueError(f"self-synthesised data needs a causal (generating) model; {name} is {kind}: use a text corpus "
                     "for `data.general`")


def _special_ids(tokenizer: Any) -> tuple[int, int, int | None]:
    """(start token, pad id, eos id): see the module docstring for the start token."""
    eos = tokenizer.eos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(probe) > len(plain) and probe[0] in tokenizer.all_special_ids:
        start = probe[0]
    elif tokenizer.bos_token_id is not None:
        start = tokenizer.bos_token_id
    elif eos is not None:
        start = eos
    else:
        raise ValueError("the tokenizer has no BOS or EOS token to start a document from")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else start)
    return start, pad, eos


def _prompt_text(prompts: str, seeds: list[str], gen: torch.Generator) -> str:
    if prompts == "bos" or (prompts == "both" and torch.rand((), generator=gen) < 0.5):
        return ""
    return seeds[int(torch.randint(len(seeds), (), generator=gen))]


def _left_padded(tokenizer: Any, texts: list[str], start: int, pad: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    # built by hand rather than with `padding_side="left"`: the caller's tokenizer is left as it was
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in texts]
    rows = [[start] + p for p in prompt_ids]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device), prompt_ids


def _document(tokenizer: Any, prompt_ids: list[int], new_ids: list[int], eos: int | None,
              seen: set[str] | None) -> str | None:
    """Prompt + continuation up to the first EOS, deduplicated; None if nothing new is left."""
    if eos is not None and eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    if not tokenizer.decode(new_ids, skip_special_tokens=True).strip():
        return None
    # decoded together: a SentencePiece continuation decoded alone would lose its leading space
    doc = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True).strip()
    if seen is not None:
        doc = dedup_lines(doc, seen)
    return doc or None


def normalize_line(line: str) -> str:
    """The key near-duplicate lines share: lower case, punctuation removed, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", line.lower()).split())


def dedup_lines(text: str, seen: set[str]) -> str:
    """`text` without the lines whose `normalize_line` key is in `seen` (which is updated); blank lines stay."""
    out = []
    for line in text.splitlines():
        key = normalize_line(line)
        if key and key in seen:
            continue
        if key:
            seen.add(key)
        out.append(line)
    return "\n".join(out).strip()


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


# --- cache ----------------------------------------------------------------------------------------------------------
def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes (tied weights once): changes with any weight.

    About 1 s for SmolLM2-135M (540 MB of fp32) on one CPU core.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def vocab_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary and special tokens."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens,
               "class": type(tokenizer).__name__}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def default_cache_dir() -> Path:
    """`$HF_CPT_CACHE/synth`, default `~/.cache/hf_cpt/synth` (the cache the embedded model uses)."""
    root = os.environ.get("HF_CPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hf_cpt")
    return Path(root) / "synth"


def load_or_synthesize(
    model: Any,
    tokenizer: Any,
    cfg: SynthConfig,
    n_tokens: int,
    seed: int,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[str]:
    """[`synthesize_text`] with `cfg`'s settings, cached on disk.

    The cache file is named by a hash of the weights ([`weights_fingerprint`]), the vocabulary, every generation
    setting, the seed prompts, `n_tokens` and `seed`; it is written to a temp file and renamed, so a crash never
    leaves a half-written set. A hit does no generation.

    Args:
        model: the base causal LM (before any training).
        tokenizer: its tokenizer.
        cfg: generation settings (`train_tokens`, `eval_tokens` and `cfg.seed` are not read: pass `n_tokens` and
            `seed`, e.g. `split_seeds(cfg.seed)[0]` with `cfg.train_tokens`).
        n_tokens: token budget.
        seed: sampling seed.
        cache_dir: folder of the cache files; default [`default_cache_dir`].
        progress: show a progress bar while sampling.
    """
    settings = cfg.synthesis_kwargs()
    key = {"version": _CACHE_VERSION, "weights": weights_fingerprint(model), "vocab": vocab_fingerprint(tokenizer),
           "n_tokens": n_tokens, "seed": seed, **settings,
           "seeds": load_seed_prompts() if settings["prompts"] != "bos" else []}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{digest}.jsonl.gz"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            docs = [json.loads(line)["text"] for line in fh]
        logger.info("self-synthesised text: %d documents read from the cache %s", len(docs), path)
        return docs
    docs = synthesize_text(model, tokenizer, n_tokens, seed=seed, progress=progress, **settings)
    logger.info("self-synthesised text: %d documents generated (%d tokens asked, seed %d), cached in %s", len(docs),
                n_tokens, seed, path)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{digest}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, gzip.open(raw, "wt", encoding="utf-8") as fh:
            for doc in docs:
                fh.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return docs


def synthesized_token_count(tokenizer: Any, docs: list[str]) -> int:
    """Tokens in `docs` as training counts them (no special tokens, no separators)."""
    return sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]) if docs else 0


__all__ = ["PROMPT_KINDS", "SynthConfig", "default_cache_dir", "dedup_lines", "load_or_synthesize",
           "load_seed_prompts", "normalize_line", "split_seeds", "synthesize_text", "synthesized_token_count",
           "vocab_fingerprint", "weights_fingerprint"]


# --- registry entry ---------------------------------------------------------------------------------------------------
def _uses_self(cfg: CPTConfig) -> bool:
    data = cfg.data
    return data.synth is not None or (data.general is not None and data.general.train == SELF)


def _check(cfg: CPTConfig) -> None:
    if not _uses_self(cfg):
        return
    if cfg.objective != "clm":
        raise ValueError("`data.general.train` / `data.synth`: self-synthesised data needs a causal (generating) "
                         "model, and `objective: mlm` trains an encoder: use a text corpus for `data.general`")
    if cfg.masking is not None:
        raise ValueError("`data.synth`: self-synthesised text is not supported with `masking` (spans are tagged "
                         "from corpora on disk): remove `masking` or use a text corpus for `data.general`")


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    data = config.get("data") or {}
    synth = data.get("synth")
    if not synth:
        return []
    parts = []
    if (data.get("general") or {}).get("train") == SELF:
        parts.append(f"{synth.get('train_tokens'):,} tokens replayed as general text")
    if synth.get("eval_tokens"):
        parts.append(f"{synth.get('eval_tokens'):,} tokens held out as `general_self`")
    return ["self-synthesised general text (sampled from the base model at temperature "
            f"{synth.get('temperature')}, top-p {synth.get('top_p')}): " + "; ".join(parts)]


TECHNIQUE = Technique(
    name="self-synthesised data",
    key="data.synth",
    config=SynthConfig,
    exports=names("synth", "SynthConfig", "synthesize_text", "load_or_synthesize"),
    functional=names("synth", "dedup_lines", "split_seeds"),
    enabled=_uses_self,
    check=_check,
    card=_card,
)
