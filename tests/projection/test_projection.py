"""Random projections: reproducible across processes, unbiased for inner products, right scale, and
the projected gradient formed from projected activations/output-gradients equals P_outᵀ G P_in.

Every check compares against an independent computation: a second Python process, the exact inner
product ⟨G1, G2⟩, the identity matrix, or the exact (dim 0) gradient projected here by hand.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.gradients.context import prepare_index_job
from engine.gradients.passes import gradient_pass
from engine.projection import build_projection, projection_matrix

REPO = Path(__file__).resolve().parents[2]

# (seed, module, side, rows, cols) — several shapes, including a wide one and a one-column one.
MATRIX_CASES = [
    (0, "transformer.h.0.attn.c_attn", "in", 9, 4),
    (0, "transformer.h.0.attn.c_attn", "out", 24, 4),
    (7, "model.layers.1.mlp.down_proj", "in", 16, 8),
    (123456789, "a.b", "out", 300, 17),
    (2**40 + 3, "lora_A", "in", 50, 1),
]

_HASH_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[1]))
from engine.projection import build_projection, projection_matrix
cases = json.loads(sys.argv[2])
def digest(array):
    array = np.ascontiguousarray(array)
    return hashlib.sha256(str((array.shape, array.dtype.str)).encode() + array.tobytes()).hexdigest()
out = {}
for kind in ("rademacher", "gaussian"):
    for seed, module, side, rows, cols in cases:
        out[f"{kind}/{seed}/{module}/{side}"] = digest(projection_matrix(seed, module, side, rows, cols, kind))
    spec = build_projection(5, 11, kind, [("m.one", 13, 9), ("m.two", 4, 30)])
    for module in spec.modules:
        for side in ("in", "out"):
            for dtype in (torch.float64, torch.float32):
                matrix = spec.side_matrix(module, side, dtype)
                key = f"{kind}/spec/{module.name}/{side}/{dtype}"
                out[key] = None if matrix is None else digest(matrix.numpy())
print(json.dumps({"threads": torch.get_num_threads(), "hashes": out}))
"""


def _hashes_in_subprocess(threads: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _HASH_SCRIPT, str(threads), json.dumps(MATRIX_CASES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["threads"] == threads
    return payload["hashes"]


def test_matrices_bit_identical_across_processes_and_thread_counts():
    """Two fresh processes (torch 1 thread vs 2 threads) build bit-identical matrices, both kinds.

    Also checks the matrices differ between modules, sides and seeds (the key is really used).
    """
    one, two = _hashes_in_subprocess(1), _hashes_in_subprocess(2)
    assert one == two
    for kind in ("rademacher", "gaussian"):
        assert any(key.startswith(kind) for key in one)
        # spec matrices: m.one is 13x9 -> both sides projected; m.two has d_in=4 <= dim -> identity input
        assert one[f"{kind}/spec/m.one/in/torch.float64"] is not None
        assert one[f"{kind}/spec/m.two/in/torch.float64"] is None
        assert one[f"{kind}/spec/m.two/out/torch.float32"] is not None
    # the same digests in this (third) process, which has its own thread settings
    for kind in ("rademacher", "gaussian"):
        for seed, module, side, rows, cols in MATRIX_CASES:
            array = np.ascontiguousarray(projection_matrix(seed, module, side, rows, cols, kind))
            digest = hashlib.sha256(str((array.shape, array.dtype.str)).encode() + array.tobytes()).hexdigest()
            assert one[f"{kind}/{seed}/{module}/{side}"] == digest
    # keyed by seed, module and side: any change gives a different matrix
    base = projection_matrix(0, "m", "in", 8, 4, "gaussian")
    for other in (
        projection_matrix(1, "m", "in", 8, 4, "gaussian"),
        projection_matrix(0, "n", "in", 8, 4, "gaussian"),
        projection_matrix(0, "m", "out", 8, 4, "gaussian"),
    ):
        assert not np.array_equal(base, other)


SEEDS = 300


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projected_inner_product_is_unbiased(kind):
    """E⟨P_outᵀ G1 P_in, P_outᵀ G2 P_in⟩ = ⟨G1, G2⟩ over the projection seed.

    For each of 300 seeds s, the spec built with seed s gives one sample X_s of the projected inner
    product (d_out=7, d_in=10 projected to k=3 on both sides). The tolerance is statistical: the mean of
    the X_s must lie within 4 standard errors (std(X_s)/sqrt(300)) of the exact ⟨G1, G2⟩; for a
    Gaussian sample mean a 4-SE miss has probability 6e-5. The standard error itself must be < 5% of the
    truth (measured: 3.3% Rademacher, 4.6% Gaussian), so the check has power: any bias above 20% of
    the truth (e.g. one side's variance off by 20%, or scaling by 1/sqrt(d) instead of 1/sqrt(k)) fails.
    """
    generator = np.random.default_rng(5)
    d_out, d_in, k = 7, 10, 3
    g1 = generator.standard_normal((d_out, d_in))
    g2 = g1 + 0.5 * generator.standard_normal((d_out, d_in))
    truth = float(np.sum(g1 * g2))
    samples = []
    for seed in range(SEEDS):
        spec = build_projection(k, seed, kind, [("layer", d_in, d_out)])
        module = spec.modules[0]
        p_in_tensor = spec.side_matrix(module, "in", torch.float64)
        p_out_tensor = spec.side_matrix(module, "out", torch.float64)
        assert p_in_tensor is not None and p_out_tensor is not None, "k < d: both sides are projected"
        p_in, p_out = p_in_tensor.numpy(), p_out_tensor.numpy()
        assert p_in.shape == (d_in, k) and p_out.shape == (d_out, k)
        samples.append(float(np.sum((p_out.T @ g1 @ p_in) * (p_out.T @ g2 @ p_in))))
    samples = np.array(samples)
    standard_error = samples.std(ddof=1) / np.sqrt(SEEDS)
    assert standard_error < 0.05 * abs(truth)
    assert abs(samples.mean() - truth) <= 4 * standard_error, (samples.mean(), truth, standard_error)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_entries_have_variance_one_over_k(kind):
    """E[P Pᵀ] = I: entries are i.i.d. with mean 0 and variance 1/k (k = number of columns).

    Over 300 seeds, each entry of the mean of P Pᵀ (8 x 8, k=4) lies within 5 standard errors of I
    (per-entry SE from the seeds; Rademacher diagonals are exactly 1). The pooled entries have mean
    within 5 SE of 0 and variance within 5 SE of 1/k (SE of a sample variance: (1/k) sqrt(2/n)).
    """
    rows, k = 8, 4
    products, entries = [], []
    for seed in range(SEEDS):
        matrix = projection_matrix(seed, "layer", "in", rows, k, kind)
        products.append(matrix @ matrix.T)
        entries.append(matrix.ravel())
    products, entries = np.array(products), np.concatenate(entries)
    mean = products.mean(axis=0)
    standard_error = products.std(axis=0, ddof=1) / np.sqrt(SEEDS)
    assert np.all(np.abs(mean - np.eye(rows)) <= 5 * standard_error + 1e-12)
    n = entries.size
    assert abs(entries.mean()) <= 5 * np.sqrt(1.0 / k / n)
    assert abs(entries.var() - 1.0 / k) <= 5 * (1.0 / k) * np.sqrt(2.0 / n)
    if kind == "rademacher":
        assert np.array_equal(np.abs(entries), np.full(n, 1.0 / np.sqrt(k)))
        np.testing.assert_allclose(np.diagonal(products, axis1=1, axis2=2), 1.0, rtol=0, atol=1e-15)
    else:  # continuous: no two entries are equal
        assert len(np.unique(entries)) == n


def test_dim_zero_or_at_least_the_side_width_is_the_identity():
    shapes = [("a", 9, 24), ("b", 33, 8), ("c", 4, 4)]
    exact = build_projection(0, 3, "gaussian", shapes)
    for module, (name, d_in, d_out) in zip(exact.modules, shapes):
        assert (module.name, module.k_in, module.k_out) == (name, d_in, d_out)
        assert module.identity_in and module.identity_out
        assert exact.side_matrix(module, "in", torch.float64) is None
        assert exact.side_matrix(module, "out", torch.float64) is None
    assert exact.total_width == sum(d_in * d_out for _, d_in, d_out in shapes)
    # dim 9: a's input (9) and c's sides (4) stay exact, wider sides are projected to 9 columns
    spec = build_projection(9, 3, "rademacher", shapes)
    widths = [(m.k_in, m.k_out) for m in spec.modules]
    assert widths == [(9, 9), (9, 8), (4, 4)]
    assert spec.side_matrix(spec.modules[0], "in", torch.float64) is None
    a_out = spec.side_matrix(spec.modules[0], "out", torch.float64)
    b_in = spec.side_matrix(spec.modules[1], "in", torch.float64)
    assert a_out is not None and a_out.shape == (24, 9)
    assert b_in is not None and b_in.shape == (33, 9)
    assert spec.side_matrix(spec.modules[1], "out", torch.float64) is None
    offsets = [m.offset for m in spec.modules]
    assert offsets == [0, 81, 81 + 72]
    assert spec.total_width == 81 + 72 + 16


@pytest.mark.parametrize(
    "kind,data,dim,projection_kind",
    [
        ("gpt2", "text_train", 4, "rademacher"),
        ("gpt2", "prompt_train", 5, "gaussian"),
        ("llama", "text_train", 4, "gaussian"),
        ("llama", "prompt_train", 8, "rademacher"),  # d_in = 8 stays exact, d_out = 16 is projected
    ],
)
def test_projected_rows_equal_projection_of_exact_gradient(
    kind, data, dim, projection_kind, tiny_models, make_config, request
):
    """Rows captured at dim k equal P_outᵀ G P_in, with G the exact (dim 0) per-example gradient.

    The capture never forms G: it projects activations and output-gradients token by token and sums
    their outer products. Here the exact G (checked against autograd in test_capture_exact) is projected
    with the spec's own matrices; agreement to 1e-10 relative (float64) per module shows the projected
    gradient is formed correctly (bias column, sides, layout offsets).
    """
    train = request.getfixturevalue(data)
    projection = {"dim": dim, "kind": projection_kind, "seed": 17}
    projected_job = prepare_index_job(make_config(tiny_models[kind], train, projection=projection))
    exact_job = prepare_index_job(make_config(tiny_models[kind], train, projection={"dim": 0}))
    projected = gradient_pass(projected_job.context, projected_job.tokenized).grads
    exact = gradient_pass(exact_job.context, exact_job.tokenized).grads
    spec, exact_spec = projected_job.context.spec, exact_job.context.spec
    assert projected.dtype == np.float64 and projected.shape == (len(projected_job.tokenized), spec.total_width)
    assert any(m.k_in < m.d_in or m.k_out < m.d_out for m in spec.modules)
    n = len(exact)
    for module, exact_module in zip(spec.modules, exact_spec.modules):
        assert (module.name, module.d_in, module.d_out) == (exact_module.name, exact_module.d_in, exact_module.d_out)
        g = exact[:, exact_module.offset : exact_module.offset + exact_module.width].reshape(
            n, module.d_out, module.d_in
        )
        p_in = spec.side_matrix(module, "in", torch.float64)
        p_out = spec.side_matrix(module, "out", torch.float64)
        p_in = np.eye(module.d_in) if p_in is None else p_in.numpy()
        p_out = np.eye(module.d_out) if p_out is None else p_out.numpy()
        expected = p_out.T @ g @ p_in
        ours = projected[:, module.offset : module.offset + module.width].reshape(n, module.k_out, module.k_in)
        assert np.linalg.norm(expected) > 0
        assert np.linalg.norm(ours - expected) <= 1e-10 * np.linalg.norm(expected), module.name
