"""The package's layering, checked on its source: techniques -> config -> recipe -> CLI, one way, no circles."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hf_cpt

PKG = Path(hf_cpt.__file__).resolve().parent
TECHNIQUES = ("hf_cpt.callbacks", "hf_cpt.mixers", "hf_cpt.collators", "hf_cpt.vocab", "hf_cpt.losses",
              "hf_cpt.liger", "hf_cpt.adapters", "hf_cpt.param_groups", "hf_cpt.synth", "hf_cpt.base_targets", "hf_cpt.dynamics",
              "hf_cpt.validation", "hf_cpt.utils", "hf_cpt.import_utils", "hf_cpt.evaluation", "hf_cpt.output_lock",
              "hf_cpt.yaml_loader", "hf_cpt.registry", "hf_cpt.monitoring", "hf_cpt.schedules", "hf_cpt.plasticity",
              "hf_cpt.data_clean")
ABOVE_TECHNIQUES = ("hf_cpt.config", "hf_cpt.recipe", "hf_cpt.cli", "hf_cpt.templates", "hf_cpt.testing")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """Every hf_cpt module -> the hf_cpt modules it imports anywhere in its body (function-level imports too,
    `TYPE_CHECKING` blocks excluded)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node.level, node.module) if node.level else \
                    node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t.startswith("hf_cpt") and t in modules and t != name}
        graph[name] = deps
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is not a layering cycle
            if node.startswith(dep + ".") or dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "hf_cpt.recipe.data" in graph["hf_cpt.recipe.train"]  # imported inside a function
    assert "hf_cpt.config" in graph["hf_cpt.recipe.data"]


def test_no_import_cycle():
    assert _find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["hf_cpt.callbacks.forgetting"] = graph["hf_cpt.callbacks.forgetting"] | {"hf_cpt.recipe.train"}
    assert _find_cycle(graph) is not None


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_techniques_never_import_the_layers_above(technique):
    graph = import_graph()
    offenders = {f"{m} -> {d}" for m, deps in graph.items() if m == technique or m.startswith(technique + ".")
                 for d in deps if d.startswith(ABOVE_TECHNIQUES)}
    assert not offenders


def test_no_cfg_any_to_dodge_an_import():
    hits = [f"{p.relative_to(PKG)}: {line.strip()}" for p in PKG.rglob("*.py")
            for line in p.read_text(encoding="utf-8").splitlines() if re.search(r"\bcfg: Any\b", line)]
    assert not hits


@pytest.mark.slow  # a Python process of its own
def test_config_module_does_not_claim_to_be_import_light():
    # hf_cpt.config imports the techniques' configs and with them torch; it must not say otherwise
    src = (PKG / "config.py").read_text(encoding="utf-8")
    assert "import-light" not in src
    out = subprocess.run([sys.executable, "-c", "import sys, hf_cpt.config; print('torch' in sys.modules)"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"  # documented in the module docstring ("and with them torch")


def test_import_hf_cpt_stays_light():
    out = subprocess.run([sys.executable, "-c", "import sys, hf_cpt; print(sorted(m for m in ('torch', "
                          "'transformers', 'spacy', 'typer', 'liger_kernel') if m in sys.modules))"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_holds_no_config_mutation_or_file_writing():
    src = (PKG / "cli" / "main.py").read_text(encoding="utf-8")
    tree = ast.parse(src)
    writes = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and n.func.attr in ("write_text", "write_bytes", "mkdir", "replace", "rename", "unlink", "to_yaml")]
    opens = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id in ("open", "setattr")]
    assigns = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign))
               for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Attribute)]
    replaces = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "replace"
                and isinstance(n.value, ast.Name) and n.value.id == "dataclasses"]
    assert not (writes or opens or assigns or replaces), (writes, opens, assigns, replaces)


def test_callbacks_live_in_callbacks():
    from transformers import TrainerCallback

    outside = []
    for path in PKG.rglob("*.py"):
        name = _module_name(path)
        if name.startswith("hf_cpt.callbacks") or name in ("hf_cpt", "hf_cpt.testing"):
            continue
        module = importlib.import_module(name)
        outside += [f"{name}.{n}" for n, obj in vars(module).items() if inspect.isclass(obj)
                    and issubclass(obj, TrainerCallback) and obj.__module__ == name]
    assert not outside


# pure cores: formulas testable without transformers (a numpy CMR fit, a schedule, a tolerance rule)
CORES = ("hf_cpt.mixers.core", "hf_cpt.mixers.packing", "hf_cpt.mixers.cmr", "hf_cpt.dynamics", "hf_cpt.losses",
         "hf_cpt.schedules", "hf_cpt.plasticity",
         "hf_cpt.registry", "hf_cpt.validation", "hf_cpt.monitoring")


def module_level_imports() -> dict[str, set[str]]:
    """Every hf_cpt module -> what it imports when it is imported (module level only; `TYPE_CHECKING` blocks and
    function bodies excluded): hf_cpt modules and top-level third-party package names."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps: set[str] = set()
        todo = list(tree.body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                todo += node.body + node.orelse + getattr(node, "finalbody", []) + \
                    [n for h in getattr(node, "handlers", []) for n in h.body]
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node.level, node.module) if node.level else \
                    node.module or ""
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        # importing a module runs its parent packages' __init__ first
        parts = name.split(".")
        deps |= {".".join(parts[:i]) for i in range(1, len(parts))}
        out[name] = {d if d.startswith("hf_cpt") else d.split(".")[0] for d in deps} - {name}
    return out


def _loads(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [d for d in graph.get(m, ()) if d.startswith("hf_cpt")]
    return {d for m in seen for d in graph.get(m, ()) if not d.startswith("hf_cpt")} | seen


@pytest.mark.parametrize("core", CORES)
def test_technique_cores_import_no_transformers(core):
    graph = module_level_imports()
    assert core in graph
    loaded = _loads(core, graph)
    assert "transformers" not in loaded, sorted(m for m in loaded if m.startswith("hf_cpt"))


def test_the_core_check_sees_a_transformers_import():
    graph = module_level_imports()
    assert "transformers" in _loads("hf_cpt.callbacks.rewarm", graph)
    planted = {**graph, "hf_cpt.mixers.cmr": {"hf_cpt.callbacks.forgetting"}}
    assert "transformers" in _loads("hf_cpt.mixers.cmr", planted)


def test_every_functional_core_lives_in_a_module_without_transformers():
    # what `hf_cpt.functional` lists (each technique's `Technique.functional`) is testable without transformers
    from hf_cpt.registry import functional_cores

    graph = module_level_imports()
    heavy = sorted(f"{name} (hf_cpt.{module})" for name, module in functional_cores().items()
                   if "transformers" in _loads(f"hf_cpt.{module}", graph))
    assert not heavy


def test_no_two_modules_share_a_file_name():
    """A file name names one concept: `distill.py` three times over (vocab init, the replay collator, the KL
    estimator) is what this guards against. Package `__init__.py` files and the CLI's `__main__` are exempt."""
    seen: dict[str, list[str]] = {}
    for path in PKG.rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            seen.setdefault(path.name, []).append(str(path.relative_to(PKG)))
    shared = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not shared, f"modules sharing a file name: {shared}"
