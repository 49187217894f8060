"""The exact path's query side (engine.exact.queries): each module's query gradient preconditioned in the
gradients' own precision, written over them, against an explicit Kronecker-factored inverse built here."""

from __future__ import annotations

import numpy as np

from engine.config.method import MethodConfig
from engine.curvature.factors import ModuleFactors
from engine.exact.queries import exact_queries
from engine.projection import build_projection
from engine.spectral.methods import method_from_config

SHAPES = [("attn", 6, 4), ("mlp", 5, 7)]  # (name, d_in, d_out)


def _orthogonal(size: int, generator: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(generator.standard_normal((size, size)))[0]


def _factors(generator: np.random.Generator) -> dict[str, ModuleFactors]:
    return {
        name: ModuleFactors(
            strategy="ekfac",
            lam=generator.uniform(0.1, 2.0, (d_out, d_in)),
            q_a=_orthogonal(d_in, generator),
            q_s=_orthogonal(d_out, generator),
        )
        for name, d_in, d_out in SHAPES
    }


def _explicit(grads: np.ndarray, spec, factors: dict[str, ModuleFactors], damping: float) -> np.ndarray:
    """(Q_A ⊗ Q_S) diag(1/(Λ + λ)) (Q_A ⊗ Q_S)ᵀ vec(G) as one dense matrix per module, in float64."""
    out = []
    for module in spec.modules:
        f = factors[module.name]
        assert f.q_s is not None and f.q_a is not None
        basis = np.kron(f.q_s, f.q_a)  # row-major vec(G): vec(Q_S M Q_Aᵀ) = (Q_S ⊗ Q_A) vec(M)
        inverse = basis @ np.diag(1.0 / (f.lam.ravel() + damping)) @ basis.T
        block = grads[:, module.offset : module.offset + module.width].astype(np.float64)
        out.append(block @ inverse.T)
    return np.concatenate(out, axis=1)


def test_influence_queries_equal_the_explicit_inverse_in_float64_and_float32():
    generator = np.random.default_rng(0)
    spec = build_projection(0, 0, "rademacher", [(name, d_in, d_out) for name, d_in, d_out in SHAPES])
    factors = _factors(generator)
    method = method_from_config(MethodConfig(name="if", damping=0.05))
    grads = generator.standard_normal((3, spec.total_width))
    expected = _explicit(grads, spec, factors, 0.05)
    for dtype, tolerance in ((np.float64, 1e-12), (np.float32, 1e-6)):
        given = grads.astype(dtype)
        given.flags.writeable = False  # as gradients from Ray's object store arrive: copied, not refused
        queries = exact_queries(given, spec, method, factors, None)
        ours = np.concatenate([queries.whole[m.name].reshape(3, -1) for m in spec.modules], axis=1)
        assert ours.dtype == dtype
        assert np.linalg.norm(ours - expected) <= tolerance * np.linalg.norm(expected)
        assert np.array_equal(given, grads.astype(dtype))  # a read-only input is left as it was


def test_grad_cos_queries_are_unit_over_every_module():
    generator = np.random.default_rng(1)
    spec = build_projection(0, 0, "rademacher", [(name, d_in, d_out) for name, d_in, d_out in SHAPES])
    grads = generator.standard_normal((4, spec.total_width)).astype(np.float32)
    grads[2] = 0.0  # a zero gradient stays zero, not NaN
    expected = grads.astype(np.float64)
    norms = np.linalg.norm(expected, axis=1, keepdims=True)
    expected = expected / np.where(norms > 0, norms, 1.0)
    queries = exact_queries(grads.copy(), spec, method_from_config(MethodConfig(name="grad_cos")), None, None)
    ours = np.concatenate([queries.whole[m.name].reshape(4, -1) for m in spec.modules], axis=1)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)
