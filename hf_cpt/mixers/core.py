"""Pure cores of replay mixing: credit-based allocation of blocks/tokens to sources, and ratio stages.

Mixing is done with *credits* (a smooth weighted round-robin, the error-minimising choice used by Megatron's
blended datasets): before each allocation every source earns ``ratio * amount`` credit, each source receives the
whole part of its credit, leftover units go to the largest fractional parts, and what a source receives is
subtracted from its credit. Credits always sum to zero and stay in (-1, 1), so after any prefix of the stream
every source has received its exact share to within one unit (one block, or one token), whatever the
document lengths: ``|received_s - sum_t ratio_s(t) * amount_t| < 1``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..validation import check_fraction


def check_ratios(ratios: Mapping[str, float], name: str = "ratios") -> dict[str, float]:
    """Validate a `{source: share}` mapping (non-negative, finite, summing to 1) and return it as floats.

    Raises:
        ValueError: naming `name` and the offending source.
    """
    if not isinstance(ratios, Mapping) or not ratios:
        raise ValueError(f"`{name}` must map source names to shares, e.g. {{domain: 0.75, general: 0.25}}, "
                         f"got {ratios!r}")
    out = {}
    for key, value in ratios.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"`{name}.{key}` must be a share >= 0, got {value!r}")
        out[str(key)] = float(value)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"`{name}` must sum to 1, got {total:.6g} ({out}); rescale the shares")
    return out


def check_stage_start(start: object) -> None:
    """A stage starts at a fraction of the run in [0, 1)."""
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 <= start < 1.0:
        raise ValueError(f"`start` must be a fraction in [0, 1), got {start!r}")


@dataclass
class RatioStage:
    """From `start` (a fraction of the run's blocks, in [0, 1)) on, mix with other shares.

    The shares are `ratios` (any named sources), or `replay_ratio` r, the two-source shorthand for
    ``{"domain": 1 - r, "general": r}`` used by `data.replay_stages` in YAML. Both may be given when they agree
    (a config written back to YAML carries both).

    Example: `RatioStage(start=0.8, replay_ratio=0.05)` upsamples the domain in the last 20% of training
    ("annealing" on the target data); `RatioStage(0.5, {"code": 0.7, "docs": 0.3})` for other sources.
    """

    start: float = field(metadata={"help": "Fraction of the run's blocks after which this stage applies."})
    ratios: dict[str, float] | None = field(
        default=None, metadata={"help": "Shares per source in this stage; sum to 1."})
    replay_ratio: float | None = field(
        default=None, metadata={"help": "Share of `general` tokens in this stage (the rest is `domain`)."})

    def __post_init__(self) -> None:
        check_stage_start(self.start)
        if self.replay_ratio is not None:
            r = check_fraction("replay_ratio", self.replay_ratio)
            implied = {"domain": 1.0 - r, "general": r}
            if self.ratios is not None:
                given = check_ratios(self.ratios, "ratios")
                if set(given) != set(implied) or any(abs(given[k] - implied[k]) > 1e-9 for k in implied):
                    raise ValueError(f"`ratios` {given} disagrees with `replay_ratio` {r}: set only one of them")
            self.replay_ratio, self.ratios = r, implied
        elif self.ratios is None:
            raise ValueError("`ratios` (shares per source) or `replay_ratio` (share of general text) must be set")
        self.ratios = check_ratios(self.ratios, "ratios")


def ratios_at(block: int, ratios: Mapping[str, float], stages: Sequence[RatioStage] = (),
              total_blocks: int | None = None) -> Mapping[str, float]:
    """The shares in force for block index `block`: the last stage whose start (as a block index) is <= it."""
    current = ratios
    for stage in stages:
        if total_blocks is None:
            raise ValueError("`total_blocks` is required when ratio `stages` are set")
        if block >= math.floor(stage.start * total_blocks):
            current = stage.ratios
    return current


def allocate_shares(credits: Mapping[str, float], ratios: Mapping[str, float], amount: int
                    ) -> tuple[dict[str, int], dict[str, float]]:
    """Split `amount` units between sources by credit; return (units per source, new credits).

    Sources are visited in the order of `ratios`; ties go to the earlier source, so the result is deterministic.
    """
    earned = {k: credits.get(k, 0.0) + ratios[k] * amount for k in ratios}
    alloc = {k: max(math.floor(v), 0) for k, v in earned.items()}
    left = amount - sum(alloc.values())
    if left < 0:  # only reachable through float error on tiny credits; take units back from the smallest parts
        for k in sorted(alloc, key=lambda k: earned[k] - alloc[k]):
            while left < 0 and alloc[k] > 0:
                alloc[k] -= 1
                left += 1
    order = sorted(earned, key=lambda k: earned[k] - alloc[k], reverse=True)  # stable: ties keep source order
    for k in order[:left]:
        alloc[k] += 1
    return alloc, {k: earned[k] - alloc[k] for k in earned}


def assign_blocks(num_blocks: int, ratios: Mapping[str, float]) -> list[str]:
    """The source of each of `num_blocks` blocks at fixed `ratios` (block granularity), from zero credit."""
    credits: dict[str, float] = {}
    out = []
    for _ in range(num_blocks):
        alloc, credits = allocate_shares(credits, ratios, 1)
        out.append(next(k for k, v in alloc.items() if v))
    return out


def document_indices(texts: Sequence[Any], where: str = "corpus") -> list[int]:
    """Indices of the documents to train on in a batch of text values: blank strings are skipped (empty lines of
    a corpus); a value that is not a string (null, a number, a list) is refused, never dropped without a word.

    Raises:
        ValueError: naming `text_field` and `where` (the corpus or split).
    """
    keep = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            shown = "null" if text is None else f"a {type(text).__name__}"
            raise ValueError(f"`text_field`: a row of {where} holds {shown} ({str(text)[:40]!r}) where the text "
                             "should be, not a string; every row's text must be a string (fix or drop that row)")
        if text.strip():
            keep.append(i)
    return keep


def pack_blocks(token_lists: list[list[int]], block_size: int, sep_id: int | None) -> list[list[int]]:
    """Concatenate documents (each followed by `sep_id`) and cut them into full blocks of `block_size`.

    The tail shorter than a block is dropped: every block is exactly `block_size` tokens, with no padding.
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if sep_id is not None:
            stream.append(sep_id)
    usable = len(stream) - len(stream) % block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]


def check_mixer_state(state: dict[str, Any], names: Sequence[str], fingerprint: dict[str, Any], strict: bool,
                      how_to_switch: str) -> None:
    """Refuse a saved mixer position for other sources, or (with `strict`) written with other mixing settings;
    `how_to_switch` ends the second message (how to continue with the new settings anyway)."""
    if set(state.get("sources", {})) != set(names):
        raise ValueError(f"the mixer state is for sources {sorted(state.get('sources', {}))}, this mixer has "
                         f"{sorted(names)}; resume with the same sources")
    if strict and state.get("config") != fingerprint:
        old = state.get("config", {})
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new!r}" for k, new in fingerprint.items() if old.get(k) != new)
        raise ValueError(f"the checkpoint's mixer was configured differently ({diff}); resuming would not "
                         f"continue the same stream. Restore the original settings, or {how_to_switch}")
