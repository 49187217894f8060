"""Every method of engine.spectral against a fake `Resources`: hand-made query gradients, rows, factors and
preconditioners under a hand-made run plan, with no model, store or index behind them.

The references are written out here with dense matrices: each module's curvature H = (Q_S ⊗ Q_A) diag(Λ)
(Q_S ⊗ Q_A)ᵀ on the row-major vectorised gradient, and the method's matrix function of H (inverse, exponential,
matrix power) taken with numpy/scipy, not through the eigenbasis the engine rotates into. In the raw basis the
influence score is a closed form, Σ q g / (Λ + d), and is checked as such.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import scipy.linalg

from engine.config import MethodConfig
from engine.curvature.factors import ModuleFactors
from engine.errors import TributaryError
from engine.projection import ProjectionSpec
from engine.projection.projector import ModuleProjection
from engine.spectral.core import score_terms
from engine.spectral.methods import method_from_config
from engine.training_run.keys import ResourceKey
from engine.training_run.plan import CheckpointPlan, RunPlan, SegmentPlan

QUERIES, ROWS = 3, 5
MODULES = (ModuleProjection("m0", 4, 3, 3, 2, 0), ModuleProjection("m1", 3, 4, 2, 3, 6))  # (k_out, k_in) 2x3, 3x2
SPEC = ProjectionSpec(dim=3, seed=0, kind="rademacher", modules=MODULES)
C0, C1, C2 = (ResourceKey.checkpoint(i) for i in range(3))
RATES = {C0: 0.3, C1: 0.2, C2: 0.1}
# Two segments: s0 = c0, c1 (η̄ 0.25, K 4), s1 = c2 (η̄ 0.1, K 3); c2 is the final model.
PLAN = RunPlan(
    checkpoints=tuple(CheckpointPlan(key.group_name, 0 if key.index < 2 else 1, None, RATES[key]) for key in RATES),
    segments=(SegmentPlan(0, ("c0", "c1"), 0.25, 4), SegmentPlan(1, ("c2",), 0.1, 3)),
)
SEGMENT_KEYS = (ResourceKey.segment(0), ResourceKey.segment(1), ResourceKey.averaged(0), ResourceKey.averaged(1))


def _orthogonal(generator: np.random.Generator, size: int) -> np.ndarray:
    return np.linalg.qr(generator.standard_normal((size, size)))[0]


def _rotated_factors(generator: np.random.Generator) -> dict[str, ModuleFactors]:
    return {
        m.name: ModuleFactors(
            "ekfac",
            lam=generator.uniform(0.2, 2.0, (m.k_out, m.k_in)),
            q_a=_orthogonal(generator, m.k_in),
            q_s=_orthogonal(generator, m.k_out),
        )
        for m in MODULES
    }


@dataclass
class FakeResources:
    """A `Resources` that hands out fixed arrays by key: what a method may ask for, and nothing else."""

    spec: ProjectionSpec
    plan: RunPlan
    queries: dict[ResourceKey, np.ndarray]
    rows: dict[ResourceKey, np.ndarray]
    curvature: dict[ResourceKey, dict[str, ModuleFactors]]
    preconditioners: dict[int, dict[str, np.ndarray]]
    asked: list[tuple[str, ResourceKey | int]] = field(default_factory=list)

    def query_gradients(self, key: ResourceKey) -> np.ndarray:
        self.asked.append(("query", key))
        return self.queries[key]

    def factors(self, key: ResourceKey) -> dict[str, ModuleFactors]:
        self.asked.append(("factors", key))
        return self.curvature[key]

    def dense_factors(self, key: ResourceKey) -> dict[str, ModuleFactors]:
        """TRAK's: the eigendecomposition of each module's ΦᵀΦ over the rows under `key`."""
        out = {}
        for m in self.spec.modules:
            block = self.rows[key][:, m.offset : m.offset + m.width]
            values, vectors = np.linalg.eigh(block.T @ block)
            out[m.name] = ModuleFactors("dense", lam=values, basis=vectors)
        return out

    def training_blocks(self, key: ResourceKey) -> Iterable[np.ndarray]:
        rows = self.rows[key]
        return [rows[:2], rows[2:]]  # two blocks, as a store streams them

    def preconditioner(self, segment: int) -> dict[str, np.ndarray]:
        self.asked.append(("preconditioner", segment))
        return self.preconditioners[segment]


def fake_resources(seed: int = 0, plan: RunPlan = PLAN) -> FakeResources:
    generator = np.random.default_rng(seed)
    keys = (C0, C1, C2, ResourceKey.averaged(0), ResourceKey.averaged(1))
    width = SPEC.total_width
    return FakeResources(
        spec=SPEC,
        plan=plan,
        queries={key: generator.standard_normal((QUERIES, width)) for key in keys},
        rows={key: generator.standard_normal((ROWS, width)) for key in keys},
        curvature={key: _rotated_factors(generator) for key in (C0, C1, C2, *SEGMENT_KEYS)},
        preconditioners={
            segment: {m.name: generator.uniform(0.5, 2.0, (m.k_out, m.k_in)) for m in MODULES} for segment in (0, 1)
        },
    )


def engine_scores(resources: FakeResources, config: MethodConfig) -> np.ndarray:
    """The engine's (queries, rows) scores: the method's query terms, each scored against its rows."""
    method = method_from_config(config)
    terms = method.terms(resources)

    def blocks(key: ResourceKey):
        start = 0
        for block in resources.training_blocks(key):
            yield start, start + len(block), block
            start += len(block)

    return score_terms(terms, blocks, ROWS, method)


# ---- the dense reference -------------------------------------------------------------------------------------


def module_slice(name: str) -> slice:
    m = next(m for m in MODULES if m.name == name)
    return slice(m.offset, m.offset + m.width)


def dense_curvature(factors: ModuleFactors) -> np.ndarray:
    """H on the row-major vec of a (k_out, k_in) gradient: (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ."""
    assert factors.q_s is not None and factors.q_a is not None
    basis = np.kron(factors.q_s, factors.q_a)
    return basis @ np.diag(factors.lam.ravel()) @ basis.T


def per_module(function, vectors: np.ndarray, *matrices: dict[str, np.ndarray]) -> np.ndarray:
    """Apply `function(name, module's columns, each of matrices' entry)` to every module of (Q, D) rows."""
    out = np.empty_like(vectors)
    for m in MODULES:
        part = module_slice(m.name)
        out[:, part] = function(m.name, vectors[:, part], *(matrix[m.name] for matrix in matrices))
    return out


def influence_reference(resources: FakeResources, damping: dict[str, float]) -> np.ndarray:
    factors = resources.curvature[C2]
    side = per_module(
        lambda name, q: np.linalg.solve(dense_curvature(factors[name]) + damping[name] * np.eye(q.shape[1]), q.T).T,
        resources.queries[C2],
    )
    return side @ resources.rows[C2].T


# ---- single-checkpoint methods ---------------------------------------------------------------------------------


def test_influence_in_the_raw_basis_is_the_closed_form():
    resources = fake_resources(1)
    lam = {m.name: np.random.default_rng(m.offset).uniform(0.2, 2.0, (m.k_out, m.k_in)) for m in MODULES}
    resources.curvature[C2] = {name: ModuleFactors("diagonal", lam=values) for name, values in lam.items()}
    q, g = resources.queries[C2], resources.rows[C2]
    expected = sum(
        (q[:, module_slice(name)] / (values.ravel() + 0.05)) @ g[:, module_slice(name)].T
        for name, values in lam.items()
    )
    np.testing.assert_allclose(engine_scores(resources, MethodConfig(name="if", damping=0.05)), expected, rtol=1e-12)


def test_influence_is_the_damped_inverse_of_the_dense_curvature():
    resources = fake_resources(2)
    ours = engine_scores(resources, MethodConfig(name="if", damping=0.3))
    np.testing.assert_allclose(ours, influence_reference(resources, {"m0": 0.3, "m1": 0.3}), rtol=1e-10)
    # default damping: 0.1 x the mean eigenvalue of each module (the trace of H over its size)
    default = {m.name: 0.1 * np.trace(dense_curvature(resources.curvature[C2][m.name])) / m.width for m in MODULES}
    ours = engine_scores(resources, MethodConfig(name="if"))
    np.testing.assert_allclose(ours, influence_reference(resources, default), rtol=1e-10)
    assert {key for what, key in resources.asked} == {C2}  # the final model's gradients and factors only


def test_grad_dot_and_grad_cos_are_plain_and_normalised_inner_products():
    resources = fake_resources(3)
    q, g = resources.queries[C2], resources.rows[C2]
    np.testing.assert_allclose(engine_scores(resources, MethodConfig(name="grad_dot")), q @ g.T, rtol=1e-12)
    cosine = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    np.testing.assert_allclose(engine_scores(resources, MethodConfig(name="grad_cos")), cosine, rtol=1e-12)
    assert ("factors", C2) not in resources.asked


@pytest.mark.parametrize("damping", [0.7, None])
def test_datainf_averages_rank_one_inverses(damping):
    resources = fake_resources(4)
    q, g = resources.queries[C2], resources.rows[C2]

    def side(name: str, v: np.ndarray) -> np.ndarray:
        rows = g[:, module_slice(name)]
        lam = damping if damping is not None else 0.1 * np.mean(np.sum(rows**2, axis=1)) / rows.shape[1]
        inverses = [np.linalg.inv(np.outer(row, row) + lam * np.eye(len(row))) for row in rows]
        return (np.mean(inverses, axis=0) @ v.T).T

    expected = per_module(side, q) @ g.T
    np.testing.assert_allclose(engine_scores(resources, MethodConfig(name="datainf", damping=damping)), expected)


# ---- methods over checkpoints and segments --------------------------------------------------------------------


def test_tracin_sums_each_checkpoints_rate_times_its_inner_product():
    resources = fake_resources(5)
    expected = sum(rate * resources.queries[key] @ resources.rows[key].T for key, rate in RATES.items())
    np.testing.assert_allclose(engine_scores(resources, MethodConfig(name="tracin")), expected, rtol=1e-12)


def test_tracin_without_a_rate_is_refused_naming_the_checkpoint():
    plan = replace(PLAN, checkpoints=(replace(PLAN.checkpoints[0], learning_rate=None), *PLAN.checkpoints[1:]))
    with pytest.raises(TributaryError, match="method tracin needs the learning rate at checkpoint c0"):
        engine_scores(fake_resources(5, plan), MethodConfig(name="tracin"))


@pytest.mark.parametrize("damping", [0.5, None])
def test_trak_averages_the_damped_gram_solves_over_checkpoints(damping):
    resources = fake_resources(6)
    expected = np.zeros((QUERIES, ROWS))
    for key in (C0, C1, C2):
        rows = resources.rows[key]

        def side(name: str, v: np.ndarray) -> np.ndarray:
            phi = rows[:, module_slice(name)]  # noqa: B023 - used at once, inside this iteration
            gram = phi.T @ phi
            d = damping if damping is not None else 0.1 * np.trace(gram) / len(gram)
            return np.linalg.solve(gram + d * np.eye(len(gram)), v.T).T

        expected += per_module(side, resources.queries[key]) @ rows.T / 3
    np.testing.assert_allclose(engine_scores(resources, MethodConfig(name="trak", damping=damping)), expected)


def _source_reference(resources: FakeResources, form: str, averaged: bool = False) -> np.ndarray:
    """Bae et al.'s walk back through the segments, with dense matrix functions of each segment's H (M = P^½ H P^½
    when preconditioned: the side P^½ F(M) P^½ u, the transport P^-½ S(M) P^½ u)."""
    u = resources.queries[C2]
    total = np.zeros((QUERIES, ROWS))
    for segment in reversed(PLAN.segments):
        assert segment.eta is not None and segment.steps is not None
        eta, steps = float(segment.eta), int(segment.steps)
        factors = resources.curvature[segment.averaged if averaged else segment.key]
        roots = {m.name: np.ones(m.width) for m in MODULES}
        if resources.plan.preconditioned:
            roots = {name: np.sqrt(p.ravel()) for name, p in resources.preconditioners[segment.index].items()}

        def matrix_function(name: str, kind: str) -> np.ndarray:
            h = dense_curvature(factors[name])  # noqa: B023 - used at once, inside this iteration
            if form == "exponential":
                transport = scipy.linalg.expm(-eta * steps * h)  # noqa: B023
            else:
                transport = np.linalg.matrix_power(np.eye(len(h)) - eta * h, steps)  # noqa: B023
            return transport if kind == "transport" else np.linalg.solve(h, np.eye(len(h)) - transport)

        side = per_module(
            lambda name, v, r: ((r[:, None] * matrix_function(name, "score") * r[None, :]) @ v.T).T, u, roots
        )
        keys = (segment.averaged,) if averaged else segment.checkpoint_keys
        for key in keys:
            total += side @ resources.rows[key].T / len(keys)
        u = per_module(
            lambda name, v, r: ((matrix_function(name, "transport") * r[None, :] / r[:, None]) @ v.T).T, u, roots
        )
    return total


@pytest.mark.parametrize("form", ["exponential", "discrete"])
@pytest.mark.parametrize("preconditioned", [False, True], ids=["sgd", "adam"])
def test_source_walks_back_through_the_segments(form, preconditioned):
    resources = fake_resources(7, replace(PLAN, preconditioned=preconditioned))
    ours = engine_scores(resources, MethodConfig(name="source", form=form))
    np.testing.assert_allclose(ours, _source_reference(resources, form), rtol=1e-9)
    asked = {key for what, key in resources.asked if what == "factors"}
    assert asked == {ResourceKey.segment(0), ResourceKey.segment(1)}  # each segment's own factors
    assert {key for what, key in resources.asked if what == "preconditioner"} == ({0, 1} if preconditioned else set())


def test_fast_source_reads_each_segments_averaged_parameters():
    resources = fake_resources(8, replace(PLAN, averaged=True))
    ours = engine_scores(resources, MethodConfig(name="fast_source"))
    np.testing.assert_allclose(ours, _source_reference(resources, "exponential", averaged=True), rtol=1e-9)
    with pytest.raises(TributaryError, match="training_run.averaged: true"):
        engine_scores(fake_resources(8), MethodConfig(name="fast_source"))


def test_a_schedule_for_one_segment_is_refused_for_two():
    with pytest.raises(TributaryError, match="method.eta / method.steps describe a single segment"):
        engine_scores(fake_resources(9), MethodConfig(name="source", eta=0.1, steps=2))
