"""Decontamination: does a training document share an n-gram of normalised words with a held-out set?

The test of GPT-3 ("Language Models are Few-Shot Learners", Brown et al. 2020, appendix C) and of most CPT and
pretraining reports since: a training document is *contaminated* by a held-out set when some n consecutive
normalised words (n = 13 by default) of it also occur in a document of that set. The held-out sets are left as they
are; the contaminated training documents are dropped (`action: drop`), only counted (`report`), or not looked for
(`off`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..validation import check_choice, check_int
from .text import normalize_words

DECONTAMINATE_ACTIONS = ("drop", "report", "off")


@dataclass
class DecontaminateConfig:
    """`data.decontaminate`: n-gram overlap between the training text and every set the run evaluates on."""

    action: str | bool = field(
        default="drop",
        metadata={"help": "`drop` contaminated training documents (the held-out sets stay as they are), `report` "
                          "(count them only) or `off`."})
    ngram: int = field(default=13, metadata={"help": "n of the shared word n-grams that make a document "
                                                     "contaminated (normalised words)."})

    def __post_init__(self) -> None:
        if self.action is False:  # YAML 1.1 reads a bare `off` as false
            self.action = "off"
        check_choice("action", self.action, DECONTAMINATE_ACTIONS)
        check_int("ngram", self.ngram)

    @property
    def enabled(self) -> bool:
        return self.action != "off"


class NgramIndex:
    """The word n-grams of named held-out sets; `first_match(words)` names the first set that shares one.

    Documents shorter than `n` words contribute nothing (a 3-word answer choice would otherwise match every
    document containing those words); they are counted in `short_documents`.
    Memory: one tuple per distinct n-gram (~250 bytes in CPython), i.e. ~250 MB per million held-out n-grams.
    """

    def __init__(self, n: int = 13) -> None:
        self.n = check_int("ngram", n)
        self.names: list[str] = []
        self.documents: dict[str, int] = {}
        self.short_documents: dict[str, int] = {}
        self._grams: dict[tuple[str, ...], int] = {}
        self._starts: set[str] = set()

    def add_set(self, name: str, texts: Iterable[str]) -> None:
        """Index the n-grams of every document in `texts` under `name` (a set seen first keeps an n-gram)."""
        if name in self.documents:
            raise ValueError(f"held-out set {name!r} is indexed twice")
        idx = len(self.names)
        self.names.append(name)
        self.documents[name] = self.short_documents[name] = 0
        n = self.n
        for text in texts:
            words = [sys.intern(w) for w in normalize_words(text)]
            self.documents[name] += 1
            if len(words) < n:
                self.short_documents[name] += 1
                continue
            for i in range(len(words) - n + 1):
                gram = tuple(words[i:i + n])
                if gram not in self._grams:
                    self._grams[gram] = idx
                    self._starts.add(gram[0])

    def __len__(self) -> int:
        return len(self._grams)

    def first_match(self, words: list[str]) -> int | None:
        """The index (in `names`) of the set owning the first shared n-gram of `words`, or None."""
        n, grams, starts = self.n, self._grams, self._starts
        for i in range(len(words) - n + 1):
            if words[i] in starts:
                hit = grams.get(tuple(words[i:i + n]))
                if hit is not None:
                    return hit
        return None

    @classmethod
    def from_sets(cls, sets: Mapping[str, Iterable[str]], n: int = 13) -> NgramIndex:
        index = cls(n)
        for name, texts in sets.items():
            index.add_set(name, texts)
        return index
