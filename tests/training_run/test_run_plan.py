"""The run plan resolved from a config (engine.training_run.resolve), on fixture Trainer output directories: each
checkpoint directory holds only the config.json and trainer_state.json a Trainer writes, no weights, so nothing
is loaded or trained. The expected plans are worked out here from the schedule written into the fixtures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from engine.config import parse_config
from engine.errors import TributaryError
from engine.training_run.plan import RunPlan
from engine.training_run.resolve import require_schedule, resolve_run
from tests.conftest import SENTENCES, job_config, write_jsonl

MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "store_v1" / "model"
RATES = [0.08, 0.07, 0.06, 0.05, 0.04, 0.03, 0.02, 0.01]  # the rate of steps 1..8, as a decaying schedule logs it


def rate(step: int) -> float:
    return RATES[step - 1]


def mean_rate(low: int, high: int) -> float:
    """The mean of the rates logged in steps (low, high]."""
    return float(np.mean(RATES[low:high]))


def write_checkpoint(directory: Path, step: int | None, max_steps: int, logged: list[int], **config_changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = json.loads((MODEL / "config.json").read_text()) | config_changes
    (directory / "config.json").write_text(json.dumps(config))
    history = [{"step": s, "learning_rate": rate(s), "loss": 1.0} for s in logged if step is None or s <= step]
    state: dict = {"max_steps": max_steps, "log_history": history}
    if step is not None:
        state["global_step"] = step
    (directory / "trainer_state.json").write_text(json.dumps(state))
    return directory


@pytest.fixture
def trainer(tmp_path) -> Path:
    """An HF Trainer output_dir: checkpoint-2, -4 and -6 of an 8-step run that logged every step."""
    root = tmp_path / "trainer"
    for step in (2, 4, 6):
        write_checkpoint(root / f"checkpoint-{step}", step, 8, logged=list(range(1, 9)))
    return root


def resolved(tmp_path: Path, **training_run) -> RunPlan:
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    plan = resolve_run(parse_config(job_config(tmp_path, MODEL, train, training_run=training_run)))
    assert plan is not None
    return plan


def test_a_trainer_dir_in_equal_segments(tmp_path, trainer):
    plan = resolved(tmp_path, trainer_dir=str(trainer), segments=2)
    assert [(c.name, c.segment, c.step) for c in plan.checkpoints] == [("c0", 0, 2), ("c1", 0, 4), ("c2", 1, 6)]
    assert [c.path for c in plan.checkpoints] == [str((trainer / f"checkpoint-{s}").resolve()) for s in (2, 4, 6)]
    assert [c.learning_rate for c in plan.checkpoints] == [rate(2), rate(4), rate(6)]
    assert [(s.checkpoints, s.steps) for s in plan.segments] == [(("c0", "c1"), 4), (("c2",), 2)]
    assert [s.eta for s in plan.segments] == pytest.approx([mean_rate(0, 4), mean_rate(4, 6)])
    assert plan.datasets == (str(tmp_path / "train.jsonl"),) and plan.final.name == "c2"
    assert (plan.optimizer, plan.preconditioned, plan.averaged, plan.multi) == ("sgd", False, False, True)
    assert RunPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # as a store's manifest keeps it


def test_boundaries_momentum_and_the_final_model_saved_in_the_directory(tmp_path, trainer):
    write_checkpoint(trainer, None, 8, logged=list(range(1, 9)))  # the model the Trainer saved at max_steps
    plan = resolved(tmp_path, trainer_dir=str(trainer), boundaries=[3], optimizer={"momentum": 0.5})
    assert [(c.step, c.segment) for c in plan.checkpoints] == [(2, 0), (4, 1), (6, 1), (8, 1)]
    assert plan.final.path == str(trainer.resolve())
    assert [s.steps for s in plan.segments] == [3, 5]  # (0, 3] and (3, 8]
    # SGD with momentum β: every rate is the effective η / (1 - β)
    assert [c.learning_rate for c in plan.checkpoints] == pytest.approx([2 * rate(s) for s in (2, 4, 6, 8)])
    assert [s.eta for s in plan.segments] == pytest.approx([2 * mean_rate(0, 3), 2 * mean_rate(3, 8)])


def test_listed_checkpoints_and_segments_take_their_own_numbers_first(tmp_path, trainer):
    first, second, third = (str(trainer / f"checkpoint-{s}") for s in (2, 4, 6))
    plan = resolved(
        tmp_path,
        checkpoints=[{"path": first, "learning_rate": 0.5}, second, {"path": third, "step": 7}],
        segments=[{"checkpoints": [0, 1], "steps": 10, "learning_rate": 0.25}, {"checkpoints": [third]}],
        total_steps=9,
    )
    assert [c.step for c in plan.checkpoints] == [2, 4, 7]  # the listed step wins over the directory's name
    # step 7's rate: the last one logged at or before it, step 6's (checkpoint-6's log ends there)
    assert [c.learning_rate for c in plan.checkpoints] == [0.5, rate(4), rate(6)]
    # segment 1 runs from its predecessor's last checkpoint (step 4) to total_steps (9): the rates logged in (4, 9]
    assert [(s.steps, s.eta) for s in plan.segments] == [(10, 0.25), (5, pytest.approx(mean_rate(4, 6)))]


def test_a_sparse_log_gives_each_checkpoint_the_last_rate_logged_before_it(tmp_path):
    root = tmp_path / "trainer"
    for step in (3, 6):
        write_checkpoint(root / f"checkpoint-{step}", step, 6, logged=[1, 5])
    plan = resolved(tmp_path, trainer_dir=str(root))
    assert [c.learning_rate for c in plan.checkpoints] == [rate(1), rate(5)]
    assert [(s.steps, s.eta) for s in plan.segments] == [(6, pytest.approx(np.mean([rate(1), rate(5)])))]


def test_without_a_logged_or_given_rate_the_methods_that_need_one_name_it(tmp_path):
    root = tmp_path / "trainer"
    for step in (2, 4):
        write_checkpoint(root / f"checkpoint-{step}", step, 4, logged=[])
    plan = resolved(tmp_path, trainer_dir=str(root))
    assert [c.learning_rate for c in plan.checkpoints] == [None, None] and plan.segments[0].eta is None
    require_schedule(plan, "grad_dot")  # needs no schedule
    first = re.escape(str((root / "checkpoint-2").resolve()))
    with pytest.raises(TributaryError, match=f"tracin needs the learning rate at checkpoint {first}"):
        require_schedule(plan, "tracin")
    with pytest.raises(TributaryError, match="source needs the mean learning rate of segment 0"):
        require_schedule(plan, "source")
    given = resolved(tmp_path, trainer_dir=str(root), learning_rate=0.3)
    assert [c.learning_rate for c in given.checkpoints] == [0.3, 0.3] and given.segments[0].eta == 0.3
    require_schedule(given, "source")


@pytest.mark.parametrize(
    ("training_run", "message"),
    [
        ({"segments": 4}, "training_run.segments is 4 but there are 3 checkpoints"),
        ({"boundaries": [2, 3]}, r"training_run segment 1 \(steps \(2, 3\]\) has no checkpoints"),
        ({"optimizer": {"preconditioned": True}}, "preconditioned needs optimizer adam or adamw"),
        ({"checkpoints": ["x"]}, "give either checkpoints or trainer_dir, not both"),
    ],
    ids=["more-segments-than-checkpoints", "empty-segment", "preconditioned-sgd", "checkpoints-and-trainer-dir"],
)
def test_a_run_that_cannot_be_planned_is_refused(tmp_path, trainer, training_run, message):
    with pytest.raises(TributaryError, match=message):
        resolved(tmp_path, trainer_dir=str(trainer), **training_run)


def test_checkpoints_of_different_models_are_refused_naming_the_difference(tmp_path, trainer):
    write_checkpoint(trainer / "checkpoint-8", 8, 8, logged=[], n_embd=16)
    with pytest.raises(TributaryError, match=r"have different architectures \(n_embd: 8 vs 16\)"):
        resolved(tmp_path, trainer_dir=str(trainer))
