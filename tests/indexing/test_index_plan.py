"""`tributary index` is resolved once into an IndexPlan, then executed: the run plan, each dataset's rows and the
weight files are worked out once per index (counted here on the tiny GPT-2, a single checkpoint and a training
run), and the store is the one an index from a fresh plan writes."""

from __future__ import annotations

from collections import Counter

import pytest

import engine.indexing.inputs
import engine.model.loading
import engine.training_run.resolve
from engine.config import parse_config
from engine.indexing.plan import resolve_index_plan
from engine.indexing.plan_and_build import plan_and_build
from engine.store import GradientStore
from engine.store.run_store import RunStore
from tests.call_counting import count_calls
from tests.conftest import SENTENCES, job_config, write_jsonl
from tests.trained_checkpoints import train_checkpoints


def _counted(monkeypatch) -> Counter:
    counts: Counter = Counter()
    count_calls(monkeypatch, counts, "run plan", engine.training_run.resolve.resolve_run)
    count_calls(monkeypatch, counts, "rows", engine.indexing.inputs.validated_row_count)
    count_calls(monkeypatch, counts, "weight files", engine.model.loading.check_weight_files)
    return counts


def test_a_single_checkpoint_index_resolves_its_plan_once(tiny_models, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = parse_config(job_config(tmp_path, tiny_models["gpt2"], train))
    plan = resolve_index_plan(config)
    counts = _counted(monkeypatch)
    store = plan_and_build(config, show_progress=False)
    assert counts == {"run plan": 1, "rows": 1, "weight files": 1}
    assert (
        isinstance(store, GradientStore) and plan.run is None and store.rows == plan.rows[str(train)] == len(SENTENCES)
    )
    assert plan.spec is not None and store.manifest.projection.fingerprint() == plan.spec.fingerprint()


def test_a_training_run_index_resolves_its_plan_once(tiny_models, tmp_path, monkeypatch):
    train_checkpoints(tiny_models["gpt2"], tmp_path / "trainer", saves=(2, 4))
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = parse_config(
        job_config(tmp_path, tiny_models["gpt2"], train, training_run={"trainer_dir": str(tmp_path / "trainer")})
    )
    plan = resolve_index_plan(config)
    counts = _counted(monkeypatch)
    store = plan_and_build(config, show_progress=False)
    assert counts == {"run plan": 1, "rows": 1}  # one dataset; a run's weight files are checked by its plan
    assert isinstance(store, RunStore) and plan.run is not None and plan.run == store.plan


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"data": {"on_nonfinite": "skip"}}, "data.on_nonfinite: skip is for single-checkpoint stores"),
        (
            {"training_run": {"optimizer": {"preconditioned": True}}},
            "preconditioned needs optimizer adam or adamw",
        ),
    ],
    ids=["skip-rows", "preconditioned-sgd"],
)
def test_the_plan_refuses_a_training_run_before_reading_rows(tiny_models, tmp_path, monkeypatch, sections, message):
    from engine.errors import TributaryError

    train_checkpoints(tiny_models["gpt2"], tmp_path / "trainer", saves=(2,))
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    run = {"trainer_dir": str(tmp_path / "trainer"), **sections.pop("training_run", {})}
    raw = job_config(tmp_path, tiny_models["gpt2"], train, training_run=run, **sections)
    counts: Counter = Counter()
    count_calls(monkeypatch, counts, "rows", engine.indexing.inputs.validated_row_count)
    with pytest.raises(TributaryError, match=message):
        plan_and_build(parse_config(raw), show_progress=False)
    assert counts["rows"] == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl", "trainer"]
