"""Tiny offline models and tokenizers for tests, benchmarks and examples (like `transformers.testing_utils`).

Nothing here downloads: the tokenizer is trained in a second on the embedded corpora, the model is built from
a config with random weights.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from .recipe.data import embedded_corpus_path


def read_embedded(name: str, split: str = "train", limit: int | None = None) -> list[str]:
    """Texts of an embedded corpus (`python-docs`, `kjv`), optionally the first `limit` documents."""
    texts = []
    with gzip.open(embedded_corpus_path(f"embedded:{name}/{split}"), "rt", encoding="utf-8") as fh:
        for line in fh:
            texts.append(json.loads(line)["text"])
            if limit and len(texts) >= limit:
                break
    return texts


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers; `<eos>` id 0, `<pad>` id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def make_tiny_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on 40 embedded documents; `<eos>` is id 0, `<pad>` id 1."""
    return train_bpe_tokenizer(read_embedded("python-docs", limit=20) + read_embedded("kjv", limit=20), vocab_size)


def make_tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> Any:
    """A randomly initialised Llama causal LM with tied embeddings, small enough for unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=0, pad_token_id=1, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)



def train_unigram_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A SentencePiece-style Unigram tokenizer (Metaspace `▁`, like XLM-R) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>", "<mask>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   mask_token="<mask>")


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A BERT-style WordPiece tokenizer (lower-cased, `##` continuations, [CLS]/[SEP]/[MASK]) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                              "[MASK]"], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
