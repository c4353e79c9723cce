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
from typing import Any

import torch

from .init import EMBEDDING_INITS, init_mean, init_ofa, init_random, init_subword_mean
from .vectors import (
    WordVectors,
    build_word_vectors,
    read_freedict,
    read_pairs,
    subword_vectors,
    vectors_from_dictionary,
)

logger = logging.getLogger(__name__)


@dataclass
class VocabConfig:
    """Extend the vocabulary with domain subwords before continual pretraining (the `vocab:` block)."""

    n_new_tokens: int = field(default=5000, metadata={"help": "Subwords to learn from the domain corpus and add."})
    init: str = field(
        default="subword_mean",
        metadata={"help": f"New-row initialiser, one of {list(EMBEDDING_INITS)}; `ofa` pays off with good aligned "
                          "`word_vectors` (see docs/vocab.md for the measurements behind this default)."},
    )
    corpus: str | None = field(default=None, metadata={"help": "Texts to learn from (default: `data.domain.train`)."})
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
    rank: int | None = field(default=None, metadata={"help": "OFA: combine in a rank-r factorisation (100-400)."})
    ofa_fallback: str = field(
        default="subword_mean", metadata={"help": "OFA rows no word vector covers: `subword_mean` or `random`."}
    )
    new_rows_first_steps: int = field(
        default=0, metadata={"help": "Train only the new rows (body and old rows frozen) for N updates first."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random draws."})

    def __post_init__(self) -> None:
        if isinstance(self.n_new_tokens, bool) or not isinstance(self.n_new_tokens, int) or self.n_new_tokens < 1:
            raise ValueError(f"`n_new_tokens` must be an integer >= 1, got {self.n_new_tokens!r}")
        if self.init not in EMBEDDING_INITS:
            raise ValueError(f"`init` must be one of {list(EMBEDDING_INITS)}, got {self.init!r}")
        if self.ofa_fallback not in ("subword_mean", "random"):
            raise ValueError(f"`ofa_fallback` must be `subword_mean` or `random`, got {self.ofa_fallback!r}")
        if not (self.temperature > 0):
            raise ValueError(f"`temperature` must be > 0, got {self.temperature!r}")
        for name in ("top_k", "vector_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {v!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"`rank` must be a positive integer or null, got {self.rank!r}")
        if isinstance(self.new_rows_first_steps, bool) or not isinstance(self.new_rows_first_steps, int) or \
                self.new_rows_first_steps < 0:
            raise ValueError(f"`new_rows_first_steps` must be an integer >= 0, got {self.new_rows_first_steps!r}")


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


def _rows(init: str, old: torch.Tensor, n_old: int, *, pieces: list[list[int]], source_vecs: torch.Tensor | None,
          target_vecs: torch.Tensor | None, std: float | None, opts: dict[str, Any]) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(opts.get("seed", 0)))
    n = len(pieces)
    if init == "random":
        return init_random(old, n, std=std, generator=g)
    if init == "mean":
        return init_mean(old, n, generator=g)
    if init == "subword_mean":
        return init_subword_mean(old, pieces)
    fallback = init_subword_mean(old, pieces) if opts.get("ofa_fallback", "subword_mean") == "subword_mean" else None
    return init_ofa(old, source_vecs, target_vecs, top_k=opts.get("top_k", 10),
                    temperature=opts.get("temperature", 0.1), rank=opts.get("rank"), fallback=fallback, generator=g)


def extend_model(model: Any, tokenizer: Any, new_tokens: Sequence[str], init: str = "subword_mean", *,
                 old_tokenizer: Any = None, word_vectors: WordVectors | dict | None = None,
                 pad_to_multiple_of: int | None = None, **init_options: Any) -> dict[str, Any]:
    """Resize `model`'s embeddings (and output head) for `tokenizer` and initialise the rows of `new_tokens`.

    Args:
        model: a transformers model (decoder or encoder, tied or untied head, padded vocab or not).
        tokenizer: the extended tokenizer (holds `new_tokens`).
        new_tokens: the added entries (model-internal form, as in `VocabExtension.new_tokens`).
        init: one of `EMBEDDING_INITS` (`ofa`, `subword_mean`, `mean`, `random`).
        old_tokenizer: the tokenizer before extension (needed by `ofa` and `subword_mean`).
        word_vectors: `ofa`'s external vectors (`WordVectors` or `dict[str, vector]`).
        pad_to_multiple_of: row-count granularity when the matrix grows; default keeps a padded model's padding.
        **init_options: `top_k`, `temperature`, `rank`, `ofa_fallback`, `seed`.

    Returns:
        a summary: rows added, the new matrix size, OFA coverage, seconds.
    """
    t0 = time.perf_counter()
    if init not in EMBEDDING_INITS:
        raise ValueError(f"`init` must be one of {list(EMBEDDING_INITS)}, got {init!r}")
    if init in ("ofa", "subword_mean") and old_tokenizer is None:
        raise ValueError(f"`init={init}` needs `old_tokenizer` (the tokenizer before extension)")
    if init == "ofa" and word_vectors is None:
        raise ValueError("`init=ofa` needs `word_vectors` (see `build_word_vectors` to make them offline)")
    if isinstance(word_vectors, dict):
        word_vectors = WordVectors.from_dict(word_vectors)
    ids = tokenizer.convert_tokens_to_ids(list(new_tokens))
    unk = tokenizer.unk_token_id
    missing = [t for t, i in zip(new_tokens, ids) if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(f"`new_tokens` not in the extended tokenizer: {missing[:5]}")
    n_old = min(ids)
    if sorted(ids) != list(range(n_old, n_old + len(ids))):
        raise ValueError("`new_tokens` must be the contiguous block of ids after the old vocabulary")
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
    # only subword_mean (and OFA's fallback) read the old pieces; the other inits need just the count
    pieces = _old_pieces(old_tokenizer, tokenizer, new_tokens) if init in ("subword_mean", "ofa") else \
        [[0]] * len(ids)
    source_vecs = target_vecs = None
    coverage = None
    if init == "ofa":
        source_vecs = subword_vectors(old_tokenizer, word_vectors, list(range(n_old)))
        target_vecs = subword_vectors(tokenizer, word_vectors, ids)
        coverage = float((target_vecs.abs().sum(1) > 0).double().mean())
    std = getattr(model.config, "initializer_range", None)
    opts = dict(init_options)
    with torch.no_grad():
        matrices = [emb.weight] + ([] if tied else [out.weight])
        for w in matrices:
            new = _rows(init, w[:n_old].detach(), n_old, pieces=pieces, source_vecs=source_vecs,
                        target_vecs=target_vecs, std=std, opts=opts)
            w[n_old:needed] = new.to(w.dtype)
        bias = getattr(out, "bias", None) if out is not None else None
        if bias is not None and bias.shape[0] >= needed:  # MLM decoders: new tokens start at the average logit
            bias[n_old:needed] = bias[:n_old].mean()
    return {"init": init, "added": len(ids), "old_vocab_size": n_old, "rows_before": rows_before,
            "rows_after": model.get_input_embeddings().weight.shape[0], "tied": tied, "ofa_coverage": coverage,
            "seconds": time.perf_counter() - t0}


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
                      general_texts: Sequence[str] = (), heldout: Sequence[str] | None = None
                      ) -> tuple[Any, Any, dict[str, Any]]:
    """The whole `vocab:` recipe: learn `cfg.n_new_tokens` domain subwords, merge them into `tokenizer`, grow and
    initialise `model`. Returns `(model, extended tokenizer, summary)`; `model` is modified in place."""
    from .tokens import learn_domain_tokens

    t0 = time.perf_counter()
    ext = learn_domain_tokens(domain_texts, tokenizer, cfg.n_new_tokens, heldout=heldout)
    learn_s = time.perf_counter() - t0
    vectors = word_vectors_for(cfg, list(domain_texts) + list(general_texts)) if cfg.init == "ofa" else None
    stats = extend_model(model, ext.tokenizer, ext.new_tokens, cfg.init, old_tokenizer=tokenizer,
                         word_vectors=vectors, top_k=cfg.top_k, temperature=cfg.temperature, rank=cfg.rank,
                         ofa_fallback=cfg.ofa_fallback, seed=cfg.seed)
    summary = {**ext.summary(), **stats, "learn_seconds": learn_s, "total_seconds": time.perf_counter() - t0}
    logger.info("vocabulary: +%d tokens (%s init), fertility %.3f -> %.3f", len(ext.new_tokens), cfg.init,
                ext.fertility_before or float("nan"), ext.fertility_after or float("nan"))
    return model, ext.tokenizer, summary
