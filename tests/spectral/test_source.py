"""Source through the real spectral core: its two limits (Grad-Dot, influence) and its unrolled form.

Independent computations: the plain dot product of stored rows (Grad-Dot), the influence function
F(λ) = 1/(λ + 1/(ηK)), and K explicit gradient-descent steps unrolled with autograd on a quadratic
objective whose Hessian is built from the factors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import MethodConfig, parse_config
from engine.curvature.factors import ModuleFactors
from engine.gradients.context import prepare_index_job
from engine.gradients.passes import gradient_pass
from engine.local_or_ray import run_index
from engine.projection import build_projection
from engine.spectral.core import score_block, transform_queries
from engine.spectral.methods import method_from_config
from engine.store import GradientStore
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl


def _relative(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def _scores(config: MethodConfig, query_rows, train_rows, spec, factors) -> np.ndarray:
    method = method_from_config(config)
    return score_block(transform_queries(query_rows, spec, method, factors), train_rows, method)


@pytest.fixture(scope="module", params=[("gpt2", 4), ("llama", 0)], ids=["gpt2-dim4", "llama-dim0"])
def indexed(request, tiny_models, tmp_path_factory):
    """EK-FAC factors, stored training rows and query rows of a real (tiny) index."""
    kind, dim = request.param
    root = tmp_path_factory.mktemp(f"source-{kind}")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    queries = write_jsonl(
        root / "queries.jsonl",
        [{"id": f"q{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)],
    )
    raw = job_config(root, tiny_models[kind], train, projection={"dim": dim})
    store = run_index(parse_config(raw), show_progress=False)
    assert isinstance(store, GradientStore)
    query_job = prepare_index_job(parse_config(dict(raw, data=dict(raw["data"], train=str(queries)))))
    assert query_job.context.spec.fingerprint() == prepare_index_job(parse_config(raw)).context.spec.fingerprint()
    query_rows = gradient_pass(query_job.context, query_job.tokenized, with_covariance=False).grads
    factors = store.read_factors()
    lam = np.concatenate([f.lam.ravel() for f in factors.values()])
    assert np.all(lam >= 0) and all(f.rotated for f in factors.values())
    return query_job.context.spec, factors, store.read_rows(0, store.rows), query_rows, lam


def test_small_horizon_is_grad_dot(indexed):
    """As ηK → 0, Source scores / (ηK) → the plain dot product of the raw rows (Grad-Dot).

    F(λ)/(ηK) = (1 − e^{−ηKλ})/(ηKλ) = 1 − ηKλ/2 + ..., so after rotating back the relative error
    is first order in ηK: over ηK·λ_max = 1e-1 .. 1e-4 it must shrink by 10 ± 50% per decade and end
    below 1e-4. Checked for both the exponential and the discrete (K = 10 steps) forms.
    """
    spec, factors, train_rows, query_rows, lam = indexed
    grad_dot = query_rows @ train_rows.T
    assert np.allclose(
        grad_dot, _scores(MethodConfig(name="grad_dot"), query_rows, train_rows, spec, None), rtol=1e-12, atol=0
    )
    for form in ("exponential", "discrete"):
        errors = []
        for scale in (1e-1, 1e-2, 1e-3, 1e-4):
            horizon, steps = scale / lam.max(), 10
            config = MethodConfig(name="source", eta=horizon / steps, steps=steps, form=form)
            errors.append(_relative(_scores(config, query_rows, train_rows, spec, factors) / horizon, grad_dot))
        print(f"Source({form}) / ηK vs Grad-Dot, relative errors:", errors)
        ratios = np.array(errors[1:]) / np.array(errors[:-1])
        assert np.all((ratios > 0.05) & (ratios < 0.15)), (form, errors)
        assert errors[-1] < 1e-4, (form, errors)


def test_large_horizon_is_influence_with_damping_one_over_horizon(indexed):
    """As ηK → ∞, Source → the influence function with damping 1/(ηK).

    F functions, on the index's own Λ grid: with x = ηKλ, F_source/F_if − 1 = 1/x − e^{−x}(1 + 1/x),
    which lies in [0, min(x/2, 1/x)] — checked elementwise for ηK from 1e-2/λ_max to 1e3/λ_min.
    Scores through transform_queries: for ηK = 10^j / λ_min (j = 1..4, every x ≥ 10) the relative
    score error must shrink monotonically, by at least 5x per decade, to below 1e-3.
    """
    spec, factors, train_rows, query_rows, lam = indexed
    positive = lam[lam > 0]
    for horizon in np.geomspace(1e-2 / lam.max(), 1e3 / positive.min(), 25):
        source_function = method_from_config(MethodConfig(name="source", eta=horizon / 100, steps=100)).spectral
        influence_function = method_from_config(MethodConfig(name="if", damping=1.0 / horizon)).spectral
        assert source_function is not None and influence_function is not None
        source, influence = source_function(lam), influence_function(lam)
        x = horizon * lam
        excess = source / influence - 1.0
        assert np.all(excess >= -1e-12)
        assert np.all(excess <= np.minimum(x / 2, 1.0 / np.maximum(x, 1e-300)) + 1e-12)
    errors = []
    for decade in (1, 2, 3, 4):
        horizon = 10.0**decade / positive.min()
        source = _scores(
            MethodConfig(name="source", eta=horizon / 1000, steps=1000), query_rows, train_rows, spec, factors
        )
        influence = _scores(MethodConfig(name="if", damping=1.0 / horizon), query_rows, train_rows, spec, factors)
        errors.append(_relative(source, influence))
    print("Source vs IF(1/ηK), relative score errors:", errors)
    assert all(later < earlier / 5 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors


# ---- the unrolled quadratic -------------------------------------------------------------------------


def _orthogonal(generator: np.random.Generator, size: int) -> np.ndarray:
    q, r = np.linalg.qr(generator.standard_normal((size, size)))
    return q * np.sign(np.diag(r))


def _quadratic_setup():
    """Two modules: m1 (3 x 4) with an EK-FAC Λ (any non-negative grid, a zero included) in a Kronecker
    eigenbasis, m2 (5 x 2) with K-FAC Λ = σαᵀ, whose Hessian is built directly as kron(S, A).
    The whole Hessian is block-diagonal over modules, as the spectral core assumes."""
    generator = np.random.default_rng(4)
    spec = build_projection(0, 0, "rademacher", [("m1", 4, 3), ("m2", 2, 5)])
    q_s1, q_a1 = _orthogonal(generator, 3), _orthogonal(generator, 4)
    lam1 = np.array([[0.0, 1e-3, 0.02, 0.3], [1.0, 2.5, 4.0, 7.0], [9.0, 12.0, 15.0, 18.5]])
    lam1 = lam1.ravel()[generator.permutation(12)].reshape(3, 4)
    basis1 = np.kron(q_s1, q_a1)  # row-major vec: vec(Q_Sᵀ G Q_A) = basis1ᵀ vec(G)
    hessian1 = basis1 @ np.diag(lam1.ravel()) @ basis1.T
    q_s2, q_a2 = _orthogonal(generator, 5), _orthogonal(generator, 2)
    sigma, alpha = np.array([0.0, 0.5, 1.0, 2.0, 3.0]), np.array([1.5, 5.0])
    hessian2 = np.kron(q_s2 @ np.diag(sigma) @ q_s2.T, q_a2 @ np.diag(alpha) @ q_a2.T)
    factors = {
        "m1": ModuleFactors(strategy="ekfac", lam=lam1, q_a=q_a1, q_s=q_s1),
        "m2": ModuleFactors(strategy="kfac", lam=np.outer(sigma, alpha), q_a=q_a2, q_s=q_s2, alpha=alpha, sigma=sigma),
    }
    hessian = np.zeros((22, 22))
    hessian[:12, :12], hessian[12:, 12:] = hessian1, hessian2
    return spec, factors, hessian, generator


def _losses(generator: np.random.Generator, width: int, count: int):
    """Non-linear per-example losses (logistic + quartic) and a query loss, as functions of θ."""
    features = torch.from_numpy(generator.standard_normal((count + 1, width)))
    targets = torch.from_numpy(generator.choice([-1.0, 1.0], size=count + 1))

    def loss(index: int, theta: torch.Tensor) -> torch.Tensor:
        margin = targets[index] * (features[index] @ theta)
        return torch.nn.functional.softplus(-margin) + 0.1 * (features[index] @ theta) ** 4 / width

    return loss


def _unrolled_scores(
    hessian: np.ndarray, theta_star: np.ndarray, loss, count: int, eta: float, steps: int
) -> np.ndarray:
    """−d L_q(θ_K)/dε_i after K steps θ ← θ − η ∇(R(θ) + Σ_i ε_i L_i(θ)) from θ*,
    with R(θ) = ½(θ−θ*)ᵀH(θ−θ*).

    Plain autograd through the loop (create_graph). At ε = 0 the run stays at θ*, so the derivative is
    −∇L_qᵀ (I − (I − ηH)^K) H⁻¹ ∇L_i: the score Source's discrete form must give (positive = supports).
    """
    hessian_t, theta_star_t = torch.from_numpy(hessian), torch.from_numpy(theta_star)
    eps = torch.zeros(count, dtype=torch.float64, requires_grad=True)
    theta = theta_star_t.clone().requires_grad_(True)
    for _ in range(steps):
        shift = theta - theta_star_t
        objective = 0.5 * shift @ hessian_t @ shift + sum(eps[i] * loss(i, theta) for i in range(count))
        (gradient,) = torch.autograd.grad(objective, theta, create_graph=True)
        theta = theta - eta * gradient
    (derivative,) = torch.autograd.grad(loss(count, theta), eps)
    return -derivative.numpy()


def _gradients(loss, theta_star: np.ndarray, count: int) -> np.ndarray:
    theta = torch.from_numpy(theta_star).requires_grad_(True)
    return np.stack([torch.autograd.grad(loss(i, theta), theta)[0].numpy() for i in range(count + 1)])


def test_discrete_form_equals_unrolled_gradient_descent_and_exponential_converges():
    """On a quadratic objective, Source's discrete form (1 − (1 − ηλ)^K)/λ equals K unrolled GD steps.

    Hessian: block-diagonal over two modules built from their factors (see _quadratic_setup); its
    spectrum includes 0 (F = ηK) and ηλ up to 1.85 (the oscillating branch of the discrete form).
    The derivative of the query loss after K explicit steps w.r.t. each training example's weight is
    taken with autograd and compared with the real spectral core (transform_queries + score_block)
    to 1e-8 relative, for η = 0.1, 0.05, 0.025, 0.0125 at fixed ηK = 2.5. The exponential form then
    converges to the discrete one: its relative error must shrink monotonically (first order in η:
    by a factor 2 ± 40% per halving of η).
    """
    spec, factors, hessian, generator = _quadratic_setup()
    count = 6
    loss = _losses(generator, spec.total_width, count)
    theta_star = 0.3 * generator.standard_normal(spec.total_width)
    gradients = _gradients(loss, theta_star, count)
    query_rows, train_rows = gradients[count:], gradients[:count]
    errors, unrolled_errors = [], []
    for eta, steps in ((0.1, 25), (0.05, 50), (0.025, 100), (0.0125, 200)):
        unrolled = _unrolled_scores(hessian, theta_star, loss, count, eta, steps)[None, :]
        discrete = _scores(
            MethodConfig(name="source", eta=eta, steps=steps, form="discrete"), query_rows, train_rows, spec, factors
        )
        unrolled_errors.append(_relative(discrete, unrolled))
        assert unrolled_errors[-1] < 1e-8, (eta, discrete, unrolled)
        exponential = _scores(MethodConfig(name="source", eta=eta, steps=steps), query_rows, train_rows, spec, factors)
        errors.append(_relative(exponential, discrete))
    print("exponential vs discrete, relative errors:", errors, "discrete vs unrolled worst:", max(unrolled_errors))
    ratios = np.array(errors[1:]) / np.array(errors[:-1])
    assert np.all((ratios > 0.3) & (ratios < 0.7)), errors
    # and the closed form of the core agrees with the matrix function of the Hessian built here
    eta, steps = 0.05, 50
    matrix = (np.eye(22) - np.linalg.matrix_power(np.eye(22) - eta * hessian, steps)) @ np.linalg.pinv(hessian)
    null = np.abs(np.linalg.eigvalsh(hessian)) < 1e-12
    assert null.sum() == 1 + 2  # λ = 0 in m1, σ = 0 in m2 (x 2 α): there F must equal ηK
    discrete = _scores(
        MethodConfig(name="source", eta=eta, steps=steps, form="discrete"), query_rows, train_rows, spec, factors
    )
    # pinv drops the null space, where (I − (I − ηH)^K)H⁻¹ = ηK I: add it back from the eigenvectors
    values, vectors = np.linalg.eigh(hessian)
    null_part = eta * steps * vectors[:, np.abs(values) < 1e-12] @ vectors[:, np.abs(values) < 1e-12].T
    assert _relative(discrete, query_rows @ (matrix + null_part) @ train_rows.T) < 1e-8
