"""tests/ mirrors the layers: a folder per package of engine/ holding that package's unit tests, tests/e2e/ for
whole runs (the CLI, index + query pipelines, services, clusters), tests/structure/ for checks of the code's
shape. A test file left at tests/ top level, or in a folder named after no package, is named with the rule.

Shared helpers (conftest.py, cli_helpers.py, reference.py, ...) stay at tests/ top level, so `tests.reference`
and the like import the same from every folder. A test file imports no other test file: what two test files share
is a helper module at top level (importing a test module runs its module-level code and ties the two together).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXTRA_FOLDERS = {
    "e2e": "end-to-end runs: the CLI, whole index + query pipelines, services, clusters",
    "structure": "checks of the code's shape: layers, this layout, the tests' own machinery",
}


def engine_packages(engine: Path) -> list[str]:
    """The packages of engine/: its folders that are Python packages (engine/cli.py and the like are modules)."""
    return sorted(path.parent.name for path in engine.glob("*/__init__.py"))


def engine_imports(path: Path) -> list[str]:
    """The engine packages a test file imports, as a hint to where it belongs."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        found.update(name.split(".")[1] for name in names if name.startswith("engine."))
    return sorted(found)


def _rule(packages: list[str]) -> str:
    return (
        f"a test belongs in tests/<package>/ for the engine package it tests ({', '.join(packages)}), or in "
        + "; ".join(f"tests/{name}/ ({why})" for name, why in EXTRA_FOLDERS.items())
    )


def layout_problems(tests: Path, engine: Path) -> list[str]:
    """Every way `tests` departs from the layout, one line each naming the file or folder and the fix."""
    packages = engine_packages(engine)
    allowed = set(packages) | set(EXTRA_FOLDERS)
    problems = []
    for path in sorted(tests.rglob("test_*.py")):
        relative = path.relative_to(tests.parent)
        parts = path.relative_to(tests).parts
        if len(parts) == 1:
            hint = engine_imports(path)
            problems.append(
                f"{relative} is at tests/ top level: git mv it into its folder; {_rule(packages)}"
                + (f" (it imports engine.{', engine.'.join(hint)})" if hint else "")
            )
        elif parts[0] == "fixtures":
            continue
        elif parts[0] not in allowed:
            problems.append(
                f"{relative} is in tests/{parts[0]}/, which is named after no engine package; {_rule(packages)}"
            )
        elif len(parts) > 2:
            problems.append(f"{relative} is nested below tests/{parts[0]}/: keep test files directly in it")
    for folder in sorted(allowed):
        directory = tests / folder
        if not list(directory.glob("test_*.py")):
            owner = f"engine/{folder}" if folder in packages else EXTRA_FOLDERS[folder]
            problems.append(f"tests/{folder}/ holds no test file: every folder has tests of its own ({owner})")
        elif not (directory / "__init__.py").is_file():
            problems.append(
                f"tests/{folder}/ has no __init__.py: add an empty one (test basenames repeat across folders)"
            )
    return problems


def test_the_tests_mirror_the_packages_of_engine():
    problems = layout_problems(ROOT / "tests", ROOT / "engine")
    assert not problems, "\n".join(problems)


def imported_test_modules(path: Path) -> list[str]:
    """The test modules (tests/**/test_*.py) that `path` imports, at any depth of its code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        found += [name for name in names if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_")]
    return found


def test_no_test_file_imports_another():
    problems = [
        f"{path.relative_to(ROOT)} imports {name}: move what both use into a helper module at tests/ top level"
        for path in sorted((ROOT / "tests").rglob("test_*.py"))
        for name in imported_test_modules(path)
    ]
    assert not problems, "\n".join(problems)


def test_the_import_reader_sees_nested_imports(tmp_path):
    path = tmp_path / "test_x.py"
    path.write_text("import tests.reference\ndef f():\n    from tests.e2e.test_serving import helper\n")
    assert imported_test_modules(path) == ["tests.e2e.test_serving"]


def test_every_package_of_engine_is_seen():
    """A check on the reader: a listing that missed packages would pass everything."""
    packages = engine_packages(ROOT / "engine")
    assert {"store", "spectral", "training_run", "query", "testing"} <= set(packages)
    assert "cli" not in packages and "runner" not in packages  # modules, not packages
    assert engine_imports(Path(__file__)) == []
    assert engine_imports(ROOT / "tests" / "query" / "test_query_plan.py")[:3] == ["config", "data", "errors"]


# ---- the checker on small trees of its own -----------------------------------------------------------


def _tree(root: Path, files: list[str]) -> tuple[Path, Path]:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from engine.store.lock import StoreLock\n" if name.endswith("test_top.py") else "")
    return root / "tests", root / "engine"


GOOD = [
    "engine/__init__.py",
    "engine/cli.py",
    "engine/store/__init__.py",
    "engine/query/__init__.py",
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/reference.py",
    "tests/fixtures/store_v1/model/config.json",
    "tests/store/__init__.py",
    "tests/store/test_lock.py",
    "tests/query/__init__.py",
    "tests/query/test_plan.py",
    "tests/e2e/__init__.py",
    "tests/e2e/test_cli.py",
    "tests/structure/__init__.py",
    "tests/structure/test_layers.py",
]


def test_the_checker_accepts_the_layout(tmp_path):
    assert layout_problems(*_tree(tmp_path, GOOD)) == []


def test_the_checker_names_a_test_left_at_top_level_with_the_rule_and_its_imports(tmp_path):
    (problem,) = layout_problems(*_tree(tmp_path, [*GOOD, "tests/test_top.py"]))
    assert problem.startswith("tests/test_top.py is at tests/ top level: git mv it into its folder; ")
    assert "tests/<package>/ for the engine package it tests (query, store)" in problem
    assert "tests/e2e/ (end-to-end runs" in problem and "tests/structure/ (" in problem
    assert problem.endswith("(it imports engine.store)")


def test_the_checker_names_missing_and_unknown_folders(tmp_path):
    files = [name for name in GOOD if not name.startswith("tests/query/")]
    files += ["tests/querys/__init__.py", "tests/querys/test_plan.py", "tests/store/deeper/test_x.py"]
    files.remove("tests/e2e/__init__.py")
    assert layout_problems(*_tree(tmp_path, files)) == [
        "tests/querys/test_plan.py is in tests/querys/, which is named after no engine package; "
        + _rule(["query", "store"]),
        "tests/store/deeper/test_x.py is nested below tests/store/: keep test files directly in it",
        "tests/e2e/ has no __init__.py: add an empty one (test basenames repeat across folders)",
        "tests/query/ holds no test file: every folder has tests of its own (engine/query)",
    ]
