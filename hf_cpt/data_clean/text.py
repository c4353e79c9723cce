"""Text normalisation shared by exact dedup, near dedup and decontamination: one definition of a "word".

A document is compared as its *normalised words*: Unicode NFKC, case-folded, split into runs of word characters
(`\\w+`), so whitespace, punctuation and case never make two copies look different. Exact dedup hashes the word
sequence; near dedup hashes its k-word shingles; decontamination looks up its n-grams.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WORD = re.compile(r"\w+")


def normalize_words(text: str) -> list[str]:
    """The normalised words of `text`: NFKC, case-folded, `\\w+` runs (punctuation and spacing dropped).

    >>> normalize_words("Hello,  WORLD!\\n— it's")
    ['hello', 'world', 'it', 's']
    """
    if not isinstance(text, str):
        return []
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def exact_key(words: list[str]) -> int:
    """A 64-bit key of the normalised word sequence (BLAKE2b): equal keys mean equal normalised text (a chance
    collision needs ~4e9 distinct documents for a 50% risk)."""
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=8).digest(), "little")


def word_shingles(words: list[str], k: int) -> list[str]:
    """The distinct `k`-word shingles of `words` (a shorter document is one shingle of all its words; an empty
    one has none), the set whose Jaccard similarity near dedup estimates."""
    if not words:
        return []
    if len(words) <= k:
        return [" ".join(words)]
    return list(dict.fromkeys(" ".join(words[i:i + k]) for i in range(len(words) - k + 1)))


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets): the exact similarity, for tests and planted truth."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
