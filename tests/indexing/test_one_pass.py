"""EK-FAC in one pass (issue 13): Λ read from the store equals Λ of a second model pass.

The two-pass index (`curvature.lambdas: model`, a second forward+backward per row) is the independent
computation: in float64 (model and store) the one-pass factors must equal its factors to 1e-10 relative, for the
empirical and the true Fisher (the same sampled labels: both draw them from curvature.seed and the row), with rows
skipped for non-finite values left out of both. A run killed during the Λ read resumes without redoing pass 1,
and Ray workers give bit-identical stores whatever their number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.config import parse_config
from engine.indexing.lambda_source import lambda_source, writes_fisher_rows
from engine.local_or_ray import run_index
from engine.store import GradientStore
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl
from tests.distributed_helpers import local_ray, run_cli, store_config, store_contents, write_config

TRAIN = [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)] + [
    {"id": f"p{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(PROMPTS)
]


@pytest.fixture
def train(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", TRAIN)


def _index(
    tmp_path: Path, model: Path, train: Path, name: str, lambdas: str, dim: int = 4, **curvature
) -> GradientStore:
    raw = job_config(tmp_path, model, train, curvature={"lambdas": lambdas, "seed": 5, **curvature})
    raw["projection"] = {"dim": dim, "seed": 1}
    raw["store"].update(path=str(tmp_path / name), rows_per_chunk=3)
    run_index(parse_config(raw), show_progress=False)
    return GradientStore.open(raw["store"]["path"])


def _assert_same_factors(ours: GradientStore, reference: GradientStore, tolerance: float = 1e-10) -> None:
    mine, theirs = ours.read_factors(), reference.read_factors()
    assert mine.keys() == theirs.keys()
    for name, factors in theirs.items():
        lam = mine[name].lam
        np.testing.assert_allclose(lam, factors.lam, rtol=tolerance, atol=tolerance * np.abs(factors.lam).max())
        for field in ("q_a", "q_s"):  # pass 1 is the same computation: the bases are the same array
            expected = getattr(factors, field)
            assert (getattr(mine[name], field) is None) == (expected is None)
            if expected is not None:
                assert np.array_equal(getattr(mine[name], field), expected), f"{name}.{field}"


def _no_model_pass(*_args, **_kwargs):
    raise AssertionError("the one-pass index ran the model for Λ")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("fisher", [True, "empirical"])
@pytest.mark.parametrize("strategy", ["ekfac", "diagonal"])
def test_one_pass_factors_equal_the_two_pass_factors(tmp_path, tiny_models, train, kind, fisher, strategy, monkeypatch):
    _one_pass_equals_two_pass(tmp_path, tiny_models[kind], train, fisher, strategy, 4, monkeypatch)


@pytest.mark.parametrize("fisher", [True, "empirical"])
def test_at_full_width_the_model_pass_rotates_tokens_and_agrees(tmp_path, tiny_models, train, fisher, monkeypatch):
    """At projection dim 0 on rows shorter than the modules are wide, the model pass rotates each token into the
    eigenbasis before the per-example product (cheaper than rotating each example's gradient); the store path
    rotates the stored rows. The two must agree."""
    import engine.curvature.accumulators as accumulators

    decisions: list[bool] = []
    original = accumulators.tokens_first

    def recorded(activations, deltas):
        decisions.append(original(activations, deltas))
        return decisions[-1]

    monkeypatch.setattr(accumulators, "tokens_first", recorded)
    _one_pass_equals_two_pass(tmp_path, tiny_models["llama"], train, fisher, "ekfac", 0, monkeypatch)
    assert any(decisions), "no module took the token path: the test would not exercise it"


def _one_pass_equals_two_pass(tmp_path, model, train, fisher, strategy, dim, monkeypatch) -> None:
    import engine.indexing.worker as worker

    two_pass = worker.lambda_pass
    with monkeypatch.context() as patched:
        patched.setattr(worker, "lambda_pass", _no_model_pass)
        one = _index(tmp_path, model, train, "one.zarr", "store", dim, fisher=fisher, strategy=strategy)
    assert worker.lambda_pass is two_pass
    two = _index(tmp_path, model, train, "two.zarr", "model", dim, fisher=fisher, strategy=strategy)
    assert np.array_equal(store_contents(one.path)["grads"], store_contents(two.path)["grads"])
    _assert_same_factors(one, two)
    assert not one.has_fisher_rows() and not two.has_fisher_rows(), "fisher_grads is deleted once factors are final"
    lam = next(iter(one.read_factors().values())).lam
    assert np.abs(lam).max() > 0, "a zero Λ would make the comparison vacuous"


def test_kept_fisher_rows_are_the_sampled_label_gradients(tmp_path, tiny_models, train):
    """store.keep_fisher_grads keeps them; they differ from the data-label rows and give the two-pass Λ."""
    raw = job_config(tmp_path, tiny_models["gpt2"], train, curvature={"lambdas": "store", "seed": 5})
    raw["projection"] = {"dim": 4, "seed": 1}
    raw["store"].update(rows_per_chunk=3, keep_fisher_grads=True)
    run_index(parse_config(raw), show_progress=False)
    store = GradientStore.open(raw["store"]["path"])
    assert store.has_fisher_rows()
    fisher, rows = store.read_fisher_rows(0, store.rows), store.read_rows(0, store.rows)
    assert fisher.shape == rows.shape and np.isfinite(fisher).all()
    assert not np.allclose(fisher, rows), "sampled labels differ from the data's on some tokens"
    two = _index(tmp_path, tiny_models["gpt2"], train, "two.zarr", "model")
    _assert_same_factors(store, two)


def test_skipped_rows_are_left_out_of_the_stored_lambda(tmp_path):
    """data.on_nonfinite: skip with the true Fisher: the Λ read leaves out the same rows as pass 2 does."""
    from tests.nonfinite_models import SKIPPED_IDS, all_rows, nan_word_model_in

    model = nan_word_model_in(tmp_path / "nan_words")
    stores = {}
    for lambdas in ("store", "model"):
        raw = job_config(tmp_path, model, all_rows(tmp_path), curvature={"lambdas": lambdas})
        raw["data"]["on_nonfinite"] = "skip"
        raw["store"].update(path=str(tmp_path / f"{lambdas}.zarr"), rows_per_chunk=3)
        run_index(parse_config(raw), show_progress=False)
        stores[lambdas] = GradientStore.open(raw["store"]["path"])
        assert [row.id for row in stores[lambdas].manifest.skipped] == SKIPPED_IDS
    _assert_same_factors(stores["store"], stores["model"])


def test_a_run_killed_during_the_lambda_read_resumes_without_pass_1(tmp_path, tiny_models, train):
    path = str(tmp_path / "store.zarr")
    raw = store_config(tiny_models["gpt2"], train, path, curvature={"lambdas": "store"})
    config = write_config(tmp_path / "job.yaml", raw)
    single_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    killed = run_cli(
        "index", str(config), "--no-progress", env={"TRIBUTARY_CHAOS": "driver:lambdas:1", **single_thread}
    )
    assert killed.returncode == -9, killed.stderr
    manifest = GradientStore.open(path).manifest
    assert not manifest.complete and manifest.stages.get("eigen") and len(manifest.shards["lambdas"]) == 1
    assert GradientStore.open(path).has_fisher_rows()
    resumed = run_cli("index", str(config), "--no-progress", env=single_thread)
    assert resumed.returncode == 0, resumed.stderr
    store = GradientStore.open(path)
    assert store.manifest.complete and len(store.manifest.runs) == 2
    computed = store.manifest.runs[1].computed
    assert computed.get("gradients", []) == [], "pass 1 is not redone"
    shards = len(store.shards())
    assert sorted(computed["lambdas"]) == sorted(set(range(shards)) - set(manifest.runs[0].computed["lambdas"]))
    assert not store.has_fisher_rows()
    reference_path = str(tmp_path / "reference.zarr")
    reference = write_config(
        tmp_path / "reference.yaml",
        store_config(tiny_models["gpt2"], train, reference_path, curvature={"lambdas": "store"}),
    )
    assert run_cli("index", str(reference), "--no-progress", env=single_thread).returncode == 0
    ours, theirs = store_contents(path), store_contents(reference_path)
    assert np.array_equal(ours["grads"], theirs["grads"])
    for name, fields in theirs["factors"].items():
        for field, value in fields.items():
            assert np.array_equal(ours["factors"][name][field], value), f"{name}.{field}"


def test_auto_reads_the_store_unless_its_rows_are_rounded_or_full_width_with_the_true_fisher(
    tmp_path, tiny_models, train
):
    def config(**sections):
        sections.setdefault("projection", {"dim": 4})
        return parse_config(job_config(tmp_path, tiny_models["gpt2"], train, **sections))

    assert lambda_source(config()) == "store"
    assert lambda_source(config(store={"dtype": "bfloat16"})) == "model"
    assert lambda_source(config(store={"dtype": "float16"}, curvature={"lambdas": "store"})) == "store"
    assert lambda_source(config(projection={"dim": 0})) == "model"  # fisher_grads would copy the full rows
    assert lambda_source(config(projection={"dim": 0}, curvature={"fisher": "empirical"})) == "store"  # no copy
    assert lambda_source(config(projection={"dim": 0}, curvature={"lambdas": "store"})) == "store"
    assert writes_fisher_rows(config())
    assert not writes_fisher_rows(config(projection={"dim": 0}))
    assert not writes_fisher_rows(config(curvature={"fisher": "empirical"}))
    assert not writes_fisher_rows(config(curvature={"strategy": "kfac"}))


@pytest.mark.requires_ray
def test_one_and_two_ray_workers_give_bit_identical_stores(tmp_path, tiny_models, train):
    with local_ray():
        contents = {}
        for workers in (1, 2):
            path = str(tmp_path / f"store-{workers}.zarr")
            raw = store_config(
                tiny_models["gpt2"],
                train,
                path,
                cluster={"address": "local", "workers": workers},
                curvature={"lambdas": "store"},
            )
            raw["store"]["keep_fisher_grads"] = True
            run_index(parse_config(raw), show_progress=False)
            store = GradientStore.open(path)
            assert len({entry.pid for entry in store.manifest.shards["lambdas"].values()}) == workers
            contents[workers] = dict(store_contents(path), fisher=store.read_fisher_rows(0, store.rows))
    one, two = contents[1], contents[2]
    for key in ("grads", "fisher"):
        assert np.array_equal(one[key], two[key]), key
    for name, fields in one["factors"].items():
        for field, value in fields.items():
            assert np.array_equal(two["factors"][name][field], value), f"{name}.{field} differs between 1 and 2 workers"
