"""`exact.factor_memory_gb`: the Λ pass runs per group of modules whose full-width factors fit the budget, each
actor holding that group's bases alone (as kronfluence partitions modules). The groups are the fewest contiguous
ones under the budget; the factors and the exact scores are bit for bit those of one group, and 1 and 2 Ray
workers give the same bits."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import QueryOptions, parse_config
from engine.errors import TributaryError
from engine.exact.partition import GIB, full_width_factor_bytes, module_groups
from engine.exact.stored_factors import full_spec, read_exact_factors
from engine.local_or_ray import run_exact, run_index
from engine.store import GradientStore
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import store_config
from tests.requirements import require

BUDGET_GB = 20_000 / GIB  # two or three of the tiny GPT-2's modules a group
QUERIES = [{"id": "q0", "text": "the fox eats clams in the snow"}, {"id": "q1", "text": "a wolf eats honey"}]


def _raw(tiny_models, root, name: str, budget: float | None, workers: int | None = None) -> dict:
    train = write_jsonl(root / "train.jsonl", [{"id": f"r{i:02d}", "text": t} for i, t in enumerate(SENTENCES)])
    raw = store_config(
        tiny_models["gpt2"], train, str(root / f"{name}.zarr"), exact={"factors": True, "factor_memory_gb": budget}
    )
    if workers is not None:
        raw["cluster"] = {"address": "local", "workers": workers}
    return raw


def _factors_and_scores(raw: dict, queries: str) -> tuple[dict, np.ndarray]:
    config = parse_config(raw)
    store = run_index(config, show_progress=False)
    assert isinstance(store, GradientStore)
    return read_exact_factors(store), run_exact(config, queries, QueryOptions(k=3)).scores


def _assert_same(ours: tuple[dict, np.ndarray], theirs: tuple[dict, np.ndarray]) -> None:
    assert ours[0].keys() == theirs[0].keys()
    for name, factors in theirs[0].items():
        for field in ("lam", "q_a", "q_s"):
            np.testing.assert_array_equal(getattr(ours[0][name], field), getattr(factors, field), err_msg=name)
    np.testing.assert_array_equal(ours[1], theirs[1])


def test_groups_are_the_fewest_contiguous_under_the_budget(tiny_models, tmp_path):
    run_index(parse_config(_raw(tiny_models, tmp_path, "s", None)), show_progress=False)
    spec = full_spec(GradientStore.open(str(tmp_path / "s.zarr")))
    groups = module_groups(spec, BUDGET_GB)
    sizes = [[full_width_factor_bytes(m.k_in, m.k_out) for m in group.modules] for group in groups]
    assert len(groups) > 1 and [m for g in groups for m in g.modules] == list(spec.modules)
    assert all(sum(s) <= 20_000 for s in sizes)
    # greedy: each group's first module would not have fit in the group before it
    assert all(sum(before) + after[0] > 20_000 for before, after in zip(sizes, sizes[1:]))
    with pytest.raises(TributaryError, match="exact.factor_memory_gb .* is below the full-width factors of module"):
        module_groups(spec, 1_000 / GIB)


@pytest.mark.heavy  # two indexes and two exact queries: ~15 s of CPU
def test_grouped_factors_and_scores_equal_one_group(tiny_models, tmp_path):
    queries = str(write_jsonl(tmp_path / "queries.jsonl", QUERIES))
    whole = _factors_and_scores(_raw(tiny_models, tmp_path, "whole", None), queries)
    grouped = _factors_and_scores(_raw(tiny_models, tmp_path, "grouped", BUDGET_GB), queries)
    store = GradientStore.open(str(tmp_path / "grouped.zarr"))
    assert store.manifest.shards["exact_lambdas_1"] and "exact_lambdas" not in store.manifest.shards
    _assert_same(grouped, whole)


@pytest.mark.heavy  # two Ray indexes, actors that each load the model
def test_one_and_two_workers_give_identical_grouped_factors_and_scores(tiny_models, tmp_path):
    ray = require("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.2", logging_level="ERROR")
    try:
        queries = str(write_jsonl(tmp_path / "queries.jsonl", QUERIES))
        one = _factors_and_scores(_raw(tiny_models, tmp_path, "one", BUDGET_GB, workers=1), queries)
        two = _factors_and_scores(_raw(tiny_models, tmp_path, "two", BUDGET_GB, workers=2), queries)
    finally:
        ray.shutdown()
    _assert_same(two, one)
