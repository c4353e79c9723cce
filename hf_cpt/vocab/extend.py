"""Growing a model's embeddings for an extended tokenizer, and the `vocab:` settings that drive it.

`extend_model` puts each new token's row *at its token id* (inside the padding of a padded vocabulary when there
is room, growing the matrix otherwise), through `resize_token_embeddings`, so tied heads stay tied, untied heads
and MLM decoder biases grow with the input embeddings, `config.vocab_size` follows, and the result saves and
reloads with stock `from_pretrained`. Old rows are copied, never recomputed: bit-identical.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..registry import Technique, TrainerParts, names
from ..utils import requested_sharding
from ..validation import check_choice, check_int, check_number
from .token_distillation import DISTILL_PRECISIONS
from .init import EMBEDDING_INITS, InitInputs
from .vectors import (
    WordVectors,
    build_word_vectors,
    read_freedict,
    read_pairs,
    subword_vectors,
    vectors_from_dictionary,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..config import CPTConfig

logger = logging.getLogger(__name__)


@dataclass
class VocabConfig:
    """Extend the vocabulary with domain subwords before continual pretraining (the `vocab:` block)."""

    n_new_tokens: int = field(
        default=5000,
        metadata={"help": "Subwords to add that the merged tokenizer uses on the domain corpus (BPE merge-chain "
                          "intermediates come on top and are reported separately)."},
    )
    init: str = field(
        default="subword_mean",
        metadata={"help": f"New-row initialiser, one of {list(EMBEDDING_INITS)} (see docs/vocab.md for the "
                          "measurements behind the default)."},
    )
    corpus: str | None = field(default=None, metadata={"help": "Texts to learn from (default: `data.domain.train`)."})
    min_frequency: int = field(default=2, metadata={"help": "BPE/WordPiece: ignore pairs seen fewer times."})
    word_vectors: str | None = field(
        default=None,
        metadata={"help": "OFA word vectors (word2vec/fastText text); default: built from the training corpora."},
    )
    dictionary: str | None = field(
        default=None,
        metadata={"help": "Bilingual lexicon aligning new-language words: `source<TAB>target` lines, or a dictd "
                          "FreeDict `.index` (e.g. /usr/share/dictd/freedict-eng-deu.index)."},
    )
    vector_dim: int = field(default=100, metadata={"help": "Dimension of word vectors built from the corpora."})
    top_k: int = field(default=10, metadata={"help": "OFA: neighbours per new token."})
    temperature: float = field(default=0.1, metadata={"help": "OFA: softmax temperature over similarities."})
    rank: int | None = field(
        default=None,
        metadata={"help": "OFA: combine in a rank-r SVD of the old rows. Smooths the new rows; saves no "
                          "parameters (the checkpoint keeps a full-rank matrix)."},
    )
    ofa_fallback: str = field(
        default="subword_mean", metadata={"help": "OFA rows no word vector covers: `subword_mean` or `random`."}
    )
    distill_contexts: int = field(
        default=2, metadata={"help": "Distill: domain snippets per new token (fewer where the corpus has fewer)."}
    )
    distill_context_length: int = field(default=32, metadata={"help": "Distill: tokens per snippet."})
    distill_steps: int = field(default=1, metadata={"help": "Distill: passes over the snippets."})
    distill_lr: float = field(default=1e-3, metadata={"help": "Distill: Adam learning rate of the new rows."})
    distill_batch_size: int = field(default=16, metadata={"help": "Distill: snippets per forward/backward."})
    distill_layer: int = field(
        default=-1, metadata={"help": "Distill: transformer block whose hidden states are matched (1-based; -1: last)."}
    )
    distill_precision: str = field(
        default="auto",
        metadata={"help": "Distill: `auto` (bfloat16 autocast where the device multiplies bfloat16 fast, 2-3x "
                          "faster on such CPUs), `float32` or `bfloat16`."},
    )
    new_rows_first_steps: int = field(
        default=0, metadata={"help": "Train only the new rows (body and old rows frozen) for N updates first."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random draws."})

    def __post_init__(self) -> None:
        check_int("n_new_tokens", self.n_new_tokens)
        check_choice("init", self.init, EMBEDDING_INITS)
        check_choice("ofa_fallback", self.ofa_fallback, ("subword_mean", "random"))
        check_choice("distill_precision", self.distill_precision, DISTILL_PRECISIONS)
        check_number("temperature", self.temperature, 0, min_inclusive=False)
        for name in ("top_k", "vector_dim", "min_frequency", "distill_contexts", "distill_steps",
                     "distill_batch_size"):
            check_int(name, getattr(self, name))
        check_int("distill_context_length", self.distill_context_length, minimum=4)
        check_number("distill_lr", self.distill_lr, 0, min_inclusive=False)
        check_int("distill_layer", self.distill_layer, minimum=-1)
        if self.distill_layer == 0:
            raise ValueError("`distill_layer` must be -1 (the last block) or a block number >= 1, got 0")
        if self.rank is not None:
            check_int("rank", self.rank)
        check_int("new_rows_first_steps", self.new_rows_first_steps, minimum=0)
        check_int("seed", self.seed, minimum=None)

    def distill_options(self) -> dict[str, Any]:
        return {"distill_contexts": self.distill_contexts, "distill_context_length": self.distill_context_length,
                "distill_steps": self.distill_steps, "distill_lr": self.distill_lr,
                "distill_batch_size": self.distill_batch_size, "distill_layer": self.distill_layer,
                "distill_precision": self.distill_precision}


def _pad_multiple(current_rows: int, n_old: int) -> int:
    """The padding granularity of a padded vocabulary (rows beyond the tokenizer), else 1."""
    if current_rows <= n_old:
        return 1
    m = 1
    while m < 128 and current_rows % (m * 2) == 0:
        m *= 2
    return m


def _old_pieces(old_tokenizer: Any, tokenizer: Any, new_tokens: Sequence[str]) -> list[list[int]]:
    out = []
    for tok in new_tokens:
        cont = tok.startswith("##")  # WordPiece continuation: encode the bare characters
        text = tok[2:] if cont else tokenizer.convert_tokens_to_string([tok])
        ids = old_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        out.append(ids or [old_tokenizer.unk_token_id or 0])
    return out


def extend_model(model: Any, tokenizer: Any, new_tokens: Sequence[str], init: str = "subword_mean", *,
                 old_tokenizer: Any = None, word_vectors: WordVectors | dict | None = None,
                 texts: Sequence[str] | None = None, pad_to_multiple_of: int | None = None,
                 **init_options: Any) -> dict[str, Any]:
    """Resize `model`'s embeddings (and output head) for `tokenizer` and initialise the rows of `new_tokens`.

    Args:
        model: a transformers model (decoder or encoder, tied or untied head, padded vocab or not).
        tokenizer: the extended tokenizer (holds `new_tokens`).
        new_tokens: the added entries (model-internal form, as in `VocabExtension.new_tokens`).
        init: one of `EMBEDDING_INITS` (`distill`, `ofa`, `subword_mean`, `mean`, `random`).
        old_tokenizer: the tokenizer before extension (needed by `distill`, `ofa` and `subword_mean`).
        word_vectors: `ofa`'s external vectors (`WordVectors` or `dict[str, vector]`).
        texts: `distill`'s domain texts, where its contexts come from.
        pad_to_multiple_of: row-count granularity when the matrix grows; default keeps a padded model's padding.
        **init_options: `top_k`, `temperature`, `rank`, `ofa_fallback`, `seed`, `distill_contexts`,
            `distill_context_length`, `distill_steps`, `distill_lr`, `distill_batch_size`, `distill_layer`,
            `distill_precision`,
            `progress`.

    Returns:
        a summary: rows added, the new matrix size, OFA coverage / distillation loss, seconds.
    """
    t0 = time.perf_counter()
    check_choice("init", init, EMBEDDING_INITS)
    spec = EMBEDDING_INITS[init]
    if spec.needs_pieces and old_tokenizer is None:
        raise ValueError(f"`init={init}` needs `old_tokenizer` (the tokenizer before extension)")
    if spec.needs_vectors and word_vectors is None:
        raise ValueError(f"`init={init}` needs `word_vectors` (see `build_word_vectors` to make them offline)")
    if spec.needs_contexts and not any(t and t.strip() for t in (texts or ())):
        raise ValueError(f"`init={init}` needs a domain corpus to take its contexts from (`texts`; in a config: "
                         "`vocab.corpus` or `data.domain.train`)")
    if isinstance(word_vectors, dict):
        word_vectors = WordVectors.from_dict(word_vectors)
    n_old, ids = _check_new_ids(tokenizer, new_tokens)
    emb = model.get_input_embeddings()
    rows_before = emb.weight.shape[0]
    if n_old > rows_before:
        raise ValueError(f"the model has {rows_before} embedding rows but the old vocabulary has {n_old} tokens")
    needed = n_old + len(ids)
    multiple = pad_to_multiple_of or _pad_multiple(rows_before, n_old)
    if needed > rows_before:
        # old rows are copied by resize; new rows are overwritten below
        model.resize_token_embeddings(needed, pad_to_multiple_of=multiple if multiple > 1 else None,
                                      mean_resizing=False)
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is None or out.weight.data_ptr() == emb.weight.data_ptr()
    opts = dict(init_options)
    inputs = InitInputs(old=emb.weight[:n_old].detach(), n_new=len(ids), options=opts,
                        std=getattr(model.config, "initializer_range", None))
    if spec.needs_pieces:
        inputs.pieces = _old_pieces(old_tokenizer, tokenizer, new_tokens)
    coverage = None
    if spec.needs_vectors:
        inputs.source_vectors = subword_vectors(old_tokenizer, word_vectors, list(range(n_old)))
        inputs.target_vectors = subword_vectors(tokenizer, word_vectors, ids)
        coverage = float((inputs.target_vectors.abs().sum(1) > 0).double().mean())
    if spec.needs_contexts:
        from .token_distillation import mine_distill_contexts

        inputs.model = model
        inputs.contexts = mine_distill_contexts(
            texts, old_tokenizer, tokenizer, n_old, per_token=opts.get("distill_contexts", 2),
            length=opts.get("distill_context_length", 32), seed=opts.get("seed", 0))
    with torch.no_grad():
        matrices = [("input", emb.weight)] + ([] if tied else [("output", out.weight)])
        for role, w in matrices:
            inputs.old, inputs.role = w[:n_old].detach(), role
            inputs.generator = torch.Generator().manual_seed(int(opts.get("seed", 0)))
            with torch.enable_grad():
                new = spec.rows(inputs)
            w[n_old:needed] = new.to(w.dtype)
        bias = getattr(out, "bias", None) if out is not None else None
        if bias is not None and bias.shape[0] >= needed:  # MLM decoders: new tokens start at the average logit
            bias[n_old:needed] = bias[:n_old].mean()
    return {"init": init, "added": len(ids), "old_vocab_size": n_old, "rows_before": rows_before,
            "rows_after": model.get_input_embeddings().weight.shape[0], "tied": tied, "ofa_coverage": coverage,
            **inputs.stats, "seconds": time.perf_counter() - t0}


def _check_new_ids(tokenizer: Any, new_tokens: Sequence[str]) -> tuple[int, list[int]]:
    """The first new id and the ids of `new_tokens`, which must be the contiguous block after the old vocabulary."""
    ids = tokenizer.convert_tokens_to_ids(list(new_tokens))
    unk = tokenizer.unk_token_id
    missing = [t for t, i in zip(new_tokens, ids) if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(f"`new_tokens` not in the extended tokenizer: {missing[:5]}")
    n_old = min(ids)
    if sorted(ids) != list(range(n_old, n_old + len(ids))):
        raise ValueError("`new_tokens` must be the contiguous block of ids after the old vocabulary")
    return n_old, ids


def word_vectors_for(cfg: VocabConfig, texts: Sequence[str]) -> WordVectors:
    """The external vectors `cfg` asks for: a file, or built from `texts`; a dictionary aligns a new language."""
    vectors = WordVectors.load(cfg.word_vectors) if cfg.word_vectors else build_word_vectors(
        texts, dim=cfg.vector_dim, seed=cfg.seed)
    if cfg.dictionary:
        pairs = read_freedict(cfg.dictionary) if str(cfg.dictionary).endswith(".index") else \
            read_pairs(cfg.dictionary)
        vectors = vectors_from_dictionary(vectors, pairs)
    return vectors


def extend_vocabulary(model: Any, tokenizer: Any, cfg: VocabConfig, domain_texts: Sequence[str],
                      general_texts: Sequence[str] = (), heldout: Sequence[str] | None = None,
                      general_heldout: Sequence[str] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """The whole `vocab:` recipe: learn `cfg.n_new_tokens` domain subwords, merge them into `tokenizer`, grow and
    initialise `model`. Returns `(model, extended tokenizer, summary)`; `model` is modified in place.

    The summary (`hf_cpt_vocab.json`, model card) reports `added` rows, `used` tokens (those the domain
    segmentation produces), BPE `intermediates`, and fertility before/after on held-out domain text and on general
    text (`general_heldout`, else `general_texts`: their first 200 documents). `general_texts` also feed OFA's
    word vectors when it builds them from the corpora."""
    from .tokens import learn_domain_tokens

    t0 = time.perf_counter()
    # a sample is enough for the general fertility report
    general = list(general_heldout if general_heldout is not None else general_texts)[:200] or None
    ext = learn_domain_tokens(domain_texts, tokenizer, cfg.n_new_tokens, heldout=heldout, general=general,
                              min_frequency=cfg.min_frequency)
    learn_s = time.perf_counter() - t0
    vectors = word_vectors_for(cfg, list(domain_texts) + list(general_texts)) if \
        EMBEDDING_INITS[cfg.init].needs_vectors else None
    stats = extend_model(model, ext.tokenizer, ext.new_tokens, cfg.init, old_tokenizer=tokenizer,
                         word_vectors=vectors, texts=domain_texts, top_k=cfg.top_k, temperature=cfg.temperature,
                         rank=cfg.rank, ofa_fallback=cfg.ofa_fallback, seed=cfg.seed, **cfg.distill_options())
    summary = {**ext.summary(), **stats, "learn_seconds": learn_s, "total_seconds": time.perf_counter() - t0}
    logger.info("vocabulary: +%d tokens (%d used, %d intermediates; %s init), fertility %.3f -> %.3f",
                len(ext.new_tokens), ext.stats["used"], ext.stats["intermediates"], cfg.init,
                ext.fertility_before or float("nan"), ext.fertility_after or float("nan"))
    return model, ext.tokenizer, summary


# --- registry entry ---------------------------------------------------------------------------------------------------
def _preflight(cfg: CPTConfig, model: Any, args: Any) -> None:
    # under FSDP the phase's hooks never reach the trained (gathered) copies: refuse before any data is built
    # (measured in tests/distributed; the callback refuses a sharded model at train start too)
    if cfg.vocab is not None and cfg.vocab.new_rows_first_steps and requested_sharding(args):
        from ..callbacks.new_rows_first import SHARDED_REFUSED

        raise ValueError(SHARDED_REFUSED)


def _setup(parts: TrainerParts) -> None:
    steps = parts.cfg.vocab.new_rows_first_steps
    if steps:
        from ..callbacks.new_rows_first import NewRowsFirstCallback

        parts.callbacks.append(NewRowsFirstCallback(parts.vocab_summary["old_vocab_size"], steps))


def _card(config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    vocab, vstats = config.get("vocab"), metrics.get("vocab") or {}
    if not vocab:
        return []
    line = (f"vocabulary extension: {vstats.get('added', vocab.get('n_new_tokens'))} domain subwords merged into "
            f"the tokenizer ({vstats.get('model_type', '')} merges/entries, not added tokens), new embedding "
            f"rows initialised with `{vocab.get('init')}`")
    if vocab.get("init") == "ofa":
        line += f" (top-k {vocab.get('top_k')}, temperature {vocab.get('temperature')}" + (
            f", rank {vocab.get('rank')}" if vocab.get("rank") else "") + ")"
    if vstats.get("fertility_before") is not None:
        line += f"; domain fertility {vstats['fertility_before']:.3f} -> {vstats['fertility_after']:.3f} tokens/word"
    if vocab.get("new_rows_first_steps"):
        line += f"; only the new rows trained for the first {vocab['new_rows_first_steps']} updates"
    return [line]


TECHNIQUE = Technique(
    name="vocabulary",
    key="vocab",
    config=VocabConfig,
    exports={**names("vocab.tokens", "learn_domain_tokens", "merge_tokens", "VocabExtension"),
             **names("vocab.extend", "extend_model", "extend_vocabulary", "VocabConfig"),
             "EMBEDDING_INITS": "vocab.init", **names("vocab.vectors", "build_word_vectors", "WordVectors"),
             "NewRowsFirstCallback": "callbacks.new_rows_first"},
    functional=names("vocab.init", "factorize_embeddings", "init_mean", "init_ofa", "init_random",
                     "init_subword_mean"),
    preflight=_preflight,
    setup=_setup,
    card=_card,
    model="recipe.vocab:extend_run_model",  # the base model's vocabulary is extended before anything else runs
)
