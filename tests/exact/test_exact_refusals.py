"""What the exact path still refuses, before anything is written or started, in one line naming the key and the fix:
full-width factors for a training run under placement zero3 (a run is not indexed with zero3), and `--exact` on a
training run of several datasets (the pass scores the final checkpoint's rows). Placement zero3 and training-run
stores otherwise run it: tests/exact/test_exact_zero3.py, tests/exact/test_exact_training_run.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from engine.config import parse_config
from engine.errors import TributaryError
from engine.exact.exact_query import check_exact_run
from engine.training_run.plan import RunPlan
from tests.conftest import SENTENCES, job_config, write_jsonl


def test_exact_factors_for_a_training_run_under_zero3_are_refused_when_the_config_is_read(tiny_models, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": str(i), "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(
        tmp_path,
        tiny_models["llama"],
        train,
        training_run={"segments": 1},
        exact={"factors": True},
        placement={"kind": "zero3", "devices_per_replica": 2},
    )
    raw["cluster"] = {"address": "local", "cpus_per_worker": 1, "local_cpus": 2}
    with pytest.raises(
        TributaryError, match="placement.kind zero3 is not supported with a training-run store"
    ) as error:
        parse_config(raw)
    assert "\n" not in str(error.value)


def test_exact_on_a_run_of_several_datasets_is_refused_naming_the_fix():
    run = cast(RunPlan, SimpleNamespace(datasets=["a.jsonl", "b.jsonl"]))
    with pytest.raises(TributaryError, match="this training run has 2 datasets; index the run with one") as error:
        check_exact_run(run)
    assert "\n" not in str(error.value)
    check_exact_run(cast(RunPlan, SimpleNamespace(datasets=["a.jsonl"])))
