"""The package's sources compile without warnings and their docstrings hold no control characters: an invalid
escape such as ``\\s`` in a docstring is a warning when the source compiles (a ``SyntaxWarning`` users see from
Python 3.12 on), and a valid one where LaTeX was meant (``\\top``, ``\\beta``, ``\\frac``) silently garbles it. Math
in docstrings belongs in raw strings."""

import ast
import warnings
from pathlib import Path

import pytest

import lightning_lip

PACKAGE = Path(lightning_lip.__file__).parent
CONTROL = "\a\b\f\v\r\t"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_sources_compile_without_warnings_and_docstrings_hold_no_control_characters(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = ast.parse(path.read_text(), str(path))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef))]
    for node in nodes:
        doc = ast.get_docstring(node, clean=False) or ""
        assert not set(doc) & set(CONTROL), f"{getattr(node, 'name', 'module')}: {doc[:80]!r}"
