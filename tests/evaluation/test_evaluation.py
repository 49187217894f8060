"""The evaluation harness against independent computations: LDS on a task whose linear datamodel is
exact, the gold standard against closed-form further training of linear regression, paired vs unpaired
seed variance, batch orders, the ground-truth cache, Ray vs in-process retraining, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from engine.attribution.in_memory import Dataset
from engine.errors import TributaryError
from engine.evaluation import lds as lds_module
from engine.evaluation.gold_standard import further_recipe, gold_standard
from engine.evaluation.jobs import execute
from engine.evaluation.lds import ground_truth, lds, lds_per_query
from engine.evaluation.removal import subset_removal
from engine.evaluation.statistics import cosine, spearman
from engine.evaluation.tasks import AdditiveTask, Task, tabular
from engine.evaluation.training import Recipe, RunSpec, Stage, step_plan, step_weights


def linear_task(n: int = 40, d: int = 3, batch: int | None = None, seed: int = 0) -> Task:
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal((n + 6, d)))
    y = x @ torch.tensor(rng.standard_normal((d, 1))) + 0.5 * torch.tensor(rng.standard_normal((n + 6, 1)))
    return Task(
        "linear",
        lambda: nn.Linear(d, 1),
        "squared_error",
        Dataset(x[:n], y[:n]),
        Dataset(x[n:], y[n:]),
        Recipe((Stage(20, 0.1, batch),)),
    )


def off_optimum(task: Task) -> dict[str, torch.Tensor]:
    return {name: p + 0.3 for name, p in task.init(3).items()}  # not a stationary point: training drifts


# ---- statistics --------------------------------------------------------------------------------------


def test_spearman_and_cosine_match_scipy_and_the_formula():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(4, 30)).astype(float)  # many ties
    b = rng.standard_normal((4, 30))
    # scipy builds its result class at run time (_make_tuple_bunch), so pyright cannot see .statistic
    expected = [scipy.stats.spearmanr(a[i], b[i]).statistic for i in range(4)]  # pyright: ignore[reportAttributeAccessIssue]
    np.testing.assert_allclose(spearman(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(
        cosine(a, b), [a[i] @ b[i] / np.linalg.norm(a[i]) / np.linalg.norm(b[i]) for i in range(4)], rtol=1e-12
    )


# ---- LDS ---------------------------------------------------------------------------------------------


def test_lds_of_the_true_datamodel_is_one_and_of_random_scores_zero():
    """Measured output = Σ_kept β + small noise: the true datamodel's scores reach LDS ≈ 1; random scores
    are 0 within the bootstrap CI."""
    rng = np.random.default_rng(1)
    task = AdditiveTask(rng.standard_normal((40, 60)), noise=0.05)
    truth = ground_truth(task, alpha=0.5, subsets=60, seeds=3, seed=0)
    exact = lds(task.true_scores(), truth)
    assert exact["mean"] > 0.98 and exact["ci95"][0] > 0.97
    random = lds(np.random.default_rng(7).standard_normal((40, 60)), truth)
    assert random["ci95"][0] <= 0.0 <= random["ci95"][1]
    # the sign convention: the negated datamodel is anti-correlated
    assert lds(-task.true_scores(), truth)["mean"] < -0.98
    # per query it is Spearman of the seed-mean measurements against −masks @ scores
    per_query = lds_per_query(task.true_scores(), truth)
    predictions = -(truth.masks.astype(float) @ task.true_scores().T)
    np.testing.assert_allclose(
        per_query[3],
        scipy.stats.spearmanr(truth.mean[:, 3], predictions[:, 3]).statistic,  # pyright: ignore[reportAttributeAccessIssue]
        rtol=1e-12,
    )


def test_lds_subsets_have_alpha_n_examples():
    masks = lds_module.subset_masks(50, 0.3, 10, seed=2)
    assert (masks.sum(axis=1) == 15).all() and len({m.tobytes() for m in masks}) == 10


# ---- the ground-truth cache --------------------------------------------------------------------------


def test_cached_ground_truth_is_reused_and_refused_when_the_task_changed(tmp_path):
    task = AdditiveTask(np.random.default_rng(2).standard_normal((5, 20)))
    first = ground_truth(task, 0.5, 10, 2, cache=tmp_path / "truth")
    assert task.calls == 1 and not first.reused
    second = ground_truth(task, 0.5, 10, 2, cache=tmp_path / "truth")
    assert task.calls == 1 and second.reused  # no retraining
    np.testing.assert_array_equal(first.measurements, second.measurements)
    np.testing.assert_array_equal(first.masks, second.masks)
    changed = AdditiveTask(task.effects + 1e-3)
    with pytest.raises(TributaryError, match="fingerprint changed"):
        ground_truth(changed, 0.5, 10, 2, cache=tmp_path / "truth")
    with pytest.raises(TributaryError, match="alpha changed"):
        ground_truth(task, 0.3, 10, 2, cache=tmp_path / "truth")
    assert changed.calls == 0 and task.calls == 1  # refused before any retraining


def test_cache_refuses_a_changed_model_and_reuses_without_retraining(tmp_path, monkeypatch):
    task = tabular("wine", train=40, queries=5, epochs=1, hidden=4)
    truth = ground_truth(task, 0.5, 3, 1, cache=tmp_path / "truth")

    def no_retraining(*args, **kwargs):
        raise AssertionError("retrained although the cache holds this ground truth")

    monkeypatch.setattr(lds_module, "retrain_subsets", no_retraining)
    again = ground_truth(tabular("wine", train=40, queries=5, epochs=1, hidden=4), 0.5, 3, 1, cache=tmp_path / "truth")
    assert again.reused
    np.testing.assert_array_equal(truth.measurements, again.measurements)
    for changed in (
        tabular("wine", train=40, queries=5, epochs=1, hidden=5),  # the model
        tabular("wine", train=40, queries=5, epochs=2, hidden=4),
    ):  # the training recipe
        with pytest.raises(TributaryError, match="another setting"):
            ground_truth(changed, 0.5, 3, 1, cache=tmp_path / "truth")


# ---- batch orders ------------------------------------------------------------------------------------


def test_paired_runs_see_the_same_batch_order_minus_the_left_out_example():
    recipe = Recipe((Stage(7, 0.1, 4),))
    full, _, _ = step_plan(RunSpec(seed=5), recipe, 10)
    keep = np.ones(10, bool)
    keep[3] = False
    without, _, _ = step_plan(RunSpec(seed=5, keep=keep), recipe, 10)
    # epoch 0: the full order is 3 batches of 4,4,2; without 3 it is the same sequence with 3 deleted
    sequence_full = np.concatenate([full[0, :4], full[1, :4], full[2, :2]])
    sequence_without = np.concatenate([without[0, :4], without[1, :4], without[2, :1]])
    np.testing.assert_array_equal(sequence_without, sequence_full[sequence_full != 3])
    # every_batch: the very same batches, with ℓ_3 / n subtracted in every step
    dense_full = step_weights(RunSpec(seed=5), recipe, 10)
    dense_down = step_weights(RunSpec(seed=5, down_weight=3), recipe, 10)
    expected = dense_full.copy()
    expected[:, 3] -= 1 / 10
    np.testing.assert_allclose(dense_down, expected)
    np.testing.assert_allclose(dense_full.sum(axis=1), 1.0)


# ---- the gold standard -------------------------------------------------------------------------------


def closed_form_losses(task: Task, start: dict, weights: np.ndarray, rate: float, steps: int) -> np.ndarray:
    """Full-batch GD on Σ_j w_j ½(x_jᵀθ − y_j)² from θ_0: θ_K = θ* + (I − ηH)^K (θ_0 − θ*)."""
    x = np.c_[task.train.inputs.numpy(), np.ones(len(task.train))]
    y = task.train.targets.numpy()[:, 0]
    hessian = x.T @ (weights[:, None] * x)
    optimum = np.linalg.solve(hessian, x.T @ (weights * y))
    theta0 = np.r_[start["weight"].numpy()[0], start["bias"].numpy()]
    theta = optimum + np.linalg.matrix_power(np.eye(len(theta0)) - rate * hessian, steps) @ (theta0 - optimum)
    xq = np.c_[task.queries.inputs.numpy(), np.ones(len(task.queries))]
    return 0.5 * (xq @ theta - task.queries.targets.numpy()[:, 0]) ** 2


@pytest.mark.parametrize("mode", ["remove", "every_batch"])
def test_gold_standard_equals_closed_form_further_training_of_linear_regression(mode):
    task = linear_task()
    start = off_optimum(task)
    n, rate, steps, left_out = len(task.train), 0.05, [3, 25], [0, 7, 19]
    gold = gold_standard(task, start, left_out, further_recipe(25, rate, None), steps, seeds=2, mode=mode)
    for t, k in enumerate(steps):
        full = closed_form_losses(task, start, np.full(n, 1 / n), rate, k)
        for position, i in enumerate(left_out):
            weights = np.full(n, 1 / (n - 1) if mode == "remove" else 1 / n)
            weights[i] = 0.0
            expected = closed_form_losses(task, start, weights, rate, k) - full
            np.testing.assert_allclose(gold.values(mean_adjust=False)[t, :, position], expected, rtol=1e-8, atol=1e-14)
    adjusted = gold.values(mean_adjust=True)
    np.testing.assert_allclose(adjusted, gold.values(False) - gold.values(False).mean(axis=2, keepdims=True))


def test_paired_seeds_give_a_lower_variance_gold_standard_than_unpaired():
    """Minibatch further training: with the same batch order minus i the per-seed sensitivities vary far
    less across seeds than with an independent order for the run without i (measured)."""
    task = linear_task(n=60, batch=6)
    start = off_optimum(task)
    recipe = further_recipe(30, 0.05, 6)
    left_out = list(range(0, 60, 6))
    paired = gold_standard(task, start, left_out, recipe, [10, 30], seeds=6, paired=True)
    unpaired = gold_standard(task, start, left_out, recipe, [10, 30], seeds=6, paired=False)
    every_batch = gold_standard(task, start, left_out, recipe, [10, 30], seeds=6, mode="every_batch")
    assert (paired.seed_variance() * 2 < unpaired.seed_variance()).all()  # measured here: 4-5x lower
    assert (every_batch.seed_variance() < unpaired.seed_variance()).all()


# ---- Ray ---------------------------------------------------------------------------------------------


def test_retraining_as_ray_tasks_equals_the_in_process_result():
    import ray

    task = tabular("wine", train=40, queries=6, epochs=2, hidden=4)
    keep = np.random.default_rng(0).random((6, 40)) < 0.5
    runs = [RunSpec(seed=s, keep=k, init_seed=s) for s, k in enumerate(keep)]
    local = execute(task, runs, task.recipe, [1, task.recipe.steps], None, "loss", workers=0, chunk=2)
    try:
        remote = execute(task, runs, task.recipe, [1, task.recipe.steps], None, "loss", workers=2, chunk=2)
    finally:
        ray.shutdown()
    np.testing.assert_allclose(remote, local, rtol=1e-12, atol=1e-14)
    assert not np.allclose(local[0], local[1])  # the runs really differ


# ---- subset removal ----------------------------------------------------------------------------------


def retrained_by_hand(task: Task, keep: np.ndarray, seed: int) -> np.ndarray:
    """(Q,) query losses ½(w·x + b − y)² after the task's full-batch gradient descent on the kept rows from
    the task's initialisation with `seed`, with the gradient written out in numpy (no autograd, no vmap)."""
    (stage,) = task.recipe.stages
    assert stage.batch_size is None and stage.examples is None  # full batch: the batch order plays no part
    start = task.init(seed)
    weight, bias = start["weight"].numpy().copy(), start["bias"].numpy().copy()  # (1, d), (1,)
    x, y = task.train.inputs.numpy()[keep], task.train.targets.numpy()[keep]
    for _ in range(stage.steps):
        residual = x @ weight.T + bias - y  # (m, 1)
        weight -= stage.learning_rate * residual.T @ x / len(x)
        bias -= stage.learning_rate * residual.mean(axis=0)
    queries_x, queries_y = task.queries.inputs.numpy(), task.queries.targets.numpy()
    return 0.5 * ((queries_x @ weight.T + bias - queries_y) ** 2).sum(axis=1)


def test_subset_removal_retrains_without_each_querys_top_k():
    task = linear_task(n=30)
    scores = np.random.default_rng(0).standard_normal((len(task.queries), 30))
    result = subset_removal(task, scores, [3], seeds=2)
    # independent: retrain every query's run by hand without that query's 3 highest-scoring rows
    seeds = [50_000 + r for r in range(2)]  # subset_removal's seeds for seed=0
    everything = np.ones(30, bool)
    base = np.mean([retrained_by_hand(task, everything, s) for s in seeds], axis=0)  # (Q,)
    changes = []
    for q in range(len(task.queries)):
        keep = everything.copy()
        keep[np.argsort(-scores[q], kind="stable")[:3]] = False
        changes.append(np.mean([retrained_by_hand(task, keep, s)[q] for s in seeds]) - base[q])
    assert np.abs(changes).min() > 1e-6  # removing 3 rows moves every query: an unchanged retraining would fail
    assert result["value"][0] == pytest.approx(np.mean(changes), rel=1e-10)
    assert result["sem"][0] == pytest.approx(np.std(changes, ddof=1) / np.sqrt(len(changes)), rel=1e-10)


# ---- bad input ---------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_before_any_work(tmp_path):
    task = AdditiveTask(np.ones((3, 10)))
    with pytest.raises(TributaryError, match="alpha"):
        ground_truth(task, 1.2, 5, 1)
    with pytest.raises(TributaryError, match="at least 2 subsets"):
        ground_truth(task, 0.5, 1, 1)
    truth = ground_truth(task, 0.5, 4, 1)
    with pytest.raises(TributaryError, match="shape"):
        lds(np.ones((3, 9)), truth)
    linear = linear_task()
    with pytest.raises(TributaryError, match="left-out"):
        gold_standard(linear, off_optimum(linear), [0, 99], further_recipe(5, 0.1, None), [5])
    with pytest.raises(TributaryError, match="mode"):
        gold_standard(linear, off_optimum(linear), [0], further_recipe(5, 0.1, None), [5], mode="drop")
    with pytest.raises(TributaryError, match="unknown"):
        tabular("iris")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(TributaryError, match="not a Tributary cache"):
        ground_truth(task, 0.5, 4, 1, cache=tmp_path / "junk")
    assert task.calls == 1
