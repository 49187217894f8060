"""What the exact path does not run yet is refused before anything is written or started: full-width factors
with placement zero3 (the ranks would each need every module's full-width captures gathered: not built) and
for a training-run store (per-segment full-width factors: not built), each with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index
from tests.conftest import SENTENCES, job_config, write_jsonl
from tests.distributed_helpers import store_config
from tests.requirements import require


def test_exact_factors_with_zero3_are_refused_before_the_store_or_a_cluster(tiny_models, tmp_path):
    ray = require("ray")
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": str(i), "text": s} for i, s in enumerate(SENTENCES)])
    store = tmp_path / "s.zarr"
    raw = store_config(
        tiny_models["llama"],
        train,
        str(store),
        cluster={"address": "local", "cpus_per_worker": 1, "local_cpus": 2},
        placement={"kind": "zero3", "devices_per_replica": 2},
        exact={"factors": True},
    )
    with pytest.raises(TributaryError, match="exact.factors does not run with placement.kind zero3") as error:
        run_index(parse_config(raw), show_progress=False)
    assert "\n" not in str(error.value)
    assert not Path(store).exists()
    assert not ray.is_initialized()


def test_exact_factors_for_a_training_run_are_refused_before_the_store(tiny_models, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": str(i), "text": s} for i, s in enumerate(SENTENCES)])
    store = tmp_path / "run.zarr"
    raw = job_config(
        tmp_path,
        tiny_models["llama"],
        train,
        training_run={"segments": 1},
        exact={"factors": True},
        store={"path": str(store)},
    )
    with pytest.raises(TributaryError, match="exact.factors is for a single-checkpoint store") as error:
        run_index(parse_config(raw), show_progress=False)
    assert "\n" not in str(error.value)
    assert not Path(store).exists()
