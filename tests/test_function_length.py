"""Small modules with one job (issue 23): no function of the shipped code is longer
than 100 lines."""
from __future__ import annotations

import ast

from tests.conftest import REPO

MAX_LINES = 100


def test_no_long_functions_in_shipped_code():
    long = []
    for pkg in ("shards", "recipes", "dist_train", "models", "launch"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 100 lines:\n" + "\n".join(long)
