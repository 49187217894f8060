"""In-memory attribution reads the index's own projection, curvature and optimizer sections (issue 27): a bad
value is refused by the section's validation, as in a YAML config, not carried as an unchecked string."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from engine.attribution import Checkpoint, Dataset, InMemoryAttribution, Settings, TrainingRun, squared_error
from engine.attribution.inputs import Segment
from engine.config import CurvatureConfig, OptimizerConfig, ProjectionBudget, ProjectionConfig
from engine.errors import TributaryError


def _setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    data = Dataset(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64))
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return model, data, params


@pytest.mark.parametrize(
    "build",
    [
        lambda: ProjectionConfig(kind="sparse"),  # type: ignore[arg-type]
        lambda: CurvatureConfig(strategy="shampoo"),  # type: ignore[arg-type]
        lambda: OptimizerConfig(name="lion"),  # type: ignore[arg-type]
        lambda: OptimizerConfig(momentum=1.5),
    ],
    ids=["projection kind", "curvature strategy", "optimizer name", "momentum"],
)
def test_a_bad_section_value_is_refused_where_it_is_built(build):
    with pytest.raises(ValidationError):
        build()


def test_a_budget_needs_a_store_and_is_refused_in_memory():
    model, data, params = _setting()
    budget = ProjectionConfig(budget=ProjectionBudget(numbers_per_row=8, measured_on="store.zarr"))
    with pytest.raises(TributaryError, match="projection.budget is measured on a store"):
        InMemoryAttribution(model, squared_error(), TrainingRun.final_only(params, data), Settings(projection=budget))


def test_grad_dot_on_the_identity_projection_equals_the_autograd_dot_product():
    model, data, params = _setting()
    queries = Dataset(data.inputs[:2], data.targets[:2])
    settings = Settings(projection=ProjectionConfig(dim=0), curvature=CurvatureConfig(strategy="identity"))
    scores = InMemoryAttribution(model, squared_error(), TrainingRun.final_only(params, data), settings).scores(
        "grad_dot", queries
    )

    def gradient(x, y) -> np.ndarray:
        model.zero_grad()
        loss = squared_error().loss(model(x[None]), y[None]).sum()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).numpy()  # type: ignore[union-attr]

    train = np.stack([gradient(x, y) for x, y in zip(data.inputs, data.targets)])
    query = np.stack([gradient(x, y) for x, y in zip(queries.inputs, queries.targets)])
    np.testing.assert_allclose(scores, query @ train.T, rtol=1e-8, atol=1e-10)


def test_an_adamw_run_is_refused_in_memory_naming_the_section_field():
    model, data, params = _setting()
    run = TrainingRun([Segment([Checkpoint(params)], data)], OptimizerConfig(name="adamw"))
    with pytest.raises(TributaryError, match="TrainingRun.optimizer.name 'adamw'"):
        InMemoryAttribution(model, squared_error(), run)
