"""Learning domain subwords and merging them into BPE / Unigram / WordPiece tokenizers for real."""

from __future__ import annotations

import json

import pytest

from hf_cpt.testing import (
    make_tiny_tokenizer,
    read_embedded,
    train_unigram_tokenizer,
    train_wordpiece_tokenizer,
)
from hf_cpt.vocab.tokens import fertility, learn_domain_tokens, merge_tokens

SAMPLES = [
    "def parse_args(argv: list[str]) -> argparse.Namespace:  # subprocess.run(check=True)",
    "The asyncio event loop schedules coroutines; see :meth:`loop.run_until_complete`.",
    "Größenänderung für Wörterbücher — café, naïve, Ærø; 日本語のテキスト; Ελληνικά; emoji 🐍✨",
    "  leading spaces\tand tabs\nnew lines\r\n and trailing   ",
    "HTTPServer.serve_forever() → 0x1F600 ≠ 3.14e-10",
]


@pytest.fixture(scope="module")
def domain():
    return read_embedded("python-docs", limit=40), read_embedded("python-docs", "validation", limit=10)


@pytest.fixture(scope="module")
def bpe_ext(domain):
    base = make_tiny_tokenizer()
    return base, learn_domain_tokens(domain[0], base, 200, heldout=domain[1])


@pytest.mark.slow  # the module's BPE extension fixture (~9 s under load)
def test_bpe_tokens_are_real_vocabulary_used_by_normal_tokenization(bpe_ext, domain):
    base, ext = bpe_ext
    tok = ext.tokenizer
    n = len(ext.new_tokens)
    assert ext.stats["used"] == 200 and n == 200 + ext.stats["intermediates"]
    assert ext.new_token_ids == list(range(len(base), len(base) + n)) and len(tok) == len(base) + n
    # in the BPE model itself (vocab + merges), not added tokens
    state = json.loads(tok.backend_tokenizer.to_str())
    assert all(t in state["model"]["vocab"] for t in ext.new_tokens)
    assert len(state["model"]["merges"]) > len(json.loads(base.backend_tokenizer.to_str())["model"]["merges"])
    assert tok.get_added_vocab() == base.get_added_vocab()
    # domain text now uses them, and needs fewer tokens
    ids = tok(domain[1][0], add_special_tokens=False)["input_ids"]
    assert any(i >= len(base) for i in ids)
    assert ext.fertility_after < ext.fertility_before
    assert fertility(tok, domain[1]) == pytest.approx(ext.fertility_after)
    # old ids keep their meaning
    assert all(tok.convert_ids_to_tokens(i) == base.convert_ids_to_tokens(i) for i in range(len(base)))


@pytest.mark.slow  # the module's BPE extension fixture (~9 s under load)
def test_bpe_round_trip(bpe_ext, domain):
    _, ext = bpe_ext
    for text in SAMPLES + domain[1][:3]:
        assert ext.tokenizer.decode(ext.tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.slow  # the real SmolLM2 tokenizer
def test_embedded_smollm_tokenizer(domain):
    """The real byte-level BPE of the embedded default (digits split, Llama-style pre-tokenizer)."""
    from transformers import AutoTokenizer

    from hf_cpt.recipe.models import resolve_model_path

    base = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m"))
    ext = learn_domain_tokens(domain[0], base, 300, heldout=domain[1])
    assert ext.stats["used"] == 300 and len(ext.new_tokens) == 300 + ext.stats["intermediates"]
    assert ext.fertility_after < ext.fertility_before
    for text in SAMPLES:
        assert ext.tokenizer.decode(ext.tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.slow  # learns a unigram tokenizer (~43 s under load)
def test_unigram_sentencepiece_style(domain):
    base = train_unigram_tokenizer(read_embedded("kjv", limit=60), 600)
    ext = learn_domain_tokens(domain[0], base, 150, heldout=domain[1])
    assert ext.model_type == "Unigram" and len(ext.new_tokens) == 150
    assert all(t not in base.get_vocab() for t in ext.new_tokens)
    assert ext.fertility_after < ext.fertility_before
    ids = ext.tokenizer(domain[1][0], add_special_tokens=False)["input_ids"]
    assert any(i >= len(base) for i in ids)
    for text in ["the subprocess module returns a list of lines", "And God said, Let there be light"]:
        assert ext.tokenizer.decode(ext.tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # characters the general-text base never saw become known pieces instead of <unk>
    unk = base.unk_token_id
    for text in SAMPLES[:2]:
        assert ext.tokenizer(text)["input_ids"].count(unk) <= base(text)["input_ids"].count(unk)


@pytest.mark.slow  # learns a WordPiece tokenizer
def test_wordpiece_bert_style(domain):
    base = train_wordpiece_tokenizer(read_embedded("kjv", limit=60), 500)
    ext = learn_domain_tokens(domain[0], base, 120, heldout=domain[1])
    assert ext.model_type == "WordPiece" and ext.fertility_after < ext.fertility_before
    text = "the subprocess module and asyncio coroutines"
    assert ext.tokenizer.decode(ext.tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_merge_tokens_errors():
    base = make_tiny_tokenizer()
    existing = base.convert_ids_to_tokens(100)
    with pytest.raises(ValueError, match="already in the vocabulary"):
        merge_tokens(base, [existing], merges=[])
    with pytest.raises(ValueError, match="`merges` are required"):
        merge_tokens(base, ["Ġzzzqqq"])
    with pytest.raises(ValueError, match="needs both pieces"):
        merge_tokens(base, ["Ġzzzqqq"], merges=[("Ġzzz", "qqq")])
    with pytest.raises(ValueError, match="empty"):
        merge_tokens(base, [])


def test_learn_errors(domain):
    base = make_tiny_tokenizer()
    with pytest.raises(ValueError, match="corpus is empty"):
        learn_domain_tokens(["", "   "], base, 10)
    with pytest.raises(ValueError, match="`n_new_tokens`"):
        learn_domain_tokens(domain[0], base, 0)


def test_unsupported_and_slow_tokenizers():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wl = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="'WordLevel' is not supported"):
        learn_domain_tokens(["a b c"], PreTrainedTokenizerFast(tokenizer_object=wl), 5)

    class Slow:  # a tokenizer without a 🤗 tokenizers backend (no offsets, no model to extend)
        pass

    with pytest.raises(ValueError, match="slow tokenizer.*use_fast=True"):
        learn_domain_tokens(["text"], Slow(), 5)


def _used_share(ext, texts):
    from hf_cpt.vocab.tokens import token_usage

    usage = token_usage(ext.tokenizer, texts, ext.new_token_ids)
    return sum(1 for c in usage.values() if c > 0) / len(ext.new_token_ids)


@pytest.mark.slow  # learns a tokenizer per kind (~45 s under load)
@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece"])
def test_added_tokens_are_used_on_the_domain_text(kind, domain):
    """>= 95 % of the added rows occur in the merged tokenizer's segmentation of the text they were learnt from;
    `n_new` counts used tokens, BPE intermediates are reported on top."""
    kjv = read_embedded("kjv", limit=60)
    base = {"bpe": make_tiny_tokenizer, "unigram": lambda: train_unigram_tokenizer(kjv, 600),
            "wordpiece": lambda: train_wordpiece_tokenizer(kjv, 500)}[kind]()
    ext = learn_domain_tokens(domain[0], base, 120, heldout=domain[1], general=read_embedded("kjv", "validation",
                                                                                              limit=3))
    assert _used_share(ext, domain[0]) >= 0.95
    s = ext.summary()
    assert s["used"] == 120 and s["added"] == 120 + s["intermediates"]
    assert s["domain_tokens_after"] < s["domain_tokens_before"]
    assert s["general_fertility_after"] <= s["general_fertility_before"]
    if kind != "bpe":
        assert s["intermediates"] == 0


@pytest.mark.slow  # the module's BPE extension fixture (~9 s under load)
def test_base_segmentation_of_general_text_unchanged_where_no_new_token_applies(bpe_ext):
    base, ext = bpe_ext
    backend = base.backend_tokenizer
    for text in read_embedded("kjv", "validation", limit=2):
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(text[:3000]):
            new = [t.value for t in ext.tokenizer.backend_tokenizer.model.tokenize(word)]
            if not set(new) & set(ext.new_tokens):
                assert new == [t.value for t in backend.model.tokenize(word)]


def test_too_many_tokens_for_the_corpus_says_how_many_it_supports():
    base = make_tiny_tokenizer()
    text = ["the quick brown fox jumps over the lazy dog " * 3]
    with pytest.raises(ValueError, match=r"`n_new_tokens` is 500, more than the domain corpus supports.*<= \d+"):
        learn_domain_tokens(text, base, 500)
