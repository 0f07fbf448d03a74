"""Backends are rule tables plus the checks that run them: they import what they use at the top,
where a reader (and Python) sees the dependency, never inside a function where an import circle
can hide (issue 18: four backends reached into qcompile.providers and qcompile.cache that way)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BACKENDS = sorted((Path(__file__).resolve().parents[2] / "backends").glob("*.py"))


@pytest.mark.parametrize("path", BACKENDS, ids=lambda p: p.name)
def test_a_backend_imports_qcompile_only_at_the_top(path):
    tree = ast.parse(path.read_text())
    nested = [
        f"{path.name}:{node.lineno} {ast.unparse(node)}"
        for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qcompile")
    ]
    assert not nested, nested


@pytest.mark.parametrize("module", [f"qcompile.backends.{p.stem}" for p in BACKENDS if p.stem != "__init__"])
def test_each_backend_imports_first_in_a_fresh_interpreter(module):
    """Imported before anything else of qcompile: a circle through its top-level imports fails here."""
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=120)
