"""benchmarks/lm_lds.py against independent computations: its retrained ground truth, its cache's refusal,
and the scores it reads back from `tributary query` (Grad-Dot at dim 0, recomputed here with autograd)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from benchmarks import lm_lds
from benchmarks.lm_lds_task import Architecture, Recipe, TaskSpec, build_model, build_task
from engine.capture.loss import per_example_loss
from engine.capture.measurement import measurement_loss
from engine.config import parse_config
from engine.data.rows import Row
from engine.data.tokenize import tokenize_row
from engine.errors import TributaryError
from engine.evaluation.lds import lds

TINY = TaskSpec(
    train=12,
    queries=3,
    window=8,
    architecture=Architecture(layers=1, hidden=16, heads=2),
    recipe=Recipe(epochs=2, learning_rate=3e-3, batch_size=4),
)


def direct_retrain_losses(task, mask: np.ndarray, seed: int) -> np.ndarray:
    """Train with a loop written out here (HF's own causal-LM loss) and measure each query as the engine
    does: its rows tokenised by the engine with the task's tokenizer, the `logprob_sum` measurement."""
    ids = task.train_ids[torch.from_numpy(mask)]
    model = build_model(task.spec.architecture, len(task.vocabulary), task.spec.window, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.spec.recipe.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(task.spec.recipe.epochs):
        order = torch.randperm(len(ids), generator=generator)
        for batch in order.split(task.spec.recipe.batch_size):
            optimizer.zero_grad()
            model(ids[batch], labels=ids[batch]).loss.backward()
            optimizer.step()
    tokenizer = task.tokenizer()
    losses = []
    with torch.no_grad():
        for i, text in enumerate(task.query_texts):
            row, _ = tokenize_row(Row(index=i, id=f"q{i}", line=i + 1, text=text), tokenizer, task.spec.window, "q")
            input_ids, labels = torch.tensor([row.input_ids]), torch.tensor([row.labels])
            losses.append(float(measurement_loss("logprob_sum", model(input_ids).logits, labels)[0]))
    return np.array(losses)


def test_ground_truth_equals_direct_retraining_and_the_cache_is_refused_for_another_task(tmp_path):
    task = build_task(TINY)
    cache = tmp_path / "truth.zarr"
    truth, timing = lm_lds.ground_truth(task, 0.5, subsets=2, seeds=2, workers=2, cache=cache)
    assert not timing["reused"] and truth.masks.shape == (2, 12) and truth.masks.sum(1).tolist() == [6, 6]
    seeds = lm_lds.run_seeds(2, 2).reshape(2, 2)
    for j in range(2):
        for r in range(2):
            expected = direct_retrain_losses(task, truth.masks[j], int(seeds[j, r]))
            np.testing.assert_allclose(truth.measurements[j, r], expected, rtol=1e-4)
    assert seeds[0, 0] != seeds[0, 1]  # the repeats differ in seed, so they differ in losses
    assert not np.allclose(truth.measurements[0, 0], truth.measurements[0, 1])

    again, timing = lm_lds.ground_truth(task, 0.5, subsets=2, seeds=2, workers=0, cache=cache)
    assert timing["reused"]
    np.testing.assert_array_equal(again.measurements, truth.measurements)
    for changed in (
        replace(TINY, recipe=replace(TINY.recipe, epochs=3)),
        replace(TINY, architecture=replace(TINY.architecture, hidden=8)),
        replace(TINY, data_seed=TINY.data_seed + 1),
    ):
        with pytest.raises(TributaryError, match="fingerprint"):
            lm_lds.ground_truth(build_task(changed), 0.5, subsets=2, seeds=2, workers=0, cache=cache)
    with pytest.raises(TributaryError, match="seeds"):
        lm_lds.ground_truth(task, 0.5, subsets=2, seeds=1, workers=0, cache=cache)


def tracked_gradients(model, ids: torch.Tensor) -> torch.Tensor:
    """(rows, P) per-row gradients of the summed token loss w.r.t. every transformer-block Conv1D weight and
    bias (the engine's default modules: all but lm_head and the embeddings)."""
    parameters = [p for name, p in model.named_parameters() if name.startswith("transformer.h.") and ".c_" in name]
    rows = []
    for row in ids:
        loss = per_example_loss(model(row[None]).logits, row[None])[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, parameters)]))
    return torch.stack(rows).double()


def test_scores_read_from_the_cli_are_grad_dot_and_their_lds_is_the_spearman_of_the_group_sums(tmp_path):
    from transformers import GPT2LMHeadModel

    task = build_task(TINY)
    work = tmp_path / "work"
    lm_lds.prepare_workdir(task, work)
    setting = lm_lds.Setting("grad_dot", "exact", 0)
    scores, timing = lm_lds.scores_through_cli(setting, work, lm_lds.CLI, fit_rows=None, window=TINY.window)
    assert timing["index_seconds"] > 0 and not (work / "stores" / f"{setting.name}.zarr").exists()
    model = GPT2LMHeadModel.from_pretrained(work / "model").eval()
    expected = (tracked_gradients(model, task.query_ids) @ tracked_gradients(model, task.train_ids).T).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())

    truth, _ = lm_lds.ground_truth(task, 0.5, subsets=6, seeds=1, workers=0, cache=None)
    predictions = -(truth.masks.astype(float) @ scores.T)  # (M, Q): the kept sets' summed scores, negated
    direct = [np.corrcoef(rankdata(truth.mean[:, q]), rankdata(predictions[:, q]))[0, 1] for q in range(len(scores))]
    assert lds(scores, truth)["mean"] == pytest.approx(float(np.mean(direct)), abs=1e-12)


def test_dim_zero_is_run_once_as_exact_and_data_dependent_kinds_get_fit_rows(tmp_path):
    plan = lm_lds.settings(["ekfac", "grad_dot"], ["rademacher", "kfac_eigen"], [0, 16])
    assert [s.name for s in plan] == [
        "ekfac-exact-0",
        "grad_dot-exact-0",
        "ekfac-rademacher-16",
        "ekfac-kfac_eigen-16",
        "grad_dot-rademacher-16",
        "grad_dot-kfac_eigen-16",
    ]
    eigen = lm_lds.job_config(plan[3], tmp_path, fit_rows=64, window=32, fit="sketch")
    assert eigen["projection"] == {"dim": 16, "seed": 0, "kind": "kfac_eigen", "fit": "sketch", "fit_rows": 64}
    assert parse_config(eigen).projection.fit == "sketch"
    assert eigen["curvature"]["strategy"] == "ekfac" and eigen["method"]["name"] == "if"
    random = lm_lds.job_config(plan[2], tmp_path, fit_rows=64, window=32)
    assert random["projection"] == {"dim": 16, "seed": 0, "kind": "rademacher"}
    assert parse_config(random).projection.dim == 16  # what `tributary index` will read
    exact = lm_lds.job_config(plan[1], tmp_path, fit_rows=64, window=32)
    assert exact["projection"]["dim"] == 0 and exact["curvature"]["strategy"] == "identity"
