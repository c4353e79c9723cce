"""The one tolerance rule of hf-cpt, a pure core: how far a held-out metric may move from its value at step 0.

The forgetting monitor's guard (`callbacks/forgetting.py`), the downstream guard, the CMR fit (`mixers/cmr.py`) and
the learning-dynamics planner all use it; it imports neither torch nor transformers.
"""

from __future__ import annotations

from .validation import check_choice

TOLERANCE_MODES = ("relative", "absolute")


def tolerance_bound(baseline: float, tolerance: float, mode: str = "relative") -> float:
    """The highest value allowed: ``baseline * (1 + tolerance)`` (relative) or ``baseline + tolerance`` (absolute).

    The one tolerance rule of hf-cpt: the forgetting monitor's guard and the CMR fit both use it.
    """
    check_choice("tolerance_mode", mode, TOLERANCE_MODES)
    return baseline * (1 + tolerance) if mode == "relative" else baseline + tolerance


def exceeds_tolerance(baseline: float, current: float, tolerance: float, mode: str = "relative") -> bool:
    """Whether `current` (e.g. the general loss) has risen past the tolerance over `baseline`."""
    return current > tolerance_bound(baseline, tolerance, mode)
