"""The fast lane covers every module: under `pytest -m "not slow"` over the whole suite, the session fails if some
hf_cpt module had none of its functions run during a test.

How it knows, at no measurable cost: in a `-m "not slow"` session, before anything imports hf_cpt, an import hook
compiles each hf_cpt module from its source with one statement added at the top of every function body,
`__hf_cpt_ran__.add(__name__)` (same line numbers, nothing else changed; a trace function would slow every Python
frame of torch and transformers too). What runs at import time does not count: the set is emptied once collection
is done. A module that defines no function (a re-export `__init__`) counts once imported. Other sessions, and the
subprocesses tests start, run hf_cpt as compiled normally. Under pytest-xdist the controller takes the union of
what the workers ran.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PACKAGE = "hf_cpt"
_NAME = "__hf_cpt_ran__"  # a module global the hook adds; dunder-ended, so class bodies do not mangle it
_KEY = "hf_cpt_exercised"


def package_modules(root: Path) -> dict[str, bool]:
    """Every module of the package at `root` (a directory) -> whether it defines a function."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules[name] = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(tree))
    return modules


class _NoteFunctionEntry(ast.NodeTransformer):
    """Prepend `__hf_cpt_ran__.add(__name__)` to every function body (after its docstring)."""

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        first = node.body[0]
        has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
            first.value.value, str)
        note = ast.parse(f"{_NAME}.add(__name__)").body[0]
        anchor = node.body[1] if has_doc and len(node.body) > 1 else first  # the line of the first statement
        for child in ast.walk(note):
            ast.copy_location(child, anchor)
        node.body.insert(1 if has_doc else 0, note)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef


class _NotingLoader(importlib.machinery.SourceFileLoader):
    """Compiles from source every time (never from, nor into, `__pycache__`), with the entry notes."""

    ran: set[str]

    def exec_module(self, module):
        module.__dict__[_NAME] = self.ran
        super().exec_module(module)

    def get_code(self, fullname):
        tree = ast.parse(self.get_data(self.path), filename=self.path)
        return compile(_NoteFunctionEntry().visit(tree), self.path, "exec", dont_inherit=True)


class NotingFinder(importlib.abc.MetaPathFinder):
    """Loads `package` and its submodules through `_NotingLoader`, adding names to `ran` as functions run."""

    def __init__(self, ran: set[str], package: str = PACKAGE):
        self.ran, self.package = ran, package

    def find_spec(self, fullname, path, target=None):
        if fullname != self.package and not fullname.startswith(self.package + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        loader = _NotingLoader(fullname, spec.origin)
        loader.ran = self.ran
        spec.loader = loader
        return spec


def is_whole_fast_lane(config: pytest.Config, collected: set[Path]) -> bool:
    """`-m "not slow"` over every test file, nothing else deselected."""
    return (config.getoption("markexpr") == "not slow" and not config.getoption("keyword")
            and not config.getoption("deselect", None) and not config.getoption("lf", False)
            and collected >= set(TESTS.rglob("test_*.py")))


class ExercisedModules:
    """The pytest plugin, registered by conftest in `pytest_configure` (before any test module imports hf_cpt)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        root = Path(importlib.util.find_spec(PACKAGE).origin).parent  # found, not imported
        self.modules = package_modules(root)
        self.ran: set[str] = set()
        self.collected: set[Path] = set()
        self.active = config.getoption("markexpr") == "not slow"
        self.unexercised: list[str] | None = None
        if self.active:
            if any(m == PACKAGE or m.startswith(PACKAGE + ".") for m in sys.modules):
                raise RuntimeError("tests/exercised.py: hf_cpt was imported before the fast lane's import hook")
            sys.meta_path.insert(0, NotingFinder(self.ran))

    def pytest_collectreport(self, report):  # every file collected, even one whose tests all skip
        self.collected.add(self.config.rootpath / report.nodeid.split("::")[0])

    def pytest_collection_finish(self, session):
        self.ran.clear()  # import-time calls (decorators, registries) do not count
        self.active = self.active and is_whole_fast_lane(self.config, self.collected)

    def _unexercised(self) -> set[str]:
        return {name for name, has_functions in self.modules.items()
                if (name not in self.ran if has_functions else name not in sys.modules)}

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        if session.exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):  # interrupted, errors
            self.unexercised = None
            return
        if hasattr(self.config, "workeroutput"):  # an xdist worker: the controller reports
            if self.active:
                self.config.workeroutput[_KEY] = sorted(self._unexercised())
            return
        if self.active and self.unexercised is None and not getattr(self.config.option, "numprocesses", None):
            self.unexercised = sorted(self._unexercised())
        if self.unexercised:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist it never runs
    def pytest_testnodedown(self, node, error):  # xdist controller: a module counts if any worker exercised it
        missed = getattr(node, "workeroutput", {}).get(_KEY)
        if missed is not None:
            self.unexercised = sorted(set(missed) & set(missed if self.unexercised is None else self.unexercised))

    def pytest_terminal_summary(self, terminalreporter):
        if self.unexercised is None:
            return
        if self.unexercised:
            terminalreporter.section("fast lane: modules no test exercised", red=True)
            terminalreporter.line("No non-slow test ran a function of: " + ", ".join(self.unexercised))
            terminalreporter.line("Add a cheap test for each (tiny config-built models: see tests/conftest.py).")
        else:
            terminalreporter.line(f"fast lane: every one of the {len(self.modules)} hf_cpt modules was exercised")
