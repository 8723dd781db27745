"""The import direction promised in docs/architecture.md, checked on the code:
``launch`` <- ``dist_train`` -> ``recipes`` -> ``models``, ``shards``, and no
import cycle between modules (imports inside functions count too)."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("launch", "dist_train", "recipes", "models", "shards")
# package -> the packages of ours it may import (besides itself)
ALLOWED = {
    "launch": set(),
    "dist_train": {"launch", "recipes", "models", "shards"},
    "recipes": {"models", "shards"},
    "models": set(),
    "shards": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            # "from pkg import name" may import the submodule pkg.name
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names] + [(node.lineno, mod)]
    return out


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    modules = {module_name(p): p for p in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for _, target in imports_of(path):
            if target in modules and target != name:
                edges[name].add(target)
    return edges


def test_no_import_runs_against_the_layering():
    bad = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for line, target in imports_of(path):
                top = target.split(".")[0]
                if top in PACKAGES and top != pkg and top not in ALLOWED[pkg]:
                    bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(set(bad)))


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_sees_a_forbidden_edge(tmp_path):
    """The checker itself: a models file importing recipes is reported."""
    fake = REPO / "models" / "_layering_probe.py"
    fake.write_text("from recipes.base import Recipe\n")
    try:
        assert any(t == "recipes.base" for _, t in imports_of(fake))
        try:
            test_no_import_runs_against_the_layering()
        except AssertionError as exc:
            assert "models/_layering_probe.py:1 imports recipes.base" in str(exc)
        else:
            raise AssertionError("the forbidden edge was not reported")
    finally:
        fake.unlink()
