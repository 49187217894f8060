"""What the exact path does not run yet is refused before anything is written or started: full-width factors
for a training-run store (per-segment full-width factors: not built), in one line naming the key. (Placement
zero3 runs the exact stages: tests/exact/test_exact_zero3.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index
from tests.conftest import SENTENCES, job_config, write_jsonl


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
