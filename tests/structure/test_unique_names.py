"""No two modules under engine/ define a public top-level function of the same name (issue 27: two `run_index`
and two `run_query` made a reader ask which one ran)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"


def public_functions(root: Path) -> dict[str, list[str]]:
    """Each public top-level function name, with the modules that define it."""
    defined: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
                defined[node.name].append(str(path.relative_to(root.parent)))
    return defined


def test_no_two_public_functions_in_engine_share_a_name():
    shared = {name: modules for name, modules in public_functions(ENGINE).items() if len(modules) > 1}
    assert shared == {}, f"public functions defined in more than one module: {shared}"


def test_the_scan_sees_a_name_defined_twice(tmp_path):
    package = tmp_path / "engine"
    (package / "a").mkdir(parents=True)
    (package / "a" / "one.py").write_text("def run():\n    pass\n\ndef _private():\n    pass\n")
    (package / "two.py").write_text("def run():\n    pass\n\ndef _private():\n    pass\n\nclass run_like:\n    pass\n")
    found = public_functions(package)
    assert found == {"run": ["engine/a/one.py", "engine/two.py"]}
