"""One store interface: a single-checkpoint store behaves as a training run of one checkpoint, so outside
engine/store/ no code asks which kind of store it holds."""

from __future__ import annotations

import ast
from pathlib import Path

from engine.config import parse_config
from engine.indexing.plan_and_build import plan_and_build
from engine.query.attributor import final_model
from engine.store.opening import open_store
from tests.conftest import SENTENCES, job_config, write_jsonl

ENGINE = Path(__file__).resolve().parents[2] / "engine"
STORE_KINDS = {"GradientStore", "RunStore", "ManifestStore"}


def _names(node: ast.expr) -> set[str]:
    """The class names an isinstance's second argument mentions (a name, an attribute, a tuple or a union)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def store_kind_questions(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).parts[0] == "store":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass")
                and len(node.args) == 2
                and _names(node.args[1]) & STORE_KINDS
            ):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def test_no_code_outside_store_asks_which_kind_of_store_it_holds():
    assert store_kind_questions(ENGINE) == []


def test_the_scan_finds_the_questions_it_forbids(tmp_path):
    """The scan itself: each spelling of the question is found, a store/ module is not scanned."""
    (tmp_path / "query").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "query" / "a.py").write_text(
        "from engine.store import GradientStore\nimport engine.store.run_store as rs\n"
        "isinstance(x, GradientStore)\nisinstance(x, (int, rs.RunStore))\nisinstance(x, GradientStore | None)\n"
        "isinstance(x, int)\n"
    )
    (tmp_path / "store" / "b.py").write_text("isinstance(x, GradientStore)\n")
    assert store_kind_questions(tmp_path) == [f"{tmp_path.name}/query/a.py:{line}" for line in (3, 4, 5)]


def test_a_single_checkpoint_store_is_a_run_of_one_checkpoint(tiny_models, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = parse_config(job_config(tmp_path, tiny_models["gpt2"], train))
    plan_and_build(config, show_progress=False)
    store = open_store(config.store.path)
    plan = store.run_plan(config)
    assert store.kind == "checkpoint" and len(plan.checkpoints) == 1 and len(plan.segments) == 1
    assert plan.datasets == (str(train),) and plan.final.path == config.model.path
    assert store.final_store() is store and store.checkpoint_store(plan.final.name) is store
    assert final_model(config, store) == (config, store)
    store.check_schedule("tracin")  # a single checkpoint's schedule is the method section's, checked when parsed
