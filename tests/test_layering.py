"""The package's import structure, read from the source (AST, no imports run): no cycle between modules, and
the layers import only downwards — checkpoints ← merge ← analysis ← tui; demo may import checkpoints, merge
and analysis; nothing outside tui imports tui.

Every import counts: at module level, under ``if TYPE_CHECKING:`` and inside functions (a lazy import still
ties two modules together). The check runs on the repository and, to show that it can fail, on copies with a
cycle or a wrong direction planted in them.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "mergescope"
#: what each top-level folder (installed as mergescope.<folder>) may import from the package
MAY_IMPORT = {
    "checkpoints": {"checkpoints"},
    "merge": {"checkpoints", "merge"},
    "analysis": {"checkpoints", "merge", "analysis"},
    "demo": {"checkpoints", "merge", "analysis", "demo"},
    "tui": {"checkpoints", "merge", "analysis", "demo", "tui"},
}

Graph = dict[str, set[str]]


def module_files(root: Path) -> dict[str, Path]:
    """``mergescope.<folder>.<...>`` → its file, for every module under the layers' folders of ``root``."""
    found = {}
    for layer in MAY_IMPORT:
        for path in sorted((root / layer).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([PACKAGE, *parts])] = path
    return found


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``source`` (the text of ``module``) imports, relative imports resolved; for
    ``from a import b`` both ``a`` and ``a.b`` (b may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(anchor + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path) -> Graph:
    """Module → the package's modules it imports (itself left out)."""
    files = module_files(root)
    graph: Graph = {}
    for module, path in files.items():
        names = imported_names(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
        graph[module] = {name for name in names if name in files and name != module}
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def layer_of(module: str) -> str:
    return module.split(".")[1]


def layering_problems(graph: Graph) -> list[str]:
    """One line per import cycle and per import against the layers' direction."""
    problems = [f"import cycle between {', '.join(component)}" for component in cycles(graph)]
    for module in sorted(graph):
        allowed = MAY_IMPORT[layer_of(module)]
        for target in sorted(graph[module]):
            if layer_of(target) not in allowed:
                problems.append(f"{module} imports {target}: {layer_of(module)} may import only "
                                f"{', '.join(sorted(allowed))}")
    return problems


def copy_of_the_package(destination: Path) -> Path:
    for layer in MAY_IMPORT:
        shutil.copytree(REPO / layer, destination / layer, ignore=shutil.ignore_patterns("__pycache__"))
    return destination


def plant(path: Path, statement: str) -> None:
    """Append a function whose body imports ``statement`` (a lazy import, the kind a cycle hides in)."""
    with path.open("a", encoding="utf-8") as file:
        file.write(f"\n\ndef _planted():\n    {statement}\n")


def test_the_package_has_no_import_cycle_and_imports_only_downwards():
    graph = import_graph(REPO)
    assert len(graph) > 80 and "mergescope.merge.plan" in graph["mergescope.merge.executor"]  # the check reads the tree
    assert layering_problems(graph) == []


def test_a_cycle_planted_inside_a_function_is_found(tmp_path):
    root = copy_of_the_package(tmp_path)
    assert layering_problems(import_graph(root)) == []
    # the executor imports the plan; a lazy import back closes plan → executor → plan
    plant(root / "merge" / "plan.py", "from .executor import run_merge")
    problems = layering_problems(import_graph(root))
    assert len(problems) == 1 and problems[0].startswith("import cycle between ")
    assert "mergescope.merge.executor" in problems[0] and "mergescope.merge.plan" in problems[0]


def test_a_cycle_planted_under_type_checking_is_found(tmp_path):
    root = copy_of_the_package(tmp_path)
    errors = root / "checkpoints" / "errors.py"
    # the writer imports the errors; a type-only import back still ties them together
    errors.write_text(errors.read_text() + "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                      "    from .writer import CheckpointWriter\n")
    problems = layering_problems(import_graph(root))
    assert len(problems) == 1 and problems[0].startswith("import cycle between ")
    assert "mergescope.checkpoints.errors" in problems[0] and "mergescope.checkpoints.writer" in problems[0]


@pytest.mark.parametrize("folder, file, statement, culprit", [
    ("checkpoints", "naming.py", "from mergescope.merge.plan import load_plan", "mergescope.merge.plan"),
    ("merge", "sparsify.py", "import mergescope.analysis.sums", "mergescope.analysis.sums"),
    ("analysis", "sums.py", "from mergescope.tui.display import fmt_rel", "mergescope.tui.display"),
    ("demo", "tasks.py", "from mergescope.tui.formatting import human_bytes", "mergescope.tui.formatting"),
])
def test_an_import_against_the_layers_is_found(tmp_path, folder, file, statement, culprit):
    root = copy_of_the_package(tmp_path)
    plant(root / folder / file, statement)
    module = f"mergescope.{folder}.{file.removesuffix('.py')}"
    problems = layering_problems(import_graph(root))
    direction = [p for p in problems if not p.startswith("import cycle")]
    allowed = ", ".join(sorted(MAY_IMPORT[folder]))
    assert direction == [f"{module} imports {culprit}: {folder} may import only {allowed}"]
    # an upward import usually closes a cycle too (the layer above imports this one): it names the module
    assert all(module in p for p in problems)


def test_relative_imports_resolve_to_modules():
    source = "from . import b\nfrom .c import d\nfrom ..merge import plan\nimport mergescope.checkpoints.errors as e\n"
    names = imported_names(source, "mergescope.analysis.a", is_package=False)
    assert {
        "mergescope.analysis.b",
        "mergescope.analysis.c",
        "mergescope.analysis.c.d",
        "mergescope.merge.plan",
        "mergescope.checkpoints.errors",
    } <= names
    in_package = imported_names("from .methods import adaptive\n", "mergescope.merge", is_package=True)
    assert "mergescope.merge.methods.adaptive" in in_package


def test_cycles_of_a_synthetic_graph():
    graph = {
        "mergescope.merge.a": {"mergescope.merge.b"},
        "mergescope.merge.b": {"mergescope.merge.c"},
        "mergescope.merge.c": {"mergescope.merge.a"},
        "mergescope.merge.d": {"mergescope.merge.a"},
    }
    assert cycles(graph) == [["mergescope.merge.a", "mergescope.merge.b", "mergescope.merge.c"]]
    graph["mergescope.merge.c"] = set()
    assert cycles(graph) == [] and layering_problems(graph) == []
