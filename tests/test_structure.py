"""The package's import graph: no module depends on itself through others."""

import ast
import subprocess
import sys
from pathlib import Path

import npsparse

PACKAGE = Path(npsparse.__file__).parent


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package modules ``name`` imports anywhere in its text (top level or inside a function:
    a lazy import is still a dependency)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                     for a in node.names]
        else:
            continue
        out |= {m for m in found if m in modules and m != name}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    modules = module_names()
    graph = {name: imports(name, path, modules) for name, path in modules.items()}
    assert graph["npsparse.packing"] >= {"npsparse.api", "npsparse.io.packed"}  # the check sees
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_a_subcommand_imports_only_what_it_needs():
    """Running ``npsparse prune`` builds only prune's options: the training engine, packing and
    the packed-folder reader are not imported (they were, to show finetune's defaults)."""
    code = ("import sys\nfrom npsparse.cli import main\n"
            "try:\n    main(['prune', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('npsparse')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    loaded = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert "npsparse.sequential" in loaded and "npsparse.prune" in loaded  # it did build prune
    assert not {m for m in loaded if m.startswith(("npsparse.train", "npsparse.packing",
                                                    "npsparse.io.packed"))}
