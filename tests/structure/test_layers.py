"""engine/ imports one way only: no cycle between modules or packages, and no import that goes up the layers.

The import graph is read from the source with `ast` (every import: module-level, function-local, relative,
and those under `if TYPE_CHECKING:`), so it sees what the code asks for, not what one run happened to load.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "engine"

# Bottom to top. A module may import its own package and packages in lower layers; packages that share a layer
# may not import each other. A package is a folder of engine/ or a top-level module (engine/cli.py is "cli");
# "engine" is engine/__init__.py (the version).
LAYERS: list[tuple[str, ...]] = [
    ("engine",),
    ("errors", "progress"),  # utilities
    ("config",),  # the typed job configuration
    ("testing",),  # tiny-model builder and test-only fault injection
    ("data",),  # rows, chat, tokenisation, batches
    ("model",),  # loading, fingerprints
    ("projection",),  # the random projection of each tracked module
    ("capture",),  # per-example projected gradients through hooks, losses, measurements
    ("training_run",),  # the plan of checkpoints and segments, optimizer state
    ("curvature",),  # mergeable sums, eigendecomposition, Λ, factors
    ("gradients",),  # model context, gradient and Λ passes over tokenised rows
    ("store",),  # Zarr gradient stores and their manifests
    ("ann",),  # the FAISS approximate top-k index beside a store
    ("spectral",),  # each method's query side and the scoring of a block
    ("attribution",),  # the in-memory path for plain torch models
    ("report",),  # the HTML report of a query run
    ("indexing", "query"),  # the index driver and workers; queries against a store
    ("exact",),  # full-width factors and the streamed exact scoring pass (--exact, --rescore)
    ("integrations",),  # capture while training: Trainer callback, step API, the store it writes
    ("distributed",),  # generic Ray plumbing: cluster, actor pool, one call on fresh actors
    ("local_or_ray",),  # where work runs: in this process or on Ray
    ("demo_assets",),  # the demo's model, data and LoRA
    ("serving", "evaluation", "demo"),
    ("cli",),
]

Graph = Mapping[str, set[str]]


# ---- the graph ---------------------------------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, current: str, is_package: bool, modules: set[str]) -> list[str]:
    """The modules an `from X import a, b` names: X itself, and X.a where that is a module."""
    if node.level:
        anchor = current.split(".") if is_package else current.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    if base in modules and len(targets) < len(node.names):
        targets.append(base)
    return targets


def import_graph(root: Path) -> dict[str, set[str]]:
    """module → the modules of the same top-level package (root's name) that it imports."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    # `import a.b.c` binds a and imports a.b.c: the deepest module of ours it names.
                    found = next(
                        (".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), None
                    )
                    if found:
                        edges.add(found)
            elif isinstance(node, ast.ImportFrom):
                edges.update(_resolve(node, name, path.name == "__init__.py", modules))
        edges.discard(name)
        graph[name] = edges
    return graph


def package_of(module: str) -> str:
    """engine.indexing.single_store → indexing; engine.cli → cli; engine → engine."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


# ---- the checks --------------------------------------------------------------------------------------


def strongly_connected(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def cycle_through(graph: Graph, members: list[str]) -> list[str]:
    """A shortest cycle [a, ..., a] from the first member, inside its component (breadth-first)."""
    inside, start = set(members), members[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, set()) & inside):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected component: every separate tangle is named."""
    return [cycle_through(graph, members) for members in strongly_connected(graph)]


def package_graph(graph: Graph) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = packages.setdefault(package_of(module), set())
        edges.update(package_of(t) for t in targets if package_of(t) != package_of(module))
    return packages


def cycle_problems(graph: Graph) -> list[str]:
    problems = ["module import cycle: " + " → ".join(cycle) for cycle in cycles(graph)]
    for cycle in cycles(package_graph(graph)):
        pairs = [
            f"{m} → {t}"
            for a, b in zip(cycle, cycle[1:])
            for m in sorted(graph)
            if package_of(m) == a
            for t in sorted(graph[m])
            if package_of(t) == b
        ]
        problems.append("package import cycle: " + " → ".join(cycle) + " (through " + "; ".join(pairs) + ")")
    return problems


def layer_problems(graph: Graph, layers: list[tuple[str, ...]]) -> list[str]:
    """Every import of a package in the same or a higher layer, named by its module pair."""
    level = {package: number for number, layer in enumerate(layers) for package in layer}
    problems = []
    for package in sorted({package_of(m) for m in graph} - set(level)):
        problems.append(f"package {package} is in no layer: add it to LAYERS in tests/structure/test_layers.py")
    for module in sorted(graph):
        source = package_of(module)
        for target in sorted(graph[module]):
            destination = package_of(target)
            if destination == source or source not in level or destination not in level:
                continue
            if level[destination] > level[source]:
                problems.append(f"upward import: {module} imports {target} ({source} is below {destination})")
            elif level[destination] == level[source]:
                problems.append(
                    f"same-layer import: {module} imports {target} ({source} and {destination} share a layer)"
                )
    return problems


# ---- engine/ -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_graph() -> dict[str, set[str]]:
    return import_graph(ENGINE)


def test_engine_has_no_import_cycle(engine_graph):
    problems = cycle_problems(engine_graph)
    assert not problems, "\n".join(problems)


def test_engine_imports_only_downwards(engine_graph):
    problems = layer_problems(engine_graph, LAYERS)
    assert not problems, "\n".join(problems)


def test_the_graph_sees_imports_of_every_kind(engine_graph):
    """A check on the reader itself against engine/: a graph that missed imports would pass everything."""
    assert len(engine_graph) == len(list(ENGINE.rglob("*.py")))
    assert "engine.errors" in engine_graph["engine.config.loading"]
    assert "engine.data.rows" in engine_graph["engine.indexing.single_store"]  # a module-level `from engine.x import`
    assert "engine.projection.projector" in engine_graph["engine.projection"]  # `from engine.projection.projector`
    assert "engine.local_or_ray" in engine_graph["engine.cli"]  # function-local


# ---- the checker on small graphs of its own ------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "engine"


def test_the_reader_follows_local_relative_and_plain_imports(tmp_path):
    root = _write(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/low/__init__.py": "",
            "engine/low/a.py": "from . import b\nfrom .b import thing\n",
            "engine/low/b.py": "thing = 1\n",
            "engine/high/__init__.py": "",
            "engine/high/c.py": "def late():\n    import engine.low.a\n    from ..low import b\n",
            "engine/high/d.py": "from engine.low.a import b\nfrom engine import low\nimport os\n",
        },
    )
    graph = import_graph(root)
    assert graph["engine.low.a"] == {"engine.low.b"}
    assert graph["engine.high.c"] == {"engine.low.a", "engine.low.b"}
    assert graph["engine.high.d"] == {"engine.low.a", "engine.low"}
    assert graph["engine.low.b"] == set()


def test_the_checker_names_a_module_cycle(tmp_path):
    root = _write(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/data/__init__.py": "",
            "engine/data/rows.py": "from engine.data.chat import parse\n",
            "engine/data/chat.py": "def parse():\n    from engine.data.rows import Row\n",
        },
    )
    problems = cycle_problems(import_graph(root))
    assert problems == ["module import cycle: engine.data.chat → engine.data.rows → engine.data.chat"]


def test_the_checker_names_a_package_cycle_and_an_upward_import():
    graph = {
        "engine.query.plan_and_score": {"engine.indexing.manifest"},
        "engine.indexing.manifest": set(),
        "engine.indexing.pool": {"engine.query.scoring"},
        "engine.query.scoring": set(),
    }
    (problem,) = cycle_problems(graph)
    assert problem.startswith("package import cycle: indexing → query → indexing")
    assert "engine.indexing.pool → engine.query.scoring" in problem
    assert "engine.query.plan_and_score → engine.indexing.manifest" in problem
    layers = [("indexing",), ("query",)]
    assert layer_problems(graph, layers) == [
        "upward import: engine.indexing.pool imports engine.query.scoring (indexing is below query)"
    ]
    assert layer_problems(graph, [("indexing", "query")]) == [
        "same-layer import: engine.indexing.pool imports engine.query.scoring (indexing and query share a layer)",
        "same-layer import: engine.query.plan_and_score imports engine.indexing.manifest (query and indexing share a layer)",
    ]
    assert layer_problems(graph, [("indexing",)]) == [
        "package query is in no layer: add it to LAYERS in tests/structure/test_layers.py"
    ]
