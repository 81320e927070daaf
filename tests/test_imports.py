"""The package's layout: imports point one way, imports sit at the top, functions stay short.

The import graph is read from the source (no module is imported): every `import` and
`from ... import` anywhere in a module, inside functions too, plus the names a package's
`__init__` imports on first use (`_EXPORTS`). The reference is the module map of
docs/design.md.
"""

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "fdh_jax"

# docs/design.md, "Module map": each part imports only parts of earlier layers (or itself).
LAYERS = [
    {"common", "parallel", "config_files"},
    {"data"},
    {"models"},
    {"search"},
    {"config_checks", "encoding"},
    {"evaluation"},
    {"training"},
    {"serving"},
    {"retrieval", "main"},
]
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The fdh_jax modules an import statement loads (`from a import b`: `a.b` if a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert node.level == 0, "relative imports are not used in fdh_jax"
        base = node.module or ""
        names = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names
        ]
    return [name for name in names if name in modules]


def _lazy_exports(tree: ast.Module) -> list[str]:
    """The modules of a package `__init__`'s `_EXPORTS = {"name": "module", ...}`."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_EXPORTS":
            return sorted({value.value for value in node.value.values})
    return []


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        edges = set(_lazy_exports(tree))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_targets(node, modules))
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), as sorted lists."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _part(module: str) -> str | None:
    """`fdh_jax.training.step` -> `training`; `fdh_jax.main` -> `main`; the root -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_cycle_finder_finds_a_cycle_and_accepts_a_chain():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_sees_function_level_and_lazy_imports():
    graph = _import_graph()
    assert "fdh_jax.serving.workdir_encoder" in graph["fdh_jax.serving.load"]  # inside a function
    assert "fdh_jax.search.scan" in graph["fdh_jax.search"]  # `_EXPORTS` of the package


def test_no_import_cycle():
    assert _cycles(_import_graph()) == []


def test_every_part_imports_only_earlier_layers():
    layer_of = {part: i for i, layer in enumerate(LAYERS) for part in layer}
    graph = _import_graph()
    parts = {_part(module) for module in graph} - {None}
    assert parts == set(layer_of), "a part of fdh_jax is missing from LAYERS (and the module map)"
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        if _part(module) is not None
        for target in targets
        if _part(target) is None
        or layer_of[_part(target)] > layer_of[_part(module)]
        or (layer_of[_part(target)] == layer_of[_part(module)] and _part(target) != _part(module))
    ]
    assert wrong == []


def _function_imports(tree: ast.Module):
    """(function, import node) for every import inside a function body."""
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield function, node


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: _module_name(p))
def test_imports_sit_at_the_top_unless_a_docstring_says_why(path):
    tree = ast.parse(path.read_text())
    body = tree.body[1:] if ast.get_docstring(tree) else tree.body
    seen_code = False
    late = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if seen_code:
                late.append(node.lineno)
        else:
            seen_code = True
    assert late == [], f"module-level imports below the top, lines {late}"
    unexplained = [
        f"{function.name} (line {node.lineno})"
        for function, node in _function_imports(tree)
        if not re.search(r"\bimport", ast.get_docstring(function) or "", re.IGNORECASE)
    ]
    assert unexplained == [], "imports inside functions whose docstring does not say why"


def test_no_function_longer_than_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines})")
    assert long == []
