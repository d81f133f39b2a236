"""Every public function of the package has a numpydoc docstring (STYLE.md habit 11).

Read from the source with ``ast``, so nothing is imported or compiled. A function or method is
public when neither it, its enclosing class nor its module starts with ``_``
(``kernels/_simd.py`` and the like are internal: their one-line docstrings are the private-helper
standard); ``@overload`` implementations
(Numba's ``overload`` of a Python helper) are the helper's, not API. A public function needs a
docstring, and if it takes arguments besides ``self``/``cls``, a ``Parameters`` section, except
the CLI's ``cmd_*`` functions: each takes the parsed arguments, which its ``--help`` documents,
so one line says what it does.
The benchmark drivers (``npsparse/benchmarks``) are scripts behind ``npsparse bench`` and are
held to the CLI's standard instead: documented by their ``--help``.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "npsparse"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py")
                 if "benchmarks" not in p.parts and not p.name.startswith("_") or p.name == "__init__.py")


def _is_overload(func: ast.FunctionDef) -> bool:
    for decorator in func.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Name) and target.id == "overload":
            return True
    return False


def public_functions(tree: ast.Module, prefix: str = ""):
    """(qualified name, FunctionDef) of each public function or method under ``tree``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from public_functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            if not _is_overload(node):
                yield prefix + node.name, node


def problems(source: str) -> list[str]:
    """What is wrong with the docstrings of ``source``'s public functions, one line each."""
    found = []
    for name, func in public_functions(ast.parse(source)):
        doc = ast.get_docstring(func) or ""
        args = [a.arg for a in func.args.posonlyargs + func.args.args + func.args.kwonlyargs
                if a.arg not in ("self", "cls")]
        if func.args.vararg:
            args.append(func.args.vararg.arg)
        if not doc:
            found.append(f"{name}: no docstring")
        elif args and "Parameters\n----------" not in doc and not name.startswith("cmd_"):
            found.append(f"{name}: takes {', '.join(args)} but has no Parameters section")
    return found


def test_the_check_finds_what_it_should():
    source = '''
def documented(x):
    """Sum.

    Parameters
    ----------
    x : np.ndarray
    """
def no_args():
    """Fine without Parameters."""
def bare(x):
    pass
def one_line(x):
    """Only a summary."""
def _private(x):
    pass
class Thing:
    def method(self, y):
        """Summary."""
    def prop(self):
        """No arguments."""
class _Hidden:
    def method(self, y):
        pass
'''
    assert problems(source) == [
        "bare: no docstring",
        "one_line: takes x but has no Parameters section",
        "Thing.method: takes y but has no Parameters section",
    ]


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_public_functions_have_numpydoc(path):
    found = problems(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(PACKAGE.parent)}:\n  " + "\n  ".join(found)
