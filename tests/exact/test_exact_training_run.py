"""`--exact` on a training-run store: the run's single-term methods (if, grad_dot, grad_cos) score at its final
checkpoint, so their exact form is the streamed pass there, with full-width factors fitted on the final
checkpoint's rows (`exact: {factors: true}` with a training_run section). The reference is the dim-0 store of
the same run: its rows are the final checkpoint's full per-example gradients and its factors full-width EK-FAC
fitted there. tracin is a grad_dot pass at every checkpoint, summed with the learning rates; source (full-width
factors per segment, not built) is refused by name."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine.config import QueryOptions, parse_config
from engine.errors import TributaryError
from engine.exact.stored_factors import has_exact_factors
from engine.indexing.exact_sums import has_pass_one_sums
from engine.local_or_ray import run_exact, run_index, run_query
from engine.serving.schema import AttributeRequest, AttributeResponse
from engine.store.run_store import RunStore
from engine.store.summary import store_summary
from tests.conftest import SENTENCES, job_config, write_jsonl
from tests.service_helpers import listed_examples, listed_scores, replica
from tests.trained_checkpoints import QUERIES, train_checkpoints

pytestmark = pytest.mark.heavy  # two run stores of three checkpoints each


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """The same run (3 checkpoints, 2 segments) indexed at dim 0 and at dim 4 with full-width factors."""
    root = tmp_path_factory.mktemp("exact_run")
    train_checkpoints(tiny_models["gpt2"], root / "trainer")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    queries = write_jsonl(root / "queries.jsonl", QUERIES)
    common = {
        "training_run": {"trainer_dir": str(root / "trainer"), "segments": 2},
        "curvature": {"strategy": "ekfac", "fisher": "empirical"},
    }
    reference = job_config(root, tiny_models["gpt2"], train, store={"path": str(root / "dim0.zarr")}, **common)
    projected = job_config(
        root,
        tiny_models["gpt2"],
        train,
        store={"path": str(root / "dim4.zarr")},
        projection={"dim": 4},
        exact={"factors": True},
        **common,
    )
    run_index(parse_config(reference), show_progress=False)
    run_index(parse_config(projected), show_progress=False)
    return reference, projected, queries


def _with_method(raw: dict, name: str) -> dict:
    return dict(raw, method={"name": name})


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def test_exact_on_a_run_store_equals_the_dim0_run_store(runs):
    reference, projected, queries = runs
    run = RunStore.open(projected["store"]["path"])
    final = run.plan.final.name
    assert has_exact_factors(run.final_store())
    listed = store_summary(run)[0]["checkpoints"]  # `tributary info` names them where they are
    assert [name for name, entry in listed.items() if "exact_factors" in entry] == [final]
    for checkpoint in run.plan.checkpoints:  # only the final checkpoint summed full-width covariances in pass 1
        assert has_pass_one_sums(run.checkpoint(checkpoint.name)) == (checkpoint.name == final)
    for method in ("if", "grad_dot", "grad_cos"):
        ours = run_exact(parse_config(_with_method(projected, method)), str(queries), QueryOptions(k=3)).scores
        theirs = run_query(parse_config(_with_method(reference, method)), str(queries), k=3).total
        assert theirs is not None and np.abs(theirs).max() > 0
        assert ours.shape == theirs.shape == (len(QUERIES), len(SENTENCES))
        assert _relative(ours, theirs) <= 1e-10, method


def test_rescore_on_a_run_store_equals_exact(runs):
    _, projected, queries = runs
    config = parse_config(projected)
    exact = run_exact(config, str(queries), QueryOptions(k=2))
    every = run_exact(config, str(queries), QueryOptions(k=2), rescore=len(SENTENCES))
    np.testing.assert_array_equal(every.scores, exact.scores)


def test_tracin_sums_a_grad_dot_pass_per_checkpoint_as_the_dim0_run_store(runs):
    """Σ_c η_c ⟨g_q^c, g_i^c⟩ over the run's 3 checkpoints, each pass at that checkpoint's weights."""
    reference, projected, queries = runs
    ours = run_exact(parse_config(_with_method(projected, "tracin")), str(queries), QueryOptions(k=3)).scores
    theirs = run_query(parse_config(_with_method(reference, "tracin")), str(queries), k=3).total
    final_only = run_exact(parse_config(_with_method(projected, "grad_dot")), str(queries), QueryOptions(k=3)).scores
    assert theirs is not None
    assert _relative(ours, theirs) <= 1e-10
    assert _relative(final_only, theirs) > 1e-3  # the earlier checkpoints' passes count


def test_source_is_refused_by_name(runs):
    _, projected, queries = runs
    raw = dict(projected, method={"name": "source", "eta": 0.1, "steps": 3})
    with pytest.raises(TributaryError, match="method source has no exact streamed form.*give --method if") as error:
        run_exact(parse_config(raw), str(queries), QueryOptions(k=2))
    assert "\n" not in str(error.value)


def test_serve_rescore_on_a_run_store_answers_what_query_rescore_writes(runs):
    """The replica rescores at the final checkpoint (its own loaded model and the final sub-store's candidates):
    each listed example, its source and its score equal `tributary query --rescore K` on the same run store,
    which the tests above tie to the dim-0 run store."""
    _, projected, queries = runs
    asked = [
        {"id": "q0", "prompt": "the fox eats", "completion": " seeds in the snow"},
        {"id": "q1", "prompt": "the owl", "completion": " eats mice at night"},
    ]
    service = replica(parse_config(dict(projected, serve={"rescore": 2})))
    body = asyncio.run(service.attribute(AttributeRequest.model_validate({"queries": asked, "top_k": 3})))
    served = AttributeResponse.model_validate(body).model_dump(exclude_none=True)["results"]
    path = write_jsonl(queries.parent / "prompts.jsonl", asked)
    cli = run_exact(parse_config(projected), str(path), QueryOptions(k=3), rescore=2).records

    assert listed_examples(served) == listed_examples(cli)
    assert {"exact"} <= {entry[-1] for entry in listed_examples(served)}
    np.testing.assert_allclose(listed_scores(served), listed_scores(cli), rtol=1e-9, atol=1e-12)
