"""The methods, each a spectral function F(Λ) and what it needs. The math of every method is here.

score(q, i) = Σ_m ⟨F(Λ_m) ⊙ ĝ_{q,m}, ĝ_{i,m}⟩ with ĝ = Q_Sᵀ G̃ Q_A. Scores are *not* divided by N
(as in kronfluence): for influence and Source the predicted change of the query loss when example i
is removed from the N training examples of its dataset is score / N. Positive = the example supports
the query. EK-FAC influence scores equal kronfluence's exactly (tests/spectral/test_kronfluence.py). For K-FAC,
Λ = σ αᵀ with S̃ normalised per example (kronfluence: per token), so with r = tokens/examples
Tributary's K-FAC score at damping d = (1/r) × kronfluence's at damping d/r.

A method turns query gradients into `QueryTerm`s — one transformed query batch per set of stored rows
(a checkpoint, or a segment's averaged parameters) — from a `Resources` object that hands out query
gradients, factors and stored rows. The LM store (engine/query) and in-memory models
(engine/attribution/in_memory.py) both implement `Resources`, so every method runs the same code on both.

Every method is declared in engine.config.METHODS and built here by one function registered with
`@implements(name)`; `method_from_config` looks it up.

| method | query side | needs |
|---|---|---|
| grad_dot | g_q at the final model, F = 1 | final model |
| grad_cos | g_q/‖g_q‖, rows divided by ‖g_i‖ | final model |
| if | F = 1/(λ + d) in the final model's EK-FAC basis | final model |
| datainf | (1/n) Σ_i (g_i g_iᵀ + λ_l I)⁻¹ g_q per module (Sherman-Morrison) | final model, a pass over the rows |
| trak | (ΦᵀΦ + d I)⁻¹ g_q^c per module (dense), averaged over checkpoints | final model or checkpoints/models |
| tracin | Σ_c η_c g_q^c against the rows of checkpoint c | checkpoints + learning rates |
| source | walk back through segments: score F_r, transport S = e^{−η̄KH} | checkpoints, η̄, K; Adam: optimizer state |
| fast_source | source, with rows and factors at each segment's averaged parameters | checkpoints averaged per segment |
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.config import MethodConfig, method_names, unknown_method
from engine.curvature.factors import ModuleFactors
from engine.errors import TributaryError
from engine.projection import ProjectionSpec
from engine.spectral.core import ModuleArrays, QueryTerm, apply_spectral, module_view, transform_queries
from engine.training_run.keys import ResourceKey
from engine.training_run.plan import CheckpointPlan, RunPlan, SegmentPlan

SpectralFunction = Callable[[np.ndarray], np.ndarray]


class Resources(Protocol):
    """What a method may ask for, by key: checkpoints, segments (factors averaged over the segment's
    checkpoints; for a preconditioned run, of P^{1/2} H P^{1/2}), a segment's averaged parameters."""

    spec: ProjectionSpec
    plan: RunPlan

    def query_gradients(self, key: ResourceKey) -> np.ndarray: ...

    def factors(self, key: ResourceKey) -> dict[str, ModuleFactors]: ...

    def dense_factors(self, key: ResourceKey) -> dict[str, ModuleFactors]: ...

    def training_blocks(self, key: ResourceKey) -> Iterable[np.ndarray]: ...

    def preconditioner(self, segment: int) -> ModuleArrays: ...


@dataclass(frozen=True)
class Method:
    name: str
    needs_curvature: bool
    normalise: bool  # unit-normalise both sides over all modules (Grad-Cos)
    spectral: SpectralFunction | None  # single-checkpoint F(Λ); None: F = 1, no rotation needed
    build_terms: Callable[[Resources], list[QueryTerm]] | None = None  # None: F at the final checkpoint

    def terms(self, resources: Resources) -> list[QueryTerm]:
        if self.build_terms is not None:
            return self.build_terms(resources)
        final = resources.plan.final.key
        factors = resources.factors(final) if self.spectral is not None else None
        return [QueryTerm(final, transform_queries(resources.query_gradients(final), resources.spec, self, factors))]


# ---- spectral functions --------------------------------------------------------------------------


def default_damping(lam: np.ndarray) -> float:
    """0.1 x the mean eigenvalue of the module (kronfluence's heuristic)."""
    return 0.1 * float(np.mean(lam))


def influence_function(damping: float | None) -> SpectralFunction:
    def apply(lam: np.ndarray) -> np.ndarray:
        d = default_damping(lam) if damping is None else damping
        return 1.0 / (lam + d)

    return apply


def _with_limit_at_zero(lam: np.ndarray, limit: float, positive: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    lam = np.asarray(lam, dtype=np.float64)
    out = np.full(lam.shape, limit)
    where = lam > 0
    out[where] = positive(lam[where]) / lam[where]
    return out


def source_exponential(eta: float, steps: int) -> SpectralFunction:
    """(1 − e^{−ηKλ})/λ, which tends to ηK as λ → 0 (computed with expm1, exact at λ = 0)."""
    horizon = eta * steps
    return lambda lam: _with_limit_at_zero(lam, horizon, lambda x: -np.expm1(-horizon * x))


def _discrete_power(eta: float, steps: int, lam: np.ndarray) -> np.ndarray:
    """(1 − ηλ)^K, through log1p where 1 − ηλ > 0."""
    step = eta * np.asarray(lam, dtype=np.float64)
    out = np.empty_like(step)
    stable = step < 1.0
    out[stable] = np.exp(steps * np.log1p(-step[stable]))
    out[~stable] = np.power(1.0 - step[~stable], steps)
    return out


def source_discrete(eta: float, steps: int) -> SpectralFunction:
    """(1 − (1 − ηλ)^K)/λ: exactly K gradient-descent steps of size η on the quadratic surrogate."""

    def numerator(lam: np.ndarray) -> np.ndarray:
        step = eta * lam
        out = np.empty_like(step)
        stable = step < 1.0
        out[stable] = -np.expm1(steps * np.log1p(-step[stable]))
        out[~stable] = 1.0 - np.power(1.0 - step[~stable], steps)
        return out

    return lambda lam: _with_limit_at_zero(lam, eta * steps, numerator)


def source_transport(eta: float, steps: int) -> SpectralFunction:
    """e^{−ηKλ}: how a segment transports the query side (multi-segment Source)."""
    return lambda lam: np.exp(-eta * steps * np.asarray(lam, dtype=np.float64))


def source_transport_discrete(eta: float, steps: int) -> SpectralFunction:
    """(1 − ηλ)^K: the transport of K explicit steps (the discrete form's S)."""
    return lambda lam: _discrete_power(eta, steps, lam)


SOURCE_FORMS = {
    "exponential": (source_exponential, source_transport),
    "discrete": (source_discrete, source_transport_discrete),
}


# ---- multi-checkpoint methods --------------------------------------------------------------------


def _tracin_terms(resources: Resources) -> list[QueryTerm]:
    """TracInCP: Σ_c η_c ⟨g_q^c, g_i^c⟩ (η_c the effective learning rate at checkpoint c)."""
    plan = resources.plan
    return [
        QueryTerm(checkpoint.key, tracin_rate(plan, checkpoint) * resources.query_gradients(checkpoint.key))
        for checkpoint in plan.checkpoints
    ]


def tracin_rate(plan: RunPlan, checkpoint: CheckpointPlan) -> float:
    """TracInCP's η_c at `checkpoint` (also engine.exact's per-checkpoint weight)."""
    eta = checkpoint.learning_rate
    if eta is None:
        if plan.multi:
            raise TributaryError(
                f"method tracin needs the learning rate at checkpoint {checkpoint.name} ({checkpoint.path}); "
                "give training_run.learning_rate or the checkpoint's learning_rate"
            )
        eta = 1.0  # the final model alone: TracIn-last, i.e. Grad-Dot
    return eta


def _trak_terms(damping: float | None) -> Callable[[Resources], list[QueryTerm]]:
    """TRAK-style: per module (ΦᵀΦ + d I)⁻¹ g_q with Φ the stored (projected) training gradients at
    checkpoint c (dense eigendecomposition, d default 0.1 × mean eigenvalue); the ensemble over
    checkpoints (or independently trained models listed as checkpoints) averages their scores."""
    inverse = influence_function(damping)

    def build(resources: Resources) -> list[QueryTerm]:
        checkpoints = resources.plan.checkpoints
        return [
            QueryTerm(
                c.key,
                apply_spectral(
                    resources.query_gradients(c.key), resources.spec, resources.dense_factors(c.key), inverse
                )
                / len(checkpoints),
            )
            for c in checkpoints
        ]

    return build


def datainf_damping(blocks: Iterable[np.ndarray], spec: ProjectionSpec) -> dict[str, float]:
    """λ_l = 0.1 · mean_i ‖g_il‖² / k_l per module (FiMO's DataInf setting)."""
    sums = {m.name: 0.0 for m in spec.modules}
    count = 0
    for block in blocks:
        block = np.asarray(block, dtype=np.float64)
        count += len(block)
        for m in spec.modules:
            sums[m.name] += float(np.sum(block[:, m.offset : m.offset + m.width] ** 2))
    if count == 0:
        raise ValueError("DataInf needs training rows")
    return {m.name: 0.1 * sums[m.name] / count / m.width for m in spec.modules}


def datainf_transform(
    query_rows: np.ndarray, blocks: Callable[[], Iterable[np.ndarray]], spec: ProjectionSpec, damping: float | None
) -> np.ndarray:
    """DataInf's query side: per module l, (1/n) Σ_i (g_il g_ilᵀ + λ_l I)⁻¹ v_l
    = (1/λ_l) [v_l − (1/n) Σ_i g_il (g_ilᵀ v_l) / (λ_l + ‖g_il‖²)], the average of rank-one inverses
    in place of the inverse of the average. `blocks()` streams the training rows (once more when the
    damping is the default)."""
    query_rows = np.asarray(query_rows, dtype=np.float64)
    lambdas = datainf_damping(blocks(), spec) if damping is None else {m.name: float(damping) for m in spec.modules}
    sums = {m.name: np.zeros((len(query_rows), m.width)) for m in spec.modules}
    count = 0
    for block in blocks():
        block = np.asarray(block, dtype=np.float64)
        count += len(block)
        for m in spec.modules:
            g = block[:, m.offset : m.offset + m.width]
            v = query_rows[:, m.offset : m.offset + m.width]
            weights = (v @ g.T) / (lambdas[m.name] + np.sum(g**2, axis=1))[None, :]
            sums[m.name] += weights @ g
    out = np.empty_like(query_rows)
    for m in spec.modules:
        v = query_rows[:, m.offset : m.offset + m.width]
        out[:, m.offset : m.offset + m.width] = (v - sums[m.name] / count) / lambdas[m.name]
    return out


def _datainf_terms(damping: float | None) -> Callable[[Resources], list[QueryTerm]]:
    def build(resources: Resources) -> list[QueryTerm]:
        final = resources.plan.final.key
        transformed = datainf_transform(
            resources.query_gradients(final), lambda: resources.training_blocks(final), resources.spec, damping
        )
        return [QueryTerm(final, transformed)]

    return build


def _segment_schedule(segment: SegmentPlan, plan: RunPlan, config: MethodConfig) -> tuple[float, int]:
    eta, steps = segment.eta, segment.steps
    if config.eta is not None or config.steps is not None:
        if len(plan.segments) > 1:
            raise TributaryError(
                "method.eta / method.steps describe a single segment, but the training run has "
                f"{len(plan.segments)} segments; remove them (each segment's η̄ and K come from training_run)"
            )
        eta = config.eta if config.eta is not None else eta
        steps = config.steps if config.steps is not None else steps
    if eta is None or steps is None:
        raise TributaryError(
            f"method {config.name} needs the mean learning rate and step count of segment {segment.index}; "
            "give method.eta and method.steps, or describe the run in training_run (learning rates, steps)"
        )
    return eta, steps


def _source_terms(config: MethodConfig, averaged: bool) -> Callable[[Resources], list[QueryTerm]]:
    """Source (Bae et al. eq. 22-24), with every factor applied to the query side:
    u_L = ∇f(z_q, θ^s); for ℓ = L..1: score against segment ℓ's rows with F_r(H̄_ℓ) u_ℓ, where
    F_r = (1 − e^{−η̄Kλ})/λ and the rows are averaged over the segment's checkpoints (Fast-Source: taken
    at its averaged parameters); then u_{ℓ−1} = S̄_ℓᵀ u_ℓ with S̄ = e^{−η̄K H̄}.
    Adam (P diagonal): H → P H; with M = P^{1/2} H P^{1/2} (the segment's factors are M's),
    F_r side = P^{1/2} F_r(M) P^{1/2} u and S̄ᵀ u = P^{−1/2} e^{−η̄K M} P^{1/2} u."""
    score_function, transport = SOURCE_FORMS[config.form]

    def build(resources: Resources) -> list[QueryTerm]:
        plan, spec = resources.plan, resources.spec
        if averaged and not plan.averaged:
            raise TributaryError(
                "method fast_source needs gradients at each segment's averaged parameters; index with "
                "training_run.averaged: true"
            )
        u = resources.query_gradients(plan.final.key)
        terms = []
        for segment in reversed(plan.segments):
            eta, steps = _segment_schedule(segment, plan, config)
            factors = resources.factors(segment.averaged if averaged else segment.key)
            root = inverse_root = None
            if plan.preconditioned:
                preconditioner = resources.preconditioner(segment.index)
                root = {name: np.sqrt(p) for name, p in preconditioner.items()}
                inverse_root = {name: 1.0 / r for name, r in root.items()}
            side = apply_spectral(u, spec, factors, score_function(eta, steps), root, root)
            keys = (segment.averaged,) if averaged else segment.checkpoint_keys
            terms.extend(QueryTerm(key, side / len(keys)) for key in keys)
            if segment.index != plan.segments[0].index:
                u = apply_spectral(u, spec, factors, transport(eta, steps), root, inverse_root)
        return terms

    return build


# ---- the implementations, one per method declared in engine.config.METHODS ----------------------------

MethodBuilder = Callable[[MethodConfig], Method]
_IMPLEMENTATIONS: dict[str, MethodBuilder] = {}


def implements(*names: str) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register the function that builds the methods named from their config. A name must be declared in
    engine.config.METHODS first (the schema, CLI, service and docs read that list), and only once here."""

    def register(builder: MethodBuilder) -> MethodBuilder:
        for name in names:
            if name not in method_names():
                raise ValueError(f"method {name!r} is not declared; add a MethodSpec to engine.config.METHODS")
            if name in _IMPLEMENTATIONS:
                raise ValueError(f"method {name!r} is implemented twice")
            _IMPLEMENTATIONS[name] = builder
        return builder

    return register


def implemented_methods() -> tuple[str, ...]:
    return tuple(_IMPLEMENTATIONS)


@implements("grad_dot")
def _grad_dot(config: MethodConfig) -> Method:
    return Method(config.name, needs_curvature=False, normalise=False, spectral=None)


@implements("grad_cos")
def _grad_cos(config: MethodConfig) -> Method:
    return Method(config.name, needs_curvature=False, normalise=True, spectral=None)


@implements("if")
def _influence(config: MethodConfig) -> Method:
    return Method(config.name, needs_curvature=True, normalise=False, spectral=influence_function(config.damping))


@implements("source", "fast_source")
def _source(config: MethodConfig) -> Method:
    spectral = None
    if config.eta is not None and config.steps is not None:
        spectral = SOURCE_FORMS[config.form][0](config.eta, config.steps)
    return Method(
        config.name,
        needs_curvature=True,
        normalise=False,
        spectral=spectral,
        build_terms=_source_terms(config, averaged=config.name == "fast_source"),
    )


@implements("tracin")
def _tracin(config: MethodConfig) -> Method:
    return Method(config.name, needs_curvature=False, normalise=False, spectral=None, build_terms=_tracin_terms)


@implements("trak")
def _trak(config: MethodConfig) -> Method:
    return Method(
        config.name, needs_curvature=False, normalise=False, spectral=None, build_terms=_trak_terms(config.damping)
    )


@implements("datainf")
def _datainf(config: MethodConfig) -> Method:
    return Method(
        config.name, needs_curvature=False, normalise=False, spectral=None, build_terms=_datainf_terms(config.damping)
    )


def method_from_config(config: MethodConfig) -> Method:
    builder = _IMPLEMENTATIONS.get(config.name)
    if builder is None:  # a config validated by MethodConfig names a declared method; one built unchecked may not
        raise ValueError(unknown_method(config.name))
    return builder(config)


__all__ = ["Method", "Resources", "QueryTerm", "implements", "method_from_config", "module_view"]
