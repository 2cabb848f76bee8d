"""Package boundaries, read from the source with ast: what may import what.

Imports inside functions count too: they run the moment the function is called.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "biosam2"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


@functools.cache
def imported_modules(name: str) -> frozenset[str]:
    """biosam2 modules that importing ``name`` (or calling its functions) imports, with their packages."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . / .. import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    # importing biosam2.a.b runs biosam2/a/__init__.py first (the importing module's own packages
    # have run already: a package's __init__ importing its modules is not a cycle)
    with_packages = {".".join(m.split(".")[:i]) for m in found for i in range(2, m.count(".") + 2)}
    return frozenset(m for m in with_packages if m in MODULES and m != name and not name.startswith(m + "."))


def reachable(start: str) -> dict[str, str]:
    """Every biosam2 module that importing ``start`` can import, each with the module that imports it."""
    seen, todo = {start: ""}, [start]
    while todo:
        current = todo.pop()
        for module in imported_modules(current):
            if module not in seen:
                seen[module] = current
                todo.append(module)
    return seen


def test_inference_never_imports_training():
    """Prediction is what a deployed model runs: it must not pull in Lightning and the training code."""
    inference = sorted(m for m in MODULES if m.startswith("biosam2.inference"))
    assert "biosam2.inference.predict_files" in inference
    offending = []
    for start in inference:
        via = reachable(start)
        for module in via:
            if module.startswith("biosam2.training"):
                chain = [module]
                while via[chain[-1]]:
                    chain.append(via[chain[-1]])
                offending.append(" <- ".join(chain))
    assert not offending, offending


def test_no_import_cycles():
    """model.artifact -> factory -> segmenter -> artifact was one: no module may need itself to load."""
    cycles = sorted(
        f"{name} -> ... -> {name}" for name in MODULES if any(name in imported_modules(m) for m in reachable(name) if m != name)
    )
    assert not cycles, cycles


def test_tests_import_conftest_as_conftest_so_the_suite_runs_from_any_directory():
    """Importing the test package's conftest by its package path works only from the repository root."""
    from pathlib import Path

    pattern = "from " + "tests." , "import " + "tests."  # spelled apart: this file must not match itself
    offenders = [p.name for p in Path(__file__).parent.glob("test_*.py") if any(text in p.read_text() for text in pattern)]
    assert offenders == []
