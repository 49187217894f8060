"""`--exact` and `exact: {factors: true}` under placement zero3: two gloo ranks in Ray actors hold a tiny Llama
partitioned and run the exact stages in lockstep (engine.exact.zero_worker). The full-width factors, the queries'
full-width gradients and the streamed scores equal those of the single placement: ZeRO-3 partitions the weights,
but each module's activations and output gradients are whole in the forward and backward."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import QueryOptions, parse_config
from engine.exact.stored_factors import read_exact_factors
from engine.local_or_ray import run_exact, run_index
from engine.store import GradientStore
from tests.conftest import write_jsonl
from tests.distributed_helpers import store_config
from tests.requirements import require
from tests.zero3_models import TRAIN

ray = require("ray")
require("deepspeed")

pytestmark = pytest.mark.heavy  # a zero3 group loads DeepSpeed (a JIT-built op on first use) and two ranks

QUERIES = [{"id": "q0", "text": "the fox eats clams in the snow"}, {"id": "q1", "text": "a crow eats honey"}]
CLUSTER = {"address": "local", "cpus_per_worker": 1, "local_cpus": 2}
ZERO3 = {"kind": "zero3", "devices_per_replica": 2}


@pytest.fixture
def ray_cleanup():
    yield
    ray.shutdown()


def _raw(model, train, path: str, zero3: bool, adapter) -> dict:
    extra = {"cluster": CLUSTER, "placement": ZERO3} if zero3 else {}
    raw = store_config(model, train, path, exact={"factors": True}, **extra)
    if adapter is not None:  # zero3 takes adapter_mode adapter: the adapter's modules on the partitioned base
        raw["model"] = dict(raw["model"], adapter=str(adapter))
    return raw


@pytest.mark.parametrize("adapted", [False, True], ids=["no_adapter", "lora"])
def test_zero3_exact_factors_and_scores_equal_single(adapted, llama32, tmp_path, request, ray_cleanup):  # noqa: F811
    adapter = request.getfixturevalue("lora32") if adapted else None
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"r{i:02d}", "text": t} for i, t in enumerate(TRAIN)])
    queries = str(write_jsonl(tmp_path / "q.jsonl", QUERIES))
    options = QueryOptions(k=3)
    single = parse_config(_raw(llama32, train, str(tmp_path / "single.zarr"), False, adapter))
    run_index(single, show_progress=False)
    expected = run_exact(single, queries, options).scores
    zero3 = parse_config(_raw(llama32, train, str(tmp_path / "zero3.zarr"), True, adapter))
    run_index(zero3, show_progress=False)
    ours, theirs = GradientStore.open(zero3.store.path), GradientStore.open(single.store.path)
    assert ours.manifest.stages.get("exact_factors")
    reference = read_exact_factors(theirs)
    for name, factors in read_exact_factors(ours).items():
        lam = reference[name].lam
        np.testing.assert_allclose(factors.lam, lam, rtol=0, atol=1e-6 * np.abs(lam).max())
    result = run_exact(zero3, queries, options)
    assert result.scores.shape == expected.shape == (len(QUERIES), len(TRAIN))
    assert result.exact.all()
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    # the same ranking, up to the order of rows whose scores tie within float32 (TRAIN holds duplicate rows)
    top, reference_top = result.result.top_indices, run_exact(single, queries, options).result.top_indices
    np.testing.assert_allclose(
        np.take_along_axis(expected, top, 1),
        np.take_along_axis(expected, reference_top, 1),
        rtol=1e-6,
        atol=1e-6 * np.abs(expected).max(),
    )
