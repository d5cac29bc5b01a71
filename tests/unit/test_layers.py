"""Imports run one way (STYLE.md principle 1), read from the source without importing it.

Every ``import`` and ``from ... import`` of the project's packages counts, at module level or
inside a function, under ``if TYPE_CHECKING:`` or not. Layers, bottom first:

    algo            the pure math (samplers included) and its registries: nothing of the project
    common          the config base, resources, sampler settings
    worlds          task worlds
    policy          model kinds, LoRA, pretraining
    rollout, rewards, learner    the components (none imports another)
    services        driver, controller, actors, API, CLI
    bench           benchmarks

A module may import its own package and any lower layer. No cycle among project modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LAYERS: list[set[str]] = [
    {"algo"},
    {"common"},
    {"worlds"},
    {"policy"},
    {"rollout", "rewards", "learner"},
    {"services"},
    {"bench"},
]
PACKAGES = set().union(*LAYERS)
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (type-only and lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # "from a.b import c" names a module a.b.c if it exists, else the module a.b
            target = imported if imported in modules else imported.rpartition(".")[0]
            if target in modules and target != name:
                targets.add(target)
            elif imported in modules:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_no_module_imports_a_higher_layer_or_a_sibling_component() -> None:
    bad = []
    for module, targets in _graph().items():
        pkg = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != pkg and LEVEL[other] >= LEVEL[pkg]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_the_math_imports_nothing_of_the_project_outside_algo() -> None:
    graph = _graph()
    outside = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.startswith("algo")
        for t in ts
        if not t.startswith("algo")
    )
    assert not outside, outside


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_components_do_not_import_services() -> None:
    """The issue's check: ``rg services learner rollout rewards policy worlds`` finds no import."""
    graph = _graph()
    up = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.split(".")[0]
        in {"learner", "rollout", "rewards", "policy", "worlds", "algo", "common"}
        for t in ts
        if t.startswith("services")
    )
    assert not up, up


def test_the_graph_is_read_at_all() -> None:
    graph = _graph()
    assert "learner.engine" in graph and "algo.elbo" in graph["learner.estimators"]
