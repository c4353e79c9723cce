"""Field checks shared by every config dataclass: one set of rules, one message shape.

Every check takes the field's name and value, returns the (normalised) value, and raises ``ValueError`` naming the
field in backticks and saying what it must be, e.g. ```learning_rate` must be a number > 0, got 'fast'``. Configs
call these from ``__post_init__``; `CPTConfig` prefixes the name with its dotted path (``train.learning_rate``).

Rules: booleans are never numbers (``True`` is not ``1``); NaN and infinities are refused unless a check says
otherwise; ints are accepted where floats are, never the reverse.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any


class ConfigTypeError(TypeError):
    """A value of the wrong type in a config or a command's input, named by its field: bad input (the CLI shows it as
    one line), unlike a `TypeError` from a bug, which keeps its traceback."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = 1, maximum: int | None = None, *,
              optional: bool = False) -> int | None:
    """An integer (not a bool) in [`minimum`, `maximum`] (either bound may be None); None too when `optional`."""
    if optional and value is None:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        raise ValueError(f"`{name}` must be an integer {_range(minimum, maximum, True, True)}, got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """A finite real number (not a bool) within the bounds; returns it as a float."""
    ok = _is_number(value) and math.isfinite(value)
    if ok and minimum is not None and (value < minimum or (not min_inclusive and value == minimum)):
        ok = False
    if ok and maximum is not None and (value > maximum or (not max_inclusive and value == maximum)):
        ok = False
    if not ok:
        rng = _range(minimum, maximum, min_inclusive, max_inclusive)
        what = rng or "a finite number"
        raise ValueError(f"`{name}` must be {what}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """A number in [0, 1]: a ratio, a share or a probability."""
    return check_number(name, value, 0.0, 1.0)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of `choices` (compared with ==; bools never match strings)."""
    choices = tuple(choices)
    if isinstance(value, bool) or value not in choices:
        listed = ", ".join(str(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {listed}, got {value!r}")
    return value


def check_known_name(name: str, value: Any, choices: Iterable[str], what: str = "name") -> str:
    """One of a long list of `choices` (optimizer or scheduler names); the error lists the closest few, not all."""
    import difflib

    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=4, cutoff=0.5) or choices[:4]
        raise ValueError(f"`{name}` must be a known {what}, got {value!r}; close valid names: {', '.join(close)}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be true or false, got {value!r}")
    return value


def check_name(name: str, value: Any) -> str:
    """A non-empty string (a name, a path, a column)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"`{name}` must be a non-empty string, got {value!r}")
    return value


def check_flag(name: str, value: Any, choices: tuple[str, ...] = ("auto", "true", "false")) -> str:
    """A tri-state setting such as ``auto|true|false``; YAML booleans become ``"true"``/``"false"``."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    if value not in choices:
        raise ValueError(f"`{name}` must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
    return value


def _range(lo: float | None, hi: float | None, lo_inc: bool, hi_inc: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'[' if lo_inc else '('}{lo:g}, {hi:g}{']' if hi_inc else ')'}"
    if lo is not None:
        return f"{'>=' if lo_inc else '>'} {lo:g}"
    if hi is not None:
        return f"{'<=' if hi_inc else '<'} {hi:g}"
    return ""


def build_list_item(cls: type, value: Any, path: str, expected: str, required: Iterable[str] = ()) -> Any:
    """One item of a list of config blocks (`cycles[i]`, `guards[i]`) as a `cls` dataclass, from YAML data or an
    instance, with every error naming `path.field`.

    Args:
        cls: the item's dataclass.
        value: a `cls` (returned as is) or a mapping of its fields.
        path: how errors name the item (`"cycles[0]"`).
        expected: what a non-mapping is told it must be (`"a mapping of cycle fields"`).
        required: fields named as missing before the dataclass is built.
    """
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"`{path}` must be {expected}, got {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in value:
        if key not in known:
            raise ValueError(f"unknown field `{path}.{key}` (known: {', '.join(sorted(known))})")
    for key in required:
        if key not in value:
            raise ValueError(f"`{path}.{key}` is required")
    try:
        return cls(**value)
    except ValueError as e:
        msg = str(e)
        for name in known:
            msg = msg.replace(f"`{name}`", f"`{path}.{name}`")
        raise ValueError(msg) from None
