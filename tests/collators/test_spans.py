"""Span cores without spaCy: character spans -> token spans, lexicon terms as whole words."""

from __future__ import annotations

import random

import pytest

from hf_cpt.collators.spans import char_to_token_spans, lexicon_pattern, lexicon_spans, read_lexicon


def test_char_to_token_spans_reference():
    offsets = [(0, 0), (0, 3), (3, 5), (6, 9), (10, 12), (12, 13), (0, 0)]
    got = char_to_token_spans(offsets, [0, 6, 10, 20], [5, 9, 12, 25])
    assert got == [(0, 1, 3), (1, 3, 4), (2, 4, 5)]  # the span past the truncation is dropped
    assert char_to_token_spans(offsets, [4], [7]) == [(0, 2, 4)]  # partial overlaps on both ends


def _naive(offsets, starts, ends, allowed):
    out = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        hit = [j for j, (a, b) in enumerate(offsets) if a != b and (allowed is None or allowed[j]) and a < e and b > s]
        if hit:
            out.append((i, hit[0], hit[-1] + 1))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_char_to_token_spans_matches_a_naive_overlap_scan(seed):
    rng = random.Random(seed)
    offsets, pos = [(0, 0)], 0
    for _ in range(rng.randint(1, 40)):
        pos += rng.randint(0, 2)  # spaces between tokens, sometimes none
        width = rng.randint(1, 6)
        offsets.append((pos, pos + width))
        pos += width
    offsets.append((0, 0))
    starts = [rng.randint(0, pos + 5) for _ in range(rng.randint(1, 8))]
    ends = [s + rng.randint(1, 10) for s in starts]
    allowed = [rng.random() < 0.8 for _ in offsets] if seed % 2 else None
    assert char_to_token_spans(offsets, starts, ends, allowed) == _naive(offsets, starts, ends, allowed)


def test_lexicon_spans_are_whole_words_longest_first(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text("# cardiology\nheart\nheart  failure\nHeart\n\nECG\n")
    terms = read_lexicon(path)
    assert terms == ["heart", "heart  failure", "Heart", "ECG"]  # comments and blank lines dropped, order kept
    text = "Acute heart\nfailure; hearty meals; an ECG. HEART"
    spans = lexicon_spans(text, lexicon_pattern(terms))
    assert [text[s:e] for s, e, _ in spans] == ["heart\nfailure", "ECG", "HEART"]
    assert {k for _, _, k in spans} == {"LEXICON"}
    strict = lexicon_spans(text, lexicon_pattern(terms, case_sensitive=True))
    assert [text[s:e] for s, e, _ in strict] == ["heart\nfailure", "ECG"]
    with pytest.raises(FileNotFoundError, match="masking.lexicon"):
        read_lexicon(tmp_path / "missing.txt")
