"""Every pure core of hf-cpt in one namespace: plain Python / tensors in, new values out, no Trainer.

The list comes from the technique registry: each technique names its cores in its entry (`Technique.functional`,
see `hf_cpt.registry`), and docs/architecture.md maps each technique to them. Each function is documented where it
is defined; `hf_cpt.functional.<name>` is that same function.
"""

from __future__ import annotations

import importlib as _importlib
from typing import Any as _Any

from .registry import functional_cores as _functional_cores
from .registry import module_path as _module_path


def _core(name: str, module: str) -> _Any:
    return getattr(_importlib.import_module(_module_path(module)), name)


globals().update({_name: _core(_name, _module) for _name, _module in _functional_cores().items()})
__all__ = list(_functional_cores())


def __getattr__(name: str) -> _Any:
    # a core of a technique registered after this module was imported
    cores = _functional_cores()
    if name in cores:
        return _core(name, cores[name])
    raise AttributeError(f"module 'hf_cpt.functional' has no attribute {name!r}")
