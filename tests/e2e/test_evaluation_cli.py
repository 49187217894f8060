"""`tributary eval`: the JSON it prints, ground truth reused on a second run, clear errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from engine.cli import app
from engine.evaluation.lds import ground_truth, lds
from engine.evaluation.methods import all_scores
from engine.evaluation.tasks import load_task

runner = CliRunner()


def test_eval_lds_prints_the_lds_and_reuses_its_cache(tmp_path):
    arguments = [
        "eval",
        "lds",
        "--task",
        "wine",
        "--methods",
        "grad_dot,random",
        "--subsets",
        "4",
        "--seeds",
        "1",
        "--cache",
        str(tmp_path / "truth"),
    ]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    result = json.loads(first.output)
    assert not result["ground_truth_reused"] and set(result["lds"]) == {"grad_dot", "random"}
    # the same numbers as the library computes on the cached ground truth
    task = load_task("wine")
    truth = ground_truth(task, 0.5, 4, 1, cache=tmp_path / "truth")
    assert truth.reused
    final, run = task.train_reference(seed=0)
    assert (
        result["lds"]["grad_dot"]["mean"] == lds(all_scores(task, final, run, ["grad_dot"])["grad_dot"], truth)["mean"]
    )
    second = runner.invoke(app, arguments)
    assert second.exit_code == 0 and json.loads(second.output)["ground_truth_reused"]


def test_eval_reports_bad_options_clearly():
    wrong = runner.invoke(app, ["eval", "lds", "--task", "wine", "--methods", "magic"])
    assert wrong.exit_code == 2 and "magic" in wrong.output
    wrong = runner.invoke(app, ["eval", "gold", "--task", "wine", "--steps", "1,x"])
    assert wrong.exit_code == 2 and "--steps" in wrong.output
    wrong = runner.invoke(app, ["eval", "lds", "--task", "mnist"])
    assert wrong.exit_code == 2 and "mnist" in wrong.output


def test_eval_gold_prints_agreement_per_step():
    result = runner.invoke(
        app,
        [
            "eval",
            "gold",
            "--task",
            "wine",
            "--methods",
            "grad_dot,source",
            "--left-out",
            "5",
            "--seeds",
            "1",
            "--steps",
            "1,3",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["agreement"]["grad_dot"]["cosine"]["steps"] == [1, 3]
    assert len(payload["agreement"]["source"]["spearman"]["mean"]) == 2
