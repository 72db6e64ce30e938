"""The package's shape, kept by test: no import circle, no import of another module's private name, no module over
about 500 lines (issue 20: a house a newcomer can change)."""

import ast
from pathlib import Path

import pytest

import fastdeploy_pd_fix

PACKAGE_DIR = Path(fastdeploy_pd_fix.__file__).parent
PACKAGE = PACKAGE_DIR.name
#: "About 500": a module past this is split along a seam it already has.
MAX_MODULE_LINES = 520


def module_files():
    """Module name -> file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(module: str, path: Path):
    """``(imported module, imported name or None)`` for each import of one of the package's modules by ``module``
    (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            if source.split(".")[0] == PACKAGE:
                yield from ((source, alias.name) for alias in node.names)


def import_graph():
    modules = module_files()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for source, name in imports_of(module, path):
            target = f"{source}.{name}" if name and f"{source}.{name}" in modules else source
            if target in modules and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_in_the_package():
    assert cycles(import_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_name():
    modules = module_files()
    private = [
        f"{module} imports {name} from {source}"
        for module, path in modules.items()
        for source, name in imports_of(module, path)
        if source != module
        and (
            (name and name.startswith("_") and not name.startswith("__"))
            or any(part.startswith("_") and not part.startswith("__") for part in source.split(".")[1:])
        )
    ]
    assert private == []


@pytest.mark.parametrize("module", sorted(module_files()))
def test_no_module_over_about_500_lines(module):
    lines = module_files()[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines"
