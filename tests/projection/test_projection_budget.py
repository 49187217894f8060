"""`projection.budget`: B numbers per row split over the modules by the effective dimension Σ Λ/(Λ+λ) measured on
another store's full-width factors, each module's k recorded in the manifest, and scores correct for that
projection (checked against the dim-0 store's full gradients projected here with the same matrices)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index, run_query
from engine.projection.budget import allocate, effective_dimension, factor_share, shares
from engine.store import GradientStore
from tests.conftest import job_config

SHAPES = [("a", 9, 5), ("b", 33, 17), ("c", 4, 64), ("d", 65, 65)]


def test_effective_dimension_is_the_damped_count_of_eigenvalues():
    lam = np.array([[4.0, 1.0], [0.0, 3.0]])
    assert effective_dimension(lam, 1.0) == pytest.approx(4 / 5 + 1 / 2 + 0 + 3 / 4)
    mean = lam.mean()
    assert effective_dimension(lam, None) == pytest.approx(sum(v / (v + 0.1 * mean) for v in lam.ravel()))


@pytest.mark.parametrize("budget", [4, 5, 37, 256, 1000, 4096])
def test_shares_sum_to_the_budget_one_each_then_in_proportion(budget):
    weights = [1.0, 7.5, 0.0, 3.25]
    split = shares(budget, weights)
    assert sum(split) == budget and min(split) >= 1
    ideal = np.array(weights) / sum(weights) * (budget - len(weights))
    assert np.all(np.abs(np.array(split) - 1 - ideal) < 1.0)  # largest remainder: within one of the ideal share
    assert split == shares(budget, list(weights))  # deterministic


def test_factor_share_is_the_largest_product_within_the_share_by_brute_force():
    for share in (1, 7, 12, 64, 97, 300):
        for d_in, d_out in ((9, 5), (4, 64), (65, 65), (1, 3)):
            k_in, k_out = factor_share(share, d_in, d_out)
            best = max(a * b for a in range(1, d_in + 1) for b in range(1, d_out + 1) if a * b <= share)
            assert k_in * k_out == best and k_in <= d_in and k_out <= d_out


@pytest.mark.parametrize("budget", [4, 64, 1024, 3000])
def test_allocation_stays_within_the_budget_and_is_deterministic(budget):
    effective = {"a": 2.0, "b": 40.0, "c": 9.0, "d": 120.0}
    widths = allocate(budget, SHAPES, effective)
    assert list(widths) == [name for name, _, _ in SHAPES]
    assert sum(k_in * k_out for k_in, k_out in widths.values()) <= budget
    assert widths == allocate(budget, SHAPES, dict(reversed(list(effective.items()))))
    if budget >= 1024:  # the module of the largest effective dimension gets the most numbers
        assert max(widths, key=lambda n: widths[n][0] * widths[n][1]) == "d"


def test_too_small_a_budget_is_refused():
    with pytest.raises(ValueError, match="cannot give each of 4 modules one number"):
        allocate(3, SHAPES, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})


def _raw(tmp_path, model, train, name, **projection):
    raw = job_config(tmp_path, model, train, curvature={"strategy": "ekfac", "fisher": "empirical"})
    raw["store"]["path"] = str(tmp_path / f"{name}.zarr")
    raw["projection"] = projection
    return raw


@pytest.mark.parametrize(
    ("projection", "words"),
    [
        ({"budget": {"numbers_per_row": 0, "measured_on": "x"}}, "numbers_per_row"),
        ({"budget": {"numbers_per_row": 64, "measured_on": "x"}, "dim": 16}, "budget replaces dim"),
        ({"budget": {"numbers_per_row": 64, "measured_on": 3}}, "measured_on"),
        ({"budget": {"numbers_per_row": 64, "measured_on": "x", "fit_rows": 4}}, "fit_rows is for a budget"),
        ({"budget": {"numbers_per_row": 64, "measured_on": "x"}, "kind": "kfac_eigen"}, "budget is for kind"),
    ],
)
def test_bad_budget_settings_are_refused_naming_the_key(tmp_path, tiny_models, text_train, projection, words):
    with pytest.raises(TributaryError, match=words) as refused:
        parse_config(_raw(tmp_path, tiny_models["gpt2"], text_train, "bad", **projection))
    header, *problems = str(refused.value).strip().splitlines()
    assert header.startswith("invalid config") and len(problems) == 1  # the config's format: one line a problem
    assert problems[0].strip().startswith("projection")


def test_a_budget_below_one_number_per_module_is_refused_before_a_store_is_written(tmp_path, tiny_models, text_train):
    measured = parse_config(_raw(tmp_path, tiny_models["gpt2"], text_train, "dim0", dim=0))
    run_index(measured, show_progress=False)
    config = parse_config(
        _raw(
            tmp_path,
            tiny_models["gpt2"],
            text_train,
            "few",
            budget={"numbers_per_row": 2, "measured_on": str(measured.store.path)},
        )
    )
    with pytest.raises(TributaryError, match="projection.budget.numbers_per_row is 2, fewer than one number"):
        run_index(config, show_progress=False)
    assert not GradientStore.exists(config.store.path)


def test_a_budgeted_store_records_k_per_module_and_scores_its_projection(tmp_path, tiny_models, text_train):
    """grad_dot queries with the training rows themselves: the budgeted store's scores are R Rᵀ, with R the dim-0
    store's full gradients projected here by each module's P_outᵀ G P_in."""
    model = tiny_models["gpt2"]
    measured = parse_config(_raw(tmp_path, model, text_train, "dim0", dim=0))
    run_index(measured, show_progress=False)
    budget = 200
    raw = _raw(
        tmp_path,
        model,
        text_train,
        "budget",
        budget={"numbers_per_row": budget, "measured_on": str(measured.store.path)},
    )
    raw["method"] = {"name": "grad_dot"}
    config = parse_config(raw)
    store = run_index(config, show_progress=False)
    assert isinstance(store, GradientStore)
    spec = store.manifest.projection
    assert spec.budget == budget and store.manifest.width == spec.total_width <= budget
    widths = {(m.k_in, m.k_out) for m in spec.modules}
    assert len(widths) > 1  # not one k for every module
    full_store = GradientStore.open(measured.store.path)
    full = full_store.read_rows(0, full_store.rows)
    parts = []
    for module, wide in zip(spec.modules, full_store.manifest.projection.modules):
        gradient = full[:, wide.offset : wide.offset + wide.width].reshape(-1, wide.k_out, wide.k_in)
        p_in = spec.side_matrix(module, "in", torch_float64())
        p_out = spec.side_matrix(module, "out", torch_float64())
        p_in = np.eye(module.d_in) if p_in is None else p_in.numpy()
        p_out = np.eye(module.d_out) if p_out is None else p_out.numpy()
        parts.append(np.einsum("oa,noi,ib->nab", p_out, gradient, p_in).reshape(len(full), -1))
    projected = np.concatenate(parts, axis=1)
    np.testing.assert_allclose(store.read_rows(0, store.rows), projected, rtol=1e-9, atol=1e-12)
    scores = run_query(config, str(text_train), k=3).total
    assert scores is not None
    expected = projected @ projected.T
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


def torch_float64():
    import torch

    return torch.float64


def test_a_budget_where_the_workers_cannot_build_it_is_refused(tmp_path, tiny_models, text_train):
    raw = _raw(tmp_path, tiny_models["gpt2"], text_train, "zero3", budget={"numbers_per_row": 64, "measured_on": "x"})
    raw["placement"] = {"kind": "zero3"}
    raw["cluster"] = {"address": "local"}
    with pytest.raises(TributaryError, match="projection.budget is not supported with placement.kind zero3"):
        parse_config(raw)


def test_a_relative_measured_on_is_resolved_as_the_other_paths(tmp_path, tiny_models, text_train):
    raw = _raw(
        tmp_path, tiny_models["gpt2"], text_train, "rel", budget={"numbers_per_row": 64, "measured_on": "m.zarr"}
    )
    budget = parse_config(raw, base_dir=tmp_path / "sub").projection.budget
    assert budget is not None and budget.measured_on == str((tmp_path / "sub" / "m.zarr").resolve())


def test_exact_and_rescore_run_on_a_budgeted_store(tmp_path, tiny_models, text_train):
    """--exact beside a budgeted store gives the dim-0 store's EK-FAC scores; --rescore over every row too."""
    from engine.config import QueryOptions
    from engine.local_or_ray import run_exact

    model = tiny_models["gpt2"]
    measured = parse_config(_raw(tmp_path, model, text_train, "dim0", dim=0))
    run_index(measured, show_progress=False)
    raw = _raw(
        tmp_path, model, text_train, "b", budget={"numbers_per_row": 64, "measured_on": str(measured.store.path)}
    )
    raw["exact"] = {"factors": True}
    config = parse_config(raw)
    run_index(config, show_progress=False)
    expected = run_query(measured, str(text_train), k=3).total
    assert expected is not None
    ours = run_exact(config, str(text_train), QueryOptions(k=3)).scores
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-10 * np.abs(expected).max())
    every = run_exact(config, str(text_train), QueryOptions(k=3), rescore=len(expected[0]))
    assert np.array_equal(every.scores, ours)


def _fit_measured(tmp_path, model, train, name: str, budget: int, **extra):
    raw = _raw(tmp_path, model, train, name, budget={"numbers_per_row": budget})
    raw.update(extra)
    return parse_config(raw)


def test_a_budget_measured_in_the_fit_pass_splits_by_the_kfac_effective_dimension(tmp_path, tiny_models, text_train):
    """No measured_on: index measures Σ Λ/(Λ+λ) of the K-FAC eigenvalues in its own fit pass. Reference: the
    K-FAC factors of a dim-0 store (pass 1's covariances, another code path), split by the same rule."""
    from engine.store.budget import MEASURED, measurement_path

    model = tiny_models["gpt2"]
    reference = parse_config(_raw(tmp_path, model, text_train, "kfac0", dim=0))
    reference = reference.model_copy(update={"curvature": reference.curvature.model_copy(update={"strategy": "kfac"})})
    run_index(reference, show_progress=False)
    lam = {name: f.lam for name, f in GradientStore.open(reference.store.path).read_factors().items()}
    budget = 150
    config = _fit_measured(tmp_path, model, text_train, "fit", budget)
    store = run_index(config, show_progress=False)
    assert isinstance(store, GradientStore)
    measured = GradientStore.open(measurement_path(config)).read_module_arrays(MEASURED)
    expected = {name: effective_dimension(value, None) for name, value in lam.items()}
    for name, value in expected.items():
        assert measured[name][0, 0] == pytest.approx(value, rel=1e-6)
    spec = store.manifest.projection
    shapes = [(m.name, m.d_in, m.d_out) for m in spec.modules]
    ours = {m.name: (m.k_in, m.k_out) for m in spec.modules}
    assert ours == allocate(budget, shapes, {name: float(measured[name][0, 0]) for name in measured})
    assert ours == allocate(budget, shapes, expected)
    assert spec.budget == budget and store.manifest.width == sum(a * b for a, b in ours.values()) <= budget
    assert len(set(ours.values())) > 1
    assert "partials" not in GradientStore.open(measurement_path(config)).group  # the full-width sums are dropped
    again = run_index(_fit_measured(tmp_path, model, text_train, "again", budget), show_progress=False)
    assert isinstance(again, GradientStore)
    assert again.manifest.projection == spec  # deterministic
    assert np.array_equal(again.read_rows(0, again.rows), store.read_rows(0, store.rows))
    scores = run_query(config, str(text_train), k=3).total  # the query rebuilds the same k from the measurement
    assert scores is not None and scores.shape == (store.rows, store.rows)


def test_a_budget_read_before_it_is_measured_is_refused_in_one_line(tmp_path, tiny_models, text_train):
    """(A query of a store whose measurement was deleted meets this refusal.)"""
    from engine.store.budget import measured_effective_dimensions

    config = _fit_measured(tmp_path, tiny_models["gpt2"], text_train, "unmeasured", 64)
    with pytest.raises(TributaryError, match="effective dimensions are not measured yet") as refused:
        measured_effective_dimensions(config, [("a", 2, 2)])
    assert len(str(refused.value).splitlines()) == 1


def _budget_raw(model, train, path: str, cluster: dict | None = None) -> dict:
    from tests.distributed_helpers import store_config

    raw = store_config(model, train, path, cluster=cluster)
    raw["projection"] = {"seed": 3, "budget": {"numbers_per_row": 40}}
    return raw


def _measured(config_path: str) -> dict[str, np.ndarray]:
    from engine.store.budget import MEASURED

    return GradientStore.open(config_path + ".budget").read_module_arrays(MEASURED)


@pytest.mark.heavy  # CLI processes killed and resumed: ~1 min on 2 cores
def test_an_index_killed_during_the_budget_fit_resumes_it_and_gives_the_same_store(tmp_path, tiny_models, text_train):
    from tests.distributed_helpers import run_cli, write_config

    single_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    path = str(tmp_path / "store.zarr")
    config = write_config(tmp_path / "job.yaml", _budget_raw(tiny_models["gpt2"], text_train, path))
    killed = run_cli(
        "index", str(config), "--no-progress", env={"TRIBUTARY_CHAOS": "driver:projection:1", **single_thread}
    )
    assert killed.returncode == -9, killed.stderr
    measuring = GradientStore.open(path + ".budget")
    assert len(measuring.manifest.shards["projection"]) == 1 and not measuring.has_group("effective_dimension")
    assert not GradientStore.exists(path), "the store is created only once the budget is measured"
    resumed = run_cli("index", str(config), "--no-progress", env=single_thread)
    assert resumed.returncode == 0, resumed.stderr
    runs = GradientStore.open(path + ".budget").manifest.runs
    assert measuring.manifest.runs[0].computed["projection"][0] not in runs[1].computed["projection"]
    reference_path = str(tmp_path / "reference.zarr")
    reference = write_config(tmp_path / "ref.yaml", _budget_raw(tiny_models["gpt2"], text_train, reference_path))
    assert run_cli("index", str(reference), "--no-progress", env=single_thread).returncode == 0
    for name, value in _measured(reference_path).items():
        assert np.array_equal(_measured(path)[name], value), name
    ours, theirs = GradientStore.open(path), GradientStore.open(reference_path)
    assert ours.manifest.projection == theirs.manifest.projection
    assert np.array_equal(ours.read_rows(0, ours.rows), theirs.read_rows(0, theirs.rows))


@pytest.mark.heavy  # a Ray cluster: ~1 min on 2 cores
@pytest.mark.requires_ray
def test_one_and_two_ray_workers_measure_the_same_budget(tmp_path, tiny_models, text_train):
    from tests.distributed_helpers import local_ray

    stores = {}
    with local_ray():
        for workers in (1, 2):
            path = str(tmp_path / f"store-{workers}.zarr")
            raw = _budget_raw(tiny_models["gpt2"], text_train, path, cluster={"address": "local", "workers": workers})
            run_index(parse_config(raw), show_progress=False)
            stores[workers] = GradientStore.open(path)
            pids = {entry.pid for entry in GradientStore.open(path + ".budget").manifest.shards["projection"].values()}
            assert len(pids) == workers, "the fit shards are spread over the workers"
    for name, value in _measured(stores[1].path).items():
        assert np.array_equal(_measured(stores[2].path)[name], value), name
    assert stores[1].manifest.projection == stores[2].manifest.projection
    assert np.array_equal(stores[1].read_rows(0, stores[1].rows), stores[2].read_rows(0, stores[2].rows))


def test_a_budget_fitted_on_fit_rows_measures_every_stride_th_row(tmp_path, tiny_models, text_train):
    """fit_rows: the measurement equals that of a dim-0 K-FAC store of every ⌈N/fit_rows⌉-th row alone."""
    import json

    from engine.store.budget import MEASURED, measurement_path

    model = tiny_models["gpt2"]
    lines = text_train.read_text().splitlines()
    stride = -(-len(lines) // 3)
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(line + "\n" for line in lines[::stride]))
    assert len(lines[::stride]) >= 2 and json.loads(lines[0])
    raw = _raw(tmp_path, model, subset, "kfac_subset", dim=0)
    raw["curvature"]["strategy"] = "kfac"
    reference = parse_config(raw)
    run_index(reference, show_progress=False)
    lam = {name: f.lam for name, f in GradientStore.open(reference.store.path).read_factors().items()}
    raw = _raw(tmp_path, model, text_train, "fit3", budget={"numbers_per_row": 100, "fit_rows": 3})
    raw["store"]["rows_per_chunk"] = 2  # fit rows in several shards
    config = parse_config(raw)
    run_index(config, show_progress=False)
    measured = GradientStore.open(measurement_path(config)).read_module_arrays(MEASURED)
    for name, value in lam.items():
        assert measured[name][0, 0] == pytest.approx(effective_dimension(value, None), rel=1e-6)


def test_a_measurement_made_on_another_model_is_refused_and_remade_with_overwrite(tmp_path, tiny_models, text_train):
    """The store at store.path is gone but its .budget measurement stays; the model changes (same shapes, other
    weights): the old split is refused in one line naming the measurement, and --overwrite measures the new model
    (equal to measuring it at a fresh path)."""
    import shutil

    from engine.store.budget import MEASURED, measurement_path
    from engine.testing.tiny import save_tiny
    from tests.conftest import vocabulary_texts

    other = save_tiny(tmp_path / "other", "gpt2", vocabulary_texts(), hidden=8, layers=2, heads=2, seed=7)
    first = _fit_measured(tmp_path, tiny_models["gpt2"], text_train, "changing", 40)
    run_index(first, show_progress=False)
    shutil.rmtree(first.store.path)
    changed = first.derive(model={"path": str(other)})
    with pytest.raises(TributaryError, match=r"changing\.zarr\.budget was built from a different model") as refused:
        run_index(changed, show_progress=False)
    assert len(str(refused.value).splitlines()) == 1
    assert not GradientStore.exists(changed.store.path)
    run_index(changed, show_progress=False, overwrite=True)
    fresh = _fit_measured(tmp_path, other, text_train, "fresh", 40)
    run_index(fresh, show_progress=False)
    remade = GradientStore.open(measurement_path(changed)).read_module_arrays(MEASURED)
    expected = GradientStore.open(measurement_path(fresh)).read_module_arrays(MEASURED)
    assert remade.keys() == expected.keys()
    assert all(np.array_equal(remade[name], expected[name]) for name in expected)
    assert (
        GradientStore.open(changed.store.path).manifest.projection
        == GradientStore.open(fresh.store.path).manifest.projection
    )
