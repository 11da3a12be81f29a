"""The layout of ``src/plugin_execution`` stays legible: small modules and classes, each module
saying what it is, and no import cycles between modules.

Read with :mod:`ast`, never imported, so every import counts: those under
``if TYPE_CHECKING:`` (a type cycle is still a cycle for a reader) and those inside functions
(a local import does not remove the dependency, it hides it). A cycle is broken by a small
shared interface or types module, or by moving a function to where it belongs.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import attrs

PACKAGE = "plugin_execution"
SOURCE = Path(__file__).parents[1] / "src" / PACKAGE
MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 350


@attrs.frozen
class Module:
    name: str  # dotted, e.g. plugin_execution.backends.base
    path: Path
    tree: ast.Module
    lines: int

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def where(self) -> str:
        return str(self.path.relative_to(SOURCE.parent))


@cache
def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        text = path.read_text()
        name = ".".join(parts)
        found[name] = Module(name, path, ast.parse(text, str(path)), len(text.splitlines()))
    return found


def imported(module: Module, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The modules of the package that ``node`` imports: ``from a import b`` is module
    ``a.b`` when there is one, else ``a``; names outside the package are left out."""
    known = modules()
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.name.split(".")
            if not module.is_package:
                base.pop()
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join([*base, node.module] if node.module else base)
        else:
            prefix = node.module or ""
        targets = [
            f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
            for alias in node.names
        ]
    for target in targets:
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]  # a name inside a module: that module
        if target in known and target != module.name:
            yield target


@cache
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}, every import counted."""
    graph: dict[str, dict[str, int]] = {}
    for name, module in modules().items():
        edges: dict[str, int] = {}
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in imported(module, node):
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The components of more than one module (Tarjan's algorithm, without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def cycle_through(start: str, component: set[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest import path from ``start`` back to itself within ``component``."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node]):
                if successor not in component or successor in came_from:
                    continue
                came_from[successor] = node
                if successor == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


def describe(path: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [path[0]]
    for here, there in itertools.pairwise(path):
        steps.append(f"-> {there} (line {graph[here][there]} of {modules()[here].where})")
    return " ".join(steps)


def test_no_module_is_over_the_line_limit() -> None:
    over = [f"{m.where}: {m.lines} lines" for m in modules().values() if m.lines > MAX_MODULE_LINES]
    assert not over, (
        f"modules over {MAX_MODULE_LINES} lines (split them, one concept per module): {over}"
    )


def test_no_class_is_over_the_line_limit() -> None:
    over = [
        f"{m.where}:{node.lineno} class {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for m in modules().values()
        for node in ast.walk(m.tree)
        if isinstance(node, ast.ClassDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    ]
    assert not over, f"classes over {MAX_CLASS_LINES} lines (compose them of smaller parts): {over}"


def test_every_module_says_what_it_is() -> None:
    missing = [m.where for m in modules().values() if not ast.get_docstring(m.tree)]
    assert not missing, f"modules without a docstring saying what and why: {missing}"


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = [
        describe(cycle_through(component[0], set(component), graph), graph)
        for component in strongly_connected(graph)
    ]
    assert not cycles, "import cycles (type-only and function-level imports count):\n" + (
        "\n".join(cycles)
    )


# -- the checks check what they should ---------------------------------------------------------


def test_imports_are_resolved_to_modules_of_the_package() -> None:
    graph = import_graph()
    assert "plugin_execution.backends.job" in graph["plugin_execution.backends.base"]
    assert "plugin_execution.platform" in graph["plugin_execution.backends.base"]
    # A type-only import counts (backends/job.py imports PlatformSession under TYPE_CHECKING).
    assert "plugin_execution.platform.session" in graph["plugin_execution.backends.job"]
    # So does an import inside a function (cli/_bench.py imports the bench module lazily).
    assert "plugin_execution.bench" in graph["plugin_execution.cli._bench"]
    # `from . import x` of a package's own module is that module, not the package.
    assert "plugin_execution.platform._args" in graph["plugin_execution.platform.cache"]
    assert "plugin_execution.platform" not in graph["plugin_execution.platform.cache"]


def test_a_cycle_is_found_and_named_with_its_path() -> None:
    graph = {
        "a": {"b": 1},
        "b": {"c": 2},
        "c": {"a": 3, "d": 4},
        "d": {},
        "e": {"e": 5},  # a module importing itself is no cycle between modules
    }
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert cycle_through("a", {"a", "b", "c"}, graph) == ["a", "b", "c", "a"]
    assert cycle_through("c", {"a", "b", "c"}, graph) == ["c", "a", "b", "c"]
