"""Data cleaning core (issue 34): exact and near dedup and decontamination on planted truth, determinism across
worker counts, the report, and the config fields."""

from __future__ import annotations

import numpy as np
import pytest

from hf_cpt.config import CPTConfig
from hf_cpt.data_clean import (EXACT, FLAGGED, KEPT, NEAR, CONTAMINATED, DecontaminateConfig, DedupConfig,
                               DocumentCleaner, NgramIndex, candidate_probability, choose_bands, clean_documents,
                               exact_key, jaccard, minhash_function, normalize_words, summary_line, word_shingles)
from hf_cpt.data_clean.planted import (plant_contamination, plant_duplicates, precision_recall, random_documents,
                                       shingle_set)

pytest.importorskip("rensa")


def test_normalisation_makes_case_spacing_and_punctuation_irrelevant():
    a = normalize_words("The  Quick, brown fox!\n")
    assert a == ["the", "quick", "brown", "fox"]
    assert exact_key(a) == exact_key(normalize_words("the quick brown FOX."))
    assert exact_key(a) != exact_key(normalize_words("the quick brown dog"))
    assert word_shingles(["a", "b"], 5) == ["a b"] and word_shingles([], 5) == []
    assert word_shingles(list("abcdef"), 5) == ["a b c d e", "b c d e f"]


def test_bands_favour_recall_at_the_threshold():
    bands, rows = choose_bands(0.8, 128)
    assert bands * rows <= 128
    assert candidate_probability(0.8, bands, rows) >= 0.9  # a pair at the threshold is almost always a candidate
    assert candidate_probability(0.3, bands, rows) < 0.05  # dissimilar pairs rarely are


def test_minhash_is_seeded_and_estimates_jaccard():
    docs = random_documents(4, seed=1)
    edited = plant_duplicates(docs[:1], seed=2).documents
    sign = minhash_function("rensa", 128, 0)
    for other in edited[1:]:
        a, b = shingle_set(edited[0]), shingle_set(other)
        sa, sb = sign(sorted(a)), sign(sorted(b))
        assert np.array_equal(sa, sign(sorted(a)))  # deterministic
        assert abs(float(np.mean(sa == sb)) - jaccard(a, b)) < 0.15
    assert not np.array_equal(sign(["x y z"]), minhash_function("rensa", 128, 1)(["x y z"]))


def _removed(result, name="train"):
    return (result.decisions[name] >= EXACT).tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_duplicates_are_found_with_high_precision_and_recall(seed):
    corpus = plant_duplicates(random_documents(120, seed=seed), seed=seed)
    assert sum(corpus.duplicate) > 300 and not all(corpus.duplicate[120:])  # hard negatives exist
    result = clean_documents({"train": corpus.documents}, DedupConfig(threshold=0.8))
    removed = _removed(result)
    precision, recall = precision_recall(removed, corpus.duplicate)
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)
    assert not any(removed[:120])  # the first copy seen (the original) is the one kept
    exact = [k == "exact" for k in corpus.kind]
    assert all(result.decisions["train"][np.array(exact)] == EXACT)
    s = result.report.to_dict()["sources"]["train"]
    # an edit that drew no change, or a swap of two equal paragraphs, is an exact copy too
    assert s["exact"]["documents"] >= 120 and s["exact"]["documents"] + s["near"]["documents"] == sum(removed)
    assert s["kept"]["documents"] == len(removed) - sum(removed)


def test_exact_only_removes_only_normalised_copies():
    corpus = plant_duplicates(random_documents(30, seed=3), seed=3)
    result = clean_documents({"train": corpus.documents}, DedupConfig(near=False))
    seen, truth = set(), []
    for doc in corpus.documents:  # naive reference: the normalised word sequence was seen before
        words = tuple(normalize_words(doc))
        truth.append(words in seen)
        seen.add(words)
    assert _removed(result) == truth and sum(truth) >= 30


def test_decisions_do_not_depend_on_worker_processes():
    corpus = plant_duplicates(random_documents(60, seed=4), seed=4)
    held = random_documents(5, seed=99)
    train, _ = plant_contamination(corpus.documents, held)
    args = ({"a": train[:200], "b": train[200:]}, DedupConfig(), DecontaminateConfig(), {"eval": held})
    one, two = clean_documents(*args, workers=1), clean_documents(*args, workers=2)
    for name in ("a", "b"):
        assert np.array_equal(one.decisions[name], two.decisions[name])
    assert one.report.to_dict()["sources"] == two.report.to_dict()["sources"]
    # the streaming form decides the same, document by document
    cleaner = DocumentCleaner(DedupConfig(), DecontaminateConfig(), {"eval": held})
    assert [cleaner.keep("a", t) for t in train[:200]] == one.keep("a").tolist()


def test_across_sources_keeps_the_earlier_sources_copy():
    docs = random_documents(3, seed=5)
    sources = {"domain": [docs[0], docs[1]], "general": [docs[1], docs[2]]}
    result = clean_documents(sources, DedupConfig())
    assert result.keep("domain").tolist() == [True, True] and result.keep("general").tolist() == [False, True]
    report = result.report.to_dict()
    assert report["sources"]["general"]["exact"]["across_sources"] == 1
    assert {"step": "exact", "source": "general", "document": 0, "kept_source": "domain",
            "kept_document": 1} in report["examples"]
    per_source = clean_documents(sources, DedupConfig(across_sources=False))
    assert per_source.keep("general").tolist() == [True, True]


def test_planted_contamination_is_found_exactly_and_held_out_sets_stay():
    held = random_documents(8, seed=6)
    train, truth = plant_contamination(random_documents(80, seed=7), held, n=13)
    assert sum(truth) == 20
    drop = clean_documents({"train": train}, None, DecontaminateConfig(), {"eval": held})
    assert drop.decisions["train"].tolist() == [CONTAMINATED if t else KEPT for t in truth]
    assert precision_recall(_removed(drop), truth) == (1.0, 1.0)
    report = clean_documents({"train": train}, None, DecontaminateConfig(action="report"), {"eval": held})
    assert report.keep("train").all() and report.decisions["train"].tolist() == [FLAGGED if t else KEPT for t in truth]
    counts = report.report.to_dict()["sources"]["train"]["contaminated"]
    assert counts["documents"] == 20 and counts["by_set"] == {"eval": 20}
    assert (clean_documents({"train": train}, None, DecontaminateConfig(action="off"), {"eval": held})
            .keep("train").all())
    shorter = clean_documents({"train": train}, None, DecontaminateConfig(ngram=14), {"eval": held})
    assert shorter.report.sources["train"]["contaminated"]["documents"] < 20  # the 13-word spans no longer count


def test_ngram_index_names_the_first_set_and_skips_short_documents():
    index = NgramIndex.from_sets({"a": ["one two three four"], "b": ["one two three four five"]}, n=3)
    assert index.names == ["a", "b"] and index.short_documents == {"a": 0, "b": 0}
    assert index.first_match(normalize_words("x one two three")) == 0
    assert index.first_match(normalize_words("three four five")) == 1
    assert NgramIndex.from_sets({"s": ["too short"]}, n=3).short_documents == {"s": 1}


def test_report_summary_line_and_fractions():
    corpus = plant_duplicates(random_documents(10, seed=8), seed=8)
    result = clean_documents({"domain": corpus.documents}, DedupConfig())
    report = result.report.to_dict()
    s = report["sources"]["domain"]
    assert s["exact"]["fraction_documents"] == pytest.approx(10 / len(corpus.documents))
    assert report["settings"]["kept_copy"].startswith("first seen")
    line = summary_line(report)
    assert line.startswith("data cleaning: domain: 60 docs; exact 10 docs (16.7%), near ")
    assert report["index_bytes"]["near"] > 0


def test_blank_documents_are_never_duplicates():
    result = clean_documents({"d": ["", "  ", "text here", "text here"]}, DedupConfig())
    assert result.keep("d").tolist() == [True, True, True, False]


def test_config_fields_are_validated_with_their_path():
    cfg = CPTConfig.from_dict({})
    assert cfg.data.dedup == DedupConfig() and cfg.data.decontaminate.action == "drop"
    with pytest.raises(ValueError, match=r"^`data.dedup.threshold` must be in \(0, 1\], got 1.5$"):
        CPTConfig.from_dict({"data": {"dedup": {"threshold": 1.5}}})
    with pytest.raises(ValueError, match=r"^`data.decontaminate.action` must be one of"):
        CPTConfig.from_dict({"data": {"decontaminate": {"action": "remove"}}})
    with pytest.raises(ValueError, match=r"^`data.decontaminate.ngram` must be an integer >= 1"):
        CPTConfig.from_dict({"data": {"decontaminate": {"ngram": 0}}})
    assert CPTConfig.from_dict({"data": {"decontaminate": {"action": False}}}).data.decontaminate.action == "off"
    assert CPTConfig.from_dict({"data": {"dedup": None}}).data.dedup is None
    with pytest.raises(ValueError, match=r"^`data.decontaminate`: a prepared store .*`data.synth.eval_tokens`.*`data.decontaminate.action: off`$"):
        CPTConfig.from_dict({"data": {"prepared_dir": "s", "synth": {"eval_tokens": 64}}})
    CPTConfig.from_dict({"data": {"prepared_dir": "s", "synth": {"eval_tokens": 64},
                                  "decontaminate": {"action": "off"}}})
    with pytest.raises(ValueError, match=r"^`data.dedup.backend` must be one of"):
        CPTConfig.from_dict({"data": {"dedup": {"backend": "simhash"}}})


def test_a_resume_refuses_other_cleaning_settings():
    # cleaning is stateless (decided again, identically, from the documents), so a resumed run reads the same
    # documents exactly when the settings are the same; a change is a change of data
    a = CPTConfig.from_dict({})
    assert a.training_diff(a.override({"data.dedup.threshold": 0.9})) == ["`data.dedup.threshold`: 0.8 -> 0.9"]
    assert a.training_diff(a.override({"data.decontaminate.action": "report"})) == [
        "`data.decontaminate.action`: 'drop' -> 'report'"]
