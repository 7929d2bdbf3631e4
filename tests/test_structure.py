"""The package's shape, checked: module size, no import cycles, the planner apart from the jobs.

Read from the source with `ast` (nothing is imported), so a function-local
import counts like a top-level one: a cycle hidden inside a function still
ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "workflow" / "ftflow"
MAX_LINES = 600
# The planner runs inside Snakemake for every `snakemake` command, so it may import only
# small standard-library leaves; jobs read its output (config.json) through ftflow.specs.
PLANNER = "ftflow.config"
PLANNER_MAY_IMPORT = {
    "ftflow",
    "ftflow.errors",
    "ftflow.hashing",
    "ftflow.specs",
    "ftflow.methods",
    "ftflow.paths",
    "ftflow.schedule",
    "ftflow.encoding",
    "ftflow.formats",
    "ftflow.atomic",
    "ftflow.fields",
    "ftflow.sources",
    "ftflow.generators",
    "ftflow.generators.column_mapping",
}
HEAVY = ("torch", "transformers", "peft", "datasets", "bitsandbytes", "evaluate", "accelerate")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(ftflow modules, top-level third-party packages) that module `name` imports anywhere."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (internal if alias.name.split(".")[0] == "ftflow" else external).add(
                    alias.name if alias.name.startswith("ftflow") else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ftflow"):
                external.add(target.split(".")[0])
                continue
            for alias in node.names:  # `from . import models` names a module, not an attribute
                candidate = f"{target}.{alias.name}"
                internal.add(candidate if candidate in MODULES else target)
    internal = {m for m in internal if m in MODULES and m != name}
    return internal, external


GRAPH = {name: imports_of(name)[0] for name in MODULES}


def test_no_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_no_two_modules_import_each_other_even_around_a_loop():
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(GRAPH[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert cycles == []


def test_the_planner_imports_only_light_leaves():
    planner = [name for name in MODULES if name == PLANNER or name.startswith(PLANNER + ".")]
    assert planner, "the planner package is missing"
    for name in planner:
        internal, external = imports_of(name)
        outside = {m for m in internal if not m.startswith(PLANNER)}
        assert outside <= PLANNER_MAY_IMPORT, f"{name} imports {sorted(outside - PLANNER_MAY_IMPORT)}"
        assert not external & set(HEAVY), f"{name} imports {sorted(external & set(HEAVY))}"
    # The leaves the planner uses stay light too; only the file readers load `datasets`,
    # inside the function that reads a hub dataset (a job's work, never the planner's).
    for leaf in sorted(PLANNER_MAY_IMPORT & set(MODULES)):
        heavy = imports_of(leaf)[1] & set(HEAVY)
        allowed = {"datasets"} if leaf == "ftflow.sources" else set()
        assert heavy <= allowed, f"{leaf} imports {sorted(heavy - allowed)}"


def test_no_job_module_imports_the_planner():
    jobs = [
        name
        for name in MODULES
        if not name.startswith(PLANNER)
        and name not in ("ftflow.cli", "ftflow.workflow")
        and not name.startswith("ftflow.bench")
    ]
    offenders = {name: sorted(m for m in GRAPH[name] if m.startswith(PLANNER)) for name in jobs}
    assert {k: v for k, v in offenders.items() if v} == {}
