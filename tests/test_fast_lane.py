"""The fast lane's own check (tests/exercised.py): it lists every hf_cpt module and sees which ran a function."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import hf_cpt

from .exercised import NotingFinder, package_modules


def test_every_module_of_the_package_is_listed():
    root = Path(hf_cpt.__file__).parent
    modules = package_modules(root)
    assert len(modules) == len(list(root.rglob("*.py")))
    assert {"hf_cpt", "hf_cpt.config", "hf_cpt.cli.main", "hf_cpt.recipe.train", "hf_cpt.vocab.init"} <= set(modules)
    assert modules["hf_cpt.config"] and not modules["hf_cpt.cli"]  # cli/__init__.py only documents


def test_the_hook_notes_each_module_whose_functions_ran_and_changes_nothing_else(tmp_path, monkeypatch):
    pkg = tmp_path / "lanepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "used.py").write_text('def f(x):\n    """Doc."""\n    return x + 1\n\n\ndef boom():\n    raise ValueError("line 7")\n')
    (pkg / "unused.py").write_text("class C:\n    __slots__ = ()\n\n    def g(self):\n        return 2\n")
    (pkg / "reexport.py").write_text("from .used import f\n")
    assert package_modules(pkg) == {"lanepkg": False, "lanepkg.used": True, "lanepkg.unused": True,
                                    "lanepkg.reexport": False}
    monkeypatch.syspath_prepend(str(tmp_path))
    ran: set[str] = set()
    finder = NotingFinder(ran, package="lanepkg")
    sys.meta_path.insert(0, finder)
    try:
        used = importlib.import_module("lanepkg.used")
        importlib.import_module("lanepkg.unused")  # a class body runs at import: it is no function
        importlib.import_module("lanepkg.reexport")
        assert ran == set()
        assert used.f(1) == 2 and used.f.__doc__ == "Doc."
        assert ran == {"lanepkg.used"}
        with pytest.raises(ValueError) as info:
            used.boom()
        assert info.tb.tb_next.tb_lineno == 7  # line numbers as in the file
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m == "lanepkg" or m.startswith("lanepkg.")]:
            del sys.modules[name]
