"""Every public function of the package has a numpydoc docstring.

Read from the source with ``ast``, so nothing is imported or compiled. A function or method is
public when neither it, its enclosing class nor its module starts with ``_``
(``kernels/_simd.py`` and the like are internal: their one-line docstrings are the private-helper
standard); ``@overload`` implementations
(Numba's ``overload`` of a Python helper) are the helper's, not API. A public function needs a
docstring, and if it takes arguments besides ``self``/``cls``, a ``Parameters`` section, except
the CLI's ``cmd_*`` functions: each takes the parsed arguments, which its ``--help`` documents,
so one line says what it does. A method that overrides a documented method of a base class in
the package (``LlamaModel.embed`` of ``CausalLM.embed``) also carries one line: the base method's
sections are its contract.
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


def public_functions(tree: ast.Module, prefix: str = "", cls: ast.ClassDef | None = None):
    """(qualified name, FunctionDef, enclosing class) of each public function under ``tree``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from public_functions(node, prefix + node.name + ".", node)
        elif isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            if not _is_overload(node):
                yield prefix + node.name, node, cls


def class_table(sources) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Every class of ``sources``: name -> (base class names, method name -> docstring)."""
    table = {}
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                         for b in node.bases]
                methods = {f.name: ast.get_docstring(f) or "" for f in node.body
                           if isinstance(f, ast.FunctionDef)}
                table[node.name] = (bases, methods)
    return table


def overrides_documented(cls: str, method: str, table: dict, seen=()) -> bool:
    """Whether a base of ``cls`` (transitively) documents ``method`` with numpydoc sections."""
    for base in table.get(cls, ([], {}))[0]:
        if base in seen or base not in table:
            continue
        doc = table[base][1].get(method, "")
        if "Parameters\n----" in doc or "Returns\n----" in doc:
            return True
        if overrides_documented(base, method, table, (*seen, cls)):
            return True
    return False


def problems(source: str, table: dict | None = None) -> list[str]:
    """What is wrong with the docstrings of ``source``'s public functions, one line each
    (``table``: :func:`class_table` of the whole package, to recognise overrides)."""
    table = class_table([source]) if table is None else table
    found = []
    for name, func, cls in public_functions(ast.parse(source)):
        doc = ast.get_docstring(func) or ""
        args = [a.arg for a in func.args.posonlyargs + func.args.args + func.args.kwonlyargs
                if a.arg not in ("self", "cls")]
        if func.args.vararg:
            args.append(func.args.vararg.arg)
        if not doc:
            found.append(f"{name}: no docstring")
        elif (args and "Parameters\n----------" not in doc and not name.startswith("cmd_")
              and not (cls and overrides_documented(cls.name, func.name, table))):
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
class Base:
    def run(self, z):
        """Run.

        Parameters
        ----------
        z : int
        """
class Child(Base):
    def run(self, z):
        """One line is enough: Base.run documents z."""
    def extra(self, z):
        """But a method of its own is not."""
'''
    assert problems(source) == [
        "bare: no docstring",
        "one_line: takes x but has no Parameters section",
        "Thing.method: takes y but has no Parameters section",
        "Child.extra: takes z but has no Parameters section",
    ]


TABLE = class_table(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_public_functions_have_numpydoc(path):
    found = problems(path.read_text(encoding="utf-8"), TABLE)
    assert not found, f"{path.relative_to(PACKAGE.parent)}:\n  " + "\n  ".join(found)
