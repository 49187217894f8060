"""With a random projection, `exact: {factors: true}` sums the full-width covariances inside pass 1 (the capture
runs at full width and each batch is projected in the pass): the rows are bit for bit those of an index without
exact factors, no covariance pass of its own runs, and the factors are bit for bit those of that separate pass
(an index without exact factors, then `index` again with them, as the README's upgrade path runs it)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import parse_config
from engine.exact.stored_factors import read_exact_factors
from engine.indexing.exact_sums import PASS_ONE_EXACT
from engine.local_or_ray import run_index
from engine.store import GradientStore
from tests.conftest import job_config


def _config(tmp_path, model, train, name: str, fisher, exact: bool, shards_of: int = 4):
    raw = job_config(
        tmp_path,
        model,
        train,
        projection={"dim": 4, "seed": 2},
        curvature={"strategy": "ekfac", "fisher": fisher, "seed": 1},
        store={"path": str(tmp_path / f"{name}.zarr"), "dtype": "float32", "rows_per_chunk": shards_of},
        **({"exact": {"factors": True}} if exact else {}),
    )
    raw["model"]["dtype"] = "float32"
    return parse_config(raw)


@pytest.mark.parametrize("fisher", ["empirical", pytest.param(True, marks=pytest.mark.heavy)])
def test_pass_one_sums_the_full_width_covariances(fisher, tiny_models, text_train, tmp_path):
    model = tiny_models["gpt2"]  # Conv1D with biases: the projected bias column goes through the same addmm
    fused = _config(tmp_path, model, text_train, "fused", fisher, exact=True)
    plain = _config(tmp_path, model, text_train, "plain", fisher, exact=False)
    store = run_index(fused, show_progress=False)
    run_index(plain, show_progress=False)
    separate = run_index(_config(tmp_path, model, text_train, "plain", fisher, exact=True), show_progress=False)
    assert isinstance(store, GradientStore) and isinstance(separate, GradientStore)
    assert store.has_group(f"partials/{PASS_ONE_EXACT}") and "exact_covariance" not in store.manifest.shards
    assert separate.manifest.shards["exact_covariance"]  # the upgrade path ran its own covariance pass
    np.testing.assert_array_equal(store.read_rows(0, store.rows), separate.read_rows(0, separate.rows))
    ours, theirs = read_exact_factors(store), read_exact_factors(separate)
    for name, factors in theirs.items():
        for field in ("lam", "q_a", "q_s"):
            np.testing.assert_array_equal(getattr(ours[name], field), getattr(factors, field), err_msg=name)
