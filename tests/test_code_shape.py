"""The code keeps the shape that makes it readable: no function in keras_es over 60
lines, no class over 300 (docstrings included). Ruff's complexity (C901) and
argument-count (PLR0913) rules, configured in pyproject.toml, guard the rest."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_es"
LIMITS = {ast.FunctionDef: 60, ast.AsyncFunctionDef: 60, ast.ClassDef: 300}


def _definitions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if type(node) in LIMITS:
                yield path.relative_to(PACKAGE.parent).as_posix(), node


@pytest.mark.parametrize("kind", ["function", "class"])
def test_no_definition_is_over_its_limit(kind):
    too_long = []
    for path, node in _definitions():
        if (kind == "class") != isinstance(node, ast.ClassDef):
            continue
        lines = node.end_lineno - node.lineno + 1
        if lines > LIMITS[type(node)]:
            too_long.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    limit = LIMITS[ast.ClassDef if kind == "class" else ast.FunctionDef]
    assert not too_long, f"{kind}s over {limit} lines: {too_long}"
