"""Curvature-aware projections (projection.kind kfac_eigen / eigen_sketch, issue 14; grad_pca, grad_pca_whitened,
issue 30).

Independent computations: exact EK-FAC scores (projection.dim 0) for the full-width rotation; covariances and
their eigenvalues computed here with forward hooks and autograd on the model itself; orthogonality checked from
the stored matrices; a reference index for the resumed and the multi-worker stores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import parse_config
from engine.curvature.packing import unpack_covariance
from engine.errors import TributaryError
from engine.local_or_ray import run_index, run_query
from engine.projection.fitted import (
    fit_row_positions,
    fit_shapes,
    fit_shards,
    full_width,
    nystrom_eigenvectors,
    sketch_matrix,
    top_eigenvectors,
)
from engine.store import GradientStore
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl
from tests.distributed_helpers import local_ray, run_cli, store_config, store_contents, write_config
from tests.requirements import require

TRAIN = [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)] + [
    {"id": f"p{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)
]


@pytest.fixture
def train(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", TRAIN)


@pytest.fixture
def queries(tmp_path) -> Path:
    return write_jsonl(tmp_path / "queries.jsonl", [{"prompt": p, "completion": " " + c} for p, c in PROMPTS[:3]])


def _config(tmp_path: Path, model: Path, train: Path, name: str, **projection):
    raw = job_config(tmp_path, model, train, projection={"seed": 2, **projection}, curvature={"seed": 4})
    raw["store"].update(path=str(tmp_path / name), rows_per_chunk=3)
    return parse_config(raw)


def _scores(tmp_path: Path, config, queries: Path, name: str) -> np.ndarray:
    run_index(config, show_progress=False)
    run_query(config, str(queries), 3, scores_out=str(tmp_path / f"{name}.npy"))
    return np.load(tmp_path / f"{name}.npy")


@pytest.mark.parametrize("model_kind", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["kfac_eigen", "eigen_sketch", "grad_pca", "grad_pca_whitened"])
def test_full_width_fitted_projection_gives_exact_ekfac_scores(tmp_path, tiny_models, train, queries, model_kind, kind):
    """dim above every module's width: each side is a rotation, so EK-FAC inside it is exact EK-FAC."""
    model = tiny_models[model_kind]
    exact = _scores(tmp_path, _config(tmp_path, model, train, "exact.zarr", dim=0), queries, "exact")
    config = _config(tmp_path, model, train, "fitted.zarr", dim=64, kind=kind, fit_rows=5)
    fitted = _scores(tmp_path, config, queries, "fitted")
    store = GradientStore.open(config.store.path)
    assert store.manifest.stages.get("projection") and store.has_projection()
    rotated = any(not np.allclose(p_in, np.eye(*p_in.shape)) for p_in, _ in store.read_projection().values())
    assert rotated, "the full-width matrices are rotations, not the identity (else the comparison is vacuous)"
    np.testing.assert_allclose(fitted, exact, rtol=1e-8, atol=1e-8 * np.abs(exact).max())


def test_projected_fitted_scores_differ_from_exact_and_from_random(tmp_path, tiny_models, train, queries):
    """At dim 4 the kinds are real compressions: none of them reproduces exact scores or another kind's."""
    model = tiny_models["gpt2"]
    scores = {
        kind: _scores(tmp_path, _config(tmp_path, model, train, f"{kind}.zarr", dim=4, kind=kind), queries, kind)
        for kind in ("rademacher", "kfac_eigen", "eigen_sketch")
    }
    for a, b in (("rademacher", "kfac_eigen"), ("kfac_eigen", "eigen_sketch")):
        assert not np.allclose(scores[a], scores[b]), f"{a} and {b} gave the same scores"


def _tracked_inputs_and_output_grads(model_path: Path, texts: list[str], module_name: str):
    """Σ a aᵀ over every token and Σ g gᵀ of the data-label loss's output gradients (a Linear without bias), with
    a hook and autograd on the HF model directly, one row at a time (no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.data.rows import Row
    from engine.data.tokenize import tokenize_rows

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    module = dict(model.named_modules())[module_name]
    assert module.bias is None
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, output):
        seen["a"], seen["out"] = args[0], output

    handle = module.register_forward_hook(hook)
    a_sum = s_sum = None
    rows = tokenize_rows([Row(index=i, id=str(i), line=i, text=t) for i, t in enumerate(texts)], tokenizer, 32, "test")
    try:
        for row in rows:
            ids, labels = torch.tensor([row.input_ids]), torch.tensor(row.labels)
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[1:], ignore_index=-100, reduction="sum")
            (delta,) = torch.autograd.grad(loss, seen["out"])
            a, g = seen["a"][0].detach(), delta[0]
            a_sum = a.T @ a if a_sum is None else a_sum + a.T @ a
            s_sum = g.T @ g if s_sum is None else s_sum + g.T @ g
    finally:
        handle.remove()
    assert a_sum is not None and s_sum is not None
    return a_sum.numpy(), s_sum.numpy()


def test_kfac_eigen_keeps_the_top_eigenvectors_of_each_sides_covariance(tmp_path, tiny_models):
    texts = SENTENCES
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(texts)])
    raw = job_config(tmp_path, tiny_models["llama"], train, projection={"dim": 3, "kind": "kfac_eigen"})
    raw["curvature"]["fisher"] = "empirical"
    config = parse_config(raw)
    run_index(config, show_progress=False)
    store = GradientStore.open(config.store.path)
    matrices = store.read_projection()
    name = "model.layers.0.mlp.down_proj"
    p_in, p_out = matrices[name]
    a_sum, s_sum = _tracked_inputs_and_output_grads(tiny_models["llama"], texts, name)
    for matrix, covariance in ((p_in, a_sum), (p_out, s_sum)):
        k = matrix.shape[1]
        np.testing.assert_allclose(matrix.T @ matrix, np.eye(k), atol=1e-10)  # orthonormal columns
        top = np.sort(np.linalg.eigvalsh(covariance))[::-1][:k]
        np.testing.assert_allclose(np.diag(matrix.T @ covariance @ matrix), top, rtol=1e-7)
        # the columns span an invariant subspace: C P = P (Pᵀ C P)
        np.testing.assert_allclose(covariance @ matrix, matrix @ (matrix.T @ covariance @ matrix), atol=1e-7 * top[0])


def _per_example_gradients(model_path: Path, texts: list[str], module_name: str) -> list[np.ndarray]:
    """The per-row gradients G_n (d_out x d_in) of the summed data-label loss with respect to the module's weight, by
    autograd on the HF model directly, one row at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.data.rows import Row
    from engine.data.tokenize import tokenize_rows

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    weight = dict(model.named_modules())[module_name].weight
    assert isinstance(weight, torch.Tensor)
    rows = tokenize_rows([Row(index=i, id=str(i), line=i, text=t) for i, t in enumerate(texts)], tokenizer, 32, "test")
    grads = []
    for row in rows:
        ids, labels = torch.tensor([row.input_ids]), torch.tensor(row.labels)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[1:], ignore_index=-100, reduction="sum")
        (grad,) = torch.autograd.grad(loss, weight)
        grads.append(grad.numpy())
    return grads


def _per_example_gradient_grams(model_path: Path, texts: list[str], module_name: str):
    """Σ_n G_nᵀ G_n and Σ_n G_n G_nᵀ of `_per_example_gradients`."""
    grads = _per_example_gradients(model_path, texts, module_name)
    return np.sum([g.T @ g for g in grads], axis=0), np.sum([g @ g.T for g in grads], axis=0)


def test_grad_pca_keeps_the_top_eigenvectors_of_the_rows_own_gradient_grams(tmp_path, tiny_models):
    """In-sample: each side spans the top eigenvectors of Σ_n G_nᵀ G_n (in) and Σ_n G_n G_nᵀ (out) of the training
    rows' gradients, not of K-FAC's token covariances (which the same check against kfac_eigen's matrices fails);
    with fit: sketch, the Nyström eigenvectors of those Grams."""
    texts = SENTENCES
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(texts)])
    matrices, specs = {}, {}
    for kind, fit in (("grad_pca", "exact"), ("grad_pca", "sketch"), ("kfac_eigen", "exact")):
        raw = job_config(tmp_path, tiny_models["llama"], train, projection={"dim": 3, "kind": kind, "fit": fit})
        raw["curvature"]["fisher"] = "empirical"
        raw["store"]["path"] = str(tmp_path / f"{kind}-{fit}.zarr")
        config = parse_config(raw)
        run_index(config, show_progress=False)
        store = GradientStore.open(config.store.path)
        matrices[kind, fit], specs[kind, fit] = store.read_projection(), store.manifest.projection
    name = "model.layers.0.mlp.down_proj"
    in_gram, out_gram = _per_example_gradient_grams(tiny_models["llama"], texts, name)
    module = next(m for m in specs["grad_pca", "sketch"].modules if m.name == name)
    omega = sketch_matrix(specs["grad_pca", "sketch"], module, "in")
    assert omega is not None and sketch_matrix(specs["grad_pca", "sketch"], module, "out") is None
    sketched_in, sketched_out = matrices["grad_pca", "sketch"][name]
    reference = top_eigenvectors(_nystrom_by_pseudo_inverse(in_gram, omega), 3)
    np.testing.assert_allclose(sketched_in @ sketched_in.T, reference @ reference.T, atol=1e-5)
    exact_out = matrices["grad_pca", "exact"][name][1]
    np.testing.assert_allclose(sketched_out @ sketched_out.T, exact_out @ exact_out.T, atol=1e-8)
    for side, gram in enumerate((in_gram, out_gram)):
        matrix = matrices["grad_pca", "exact"][name][side]
        k = matrix.shape[1]
        values = np.sort(np.linalg.eigvalsh(gram))[::-1]
        assert values[k - 1] > 1.01 * values[k], "a gap after the k-th eigenvalue (else the subspace is not unique)"
        np.testing.assert_allclose(matrix.T @ matrix, np.eye(k), atol=1e-8)
        # the columns span the top-k invariant subspace: G P = P (Pᵀ G P), with the top-k eigenvalues
        np.testing.assert_allclose(gram @ matrix, matrix @ (matrix.T @ gram @ matrix), atol=1e-5 * values[0])
        np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(matrix.T @ gram @ matrix))[::-1], values[:k], rtol=1e-5)
        other = matrices["kfac_eigen", "exact"][name][side]
        assert not np.allclose(gram @ other, other @ (other.T @ gram @ other), atol=1e-5 * values[0])


def _damped_inverse_root_by_sqrtm(covariance: np.ndarray) -> np.ndarray:
    """(C + 0.1 mean-eigenvalue I)^{-1/2} by scipy's matrix square root (Schur) and an explicit inverse."""
    linalg = require("scipy.linalg")
    d = covariance.shape[0]
    damped = covariance + 0.1 * np.trace(covariance) / d * np.eye(d)
    return np.linalg.inv(np.real(linalg.sqrtm(damped)))


def test_grad_pca_whitened_keeps_the_principal_subspace_of_the_whitened_gradients(tmp_path, tiny_models):
    """Σ G̃ᵀG̃ and Σ G̃G̃ᵀ of G̃_n = S_λ^{-1/2} G_n A_λ^{-1/2} (G_n by autograd per row; A, S by hooks; the inverse roots
    by scipy's sqrtm) are the sums the second fit sweep wrote, and each stored side is an orthonormal basis of
    span(C_λ^{-1/2} U), U the whitened Gram's top-k eigenvectors, which grad_pca's raw-Gram basis is not."""
    texts = SENTENCES
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(texts)])
    stores = {}
    for kind in ("grad_pca_whitened", "grad_pca"):
        raw = job_config(tmp_path, tiny_models["llama"], train, projection={"dim": 3, "kind": kind})
        raw["curvature"]["fisher"] = "empirical"
        raw["store"]["path"] = str(tmp_path / f"{kind}.zarr")
        config = parse_config(raw)
        run_index(config, show_progress=False)
        stores[kind] = GradientStore.open(config.store.path)
    store = stores["grad_pca_whitened"]
    spec = store.manifest.projection
    name = "model.layers.0.mlp.down_proj"
    a_sum, s_sum = _tracked_inputs_and_output_grads(tiny_models["llama"], texts, name)
    a_root, s_root = _damped_inverse_root_by_sqrtm(a_sum), _damped_inverse_root_by_sqrtm(s_sum)
    whitened = [s_root @ g @ a_root for g in _per_example_gradients(tiny_models["llama"], texts, name)]
    in_gram, out_gram = np.sum([g.T @ g for g in whitened], axis=0), np.sum([g @ g.T for g in whitened], axis=0)
    fitted = fit_shards(store.shards(), store.rows, None)
    vector, counts = store.summed_partials("projection_gram", fitted)
    grams = unpack_covariance(vector, counts, full_width(spec), fit_shapes(spec))
    np.testing.assert_allclose(grams[name].a_sum, in_gram, rtol=1e-8, atol=1e-10 * np.abs(in_gram).max())
    np.testing.assert_allclose(grams[name].s_sum, out_gram, rtol=1e-8, atol=1e-10 * np.abs(out_gram).max())
    for side, (gram, root) in enumerate(((in_gram, a_root), (out_gram, s_root))):
        matrix = store.read_projection()[name][side]
        k = matrix.shape[1]
        values, vectors = np.linalg.eigh(gram)
        assert values[-k] > 1.01 * values[-k - 1], "a gap after the k-th eigenvalue (else the subspace is not unique)"
        np.testing.assert_allclose(matrix.T @ matrix, np.eye(k), atol=1e-8)
        span, _ = np.linalg.qr(root @ vectors[:, -k:])
        np.testing.assert_allclose(matrix @ matrix.T, span @ span.T, atol=1e-8)
        raw = stores["grad_pca"].read_projection()[name][side]
        assert not np.allclose(raw @ raw.T, span @ span.T, atol=1e-2), "whitening changed nothing"


def _nystrom_by_pseudo_inverse(covariance: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """The textbook Nyström approximation C Ω (Ωᵀ C Ω)⁺ Ωᵀ C, formed densely."""
    y = covariance @ omega
    return y @ np.linalg.pinv(omega.T @ y) @ y.T


def test_nystrom_eigenvectors_are_exact_for_a_low_rank_covariance_and_follow_the_dense_formula():
    generator = np.random.default_rng(5)
    d, width, count = 40, 12, 4
    omega, _ = np.linalg.qr(generator.standard_normal((d, width)))
    basis, _ = np.linalg.qr(generator.standard_normal((d, d)))
    low_rank = basis[:, :9] @ np.diag(np.geomspace(10.0, 0.5, 9)) @ basis[:, :9].T  # rank 9 < width
    np.testing.assert_allclose(
        nystrom_eigenvectors(low_rank @ omega, omega, count), top_eigenvectors(low_rank, count), atol=1e-8
    )
    full_rank = basis @ np.diag(np.geomspace(100.0, 1e-3, d)) @ basis.T
    found = nystrom_eigenvectors(full_rank @ omega, omega, count)
    np.testing.assert_allclose(found.T @ found, np.eye(count), atol=1e-10)
    reference = top_eigenvectors(_nystrom_by_pseudo_inverse(full_rank, omega), count)
    np.testing.assert_allclose(found @ found.T, reference @ reference.T, atol=1e-6)


def test_a_sketched_fit_stores_the_nystrom_eigenvectors_of_each_sides_covariance(tmp_path, tiny_models):
    """projection.fit: sketch: the stored matrices are the Nyström eigenvectors of the covariances computed here with
    hooks and autograd, from partial sums of d x l instead of d x d."""
    texts = SENTENCES
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(texts)])
    projection = {"dim": 2, "kind": "kfac_eigen", "fit": "sketch"}
    raw = job_config(tmp_path, tiny_models["llama"], train, projection=projection)
    raw["curvature"]["fisher"] = "empirical"
    config = parse_config(raw)
    run_index(config, show_progress=False)
    store = GradientStore.open(config.store.path)
    spec = store.manifest.projection
    assert spec.fit == "sketch"
    shapes = fit_shapes(spec)
    partials, _ = store.read_partials("projection_covariance")
    assert partials.shape[1] == sum(a[0] * a[1] + s[0] * s[1] for a, s in shapes)
    assert partials.shape[1] < sum(m.d_in**2 + m.d_out**2 for m in spec.modules)
    name = "model.layers.0.mlp.down_proj"
    module = next(m for m in spec.modules if m.name == name)
    p_in, p_out = store.read_projection()[name]
    a_sum, s_sum = _tracked_inputs_and_output_grads(tiny_models["llama"], texts, name)
    omega = sketch_matrix(spec, module, "in")
    assert omega is not None and omega.shape == (module.d_in, 8), "the 16-wide input side is sketched at width 8"
    assert sketch_matrix(spec, module, "out") is None, "the 8-wide output side is not narrower sketched: exact"
    np.testing.assert_allclose(omega.T @ omega, np.eye(8), atol=1e-12)
    reference = top_eigenvectors(_nystrom_by_pseudo_inverse(a_sum, omega), 2)
    np.testing.assert_allclose(p_in @ p_in.T, reference @ reference.T, atol=1e-6)
    np.testing.assert_allclose(p_out, top_eigenvectors(s_sum, 2), atol=1e-6)


def test_eigen_sketch_is_orthonormal_top_directions_plus_an_orthogonal_scaled_sketch(tmp_path, tiny_models, train):
    config = _config(tmp_path, tiny_models["gpt2"], train, "sketch.zarr", dim=6, kind="eigen_sketch", top=2)
    run_index(config, show_progress=False)
    store = GradientStore.open(config.store.path)
    checked = 0
    for module in store.modules:
        for matrix, d, k in zip(
            store.read_projection()[module.name], (module.d_in, module.d_out), (module.k_in, module.k_out), strict=True
        ):
            top = min(2, k)
            eigen, sketch = matrix[:, :top], matrix[:, top:]
            np.testing.assert_allclose(eigen.T @ eigen, np.eye(top), atol=1e-10)
            np.testing.assert_allclose(eigen.T @ sketch, 0, atol=1e-10)
            if k > top:
                checked += 1
                np.testing.assert_allclose(
                    sketch.T @ sketch, np.eye(k - top) * (d - top) / (k - top), rtol=1e-10, atol=1e-10
                )
    assert checked, "no side had a sketch"


def test_fit_rows_are_every_stride_th_row_whatever_the_shards():
    for rows, fit_rows in ((10, None), (10, 3), (11, 4), (7, 20)):
        stride = 1 if fit_rows is None or fit_rows >= rows else -(-rows // fit_rows)
        expected = list(range(0, rows, stride))
        for size in (1, 3, 4):
            shards = [(start, min(start + size, rows)) for start in range(0, rows, size)]
            found = [start + p for start, stop in shards for p in fit_row_positions(rows, fit_rows, start, stop)]
            assert found == expected, (rows, fit_rows, size)


def test_the_matrices_are_fitted_once_by_the_driver(tmp_path, tiny_models, train, monkeypatch):
    import engine.indexing.single_store as driver

    calls = []
    fit = driver.fitted_matrices
    monkeypatch.setattr(driver, "fitted_matrices", lambda *a, **k: calls.append(1) or fit(*a, **k))
    config = _config(tmp_path, tiny_models["gpt2"], train, "once.zarr", dim=4, kind="kfac_eigen")
    run_index(config, show_progress=False)
    assert len(calls) == 1
    manifest = GradientStore.open(config.store.path).manifest
    assert sorted(manifest.shards["projection"]) == list(range(len(GradientStore.open(config.store.path).shards())))


def test_a_query_with_another_kind_or_fit_is_refused_and_a_changed_matrix_too(tmp_path, tiny_models, train, queries):
    config = _config(tmp_path, tiny_models["gpt2"], train, "store.zarr", dim=4, kind="eigen_sketch", top=1)
    run_index(config, show_progress=False)
    for other in (
        {"kind": "kfac_eigen"},
        {"kind": "eigen_sketch", "top": 2},
        {"kind": "eigen_sketch", "top": 1, "fit_rows": 3},
        {"kind": "eigen_sketch", "top": 1, "fit": "sketch"},
    ):
        wrong = _config(tmp_path, tiny_models["gpt2"], train, "store.zarr", dim=4, **other)
        with pytest.raises(TributaryError, match="projection"):
            run_query(wrong, str(queries), 3)
    import zarr

    group = zarr.open_group(config.store.path, mode="r+")
    array = group["projection_in"]
    assert isinstance(array, zarr.Array)
    values = np.asarray(array[...])
    values[0] += 1e-3
    array[...] = values
    with pytest.raises(TributaryError, match="projection_in .*checksum"):
        run_query(config, str(queries), 3)


@pytest.mark.parametrize(
    ("projection", "extra", "message"),
    [
        ({"dim": 4, "top": 2}, {}, "kind kfac_eigen or eigen_sketch"),
        ({"dim": 4, "fit": "sketch"}, {}, "kind kfac_eigen or eigen_sketch"),
        ({"dim": 4, "kind": "kfac_eigen", "fit": "nystrom"}, {}, "fit"),
        ({"dim": 4, "kind": "kfac_eigen", "top": 2}, {}, "top is for kind eigen_sketch"),
        ({"dim": 4, "kind": "eigen_sketch", "top": 4}, {}, "top must be below dim"),
        ({"dim": 4, "kind": "kfac_eigen", "fit_rows": 0}, {}, "fit_rows"),
        ({"dim": 4, "kind": "kfac_eigen"}, {"placement": {"kind": "zero3"}, "cluster": {"address": "local"}}, "zero3"),
    ],
)
def test_bad_fitted_projection_settings_are_refused_naming_them(
    tmp_path, tiny_models, train, projection, extra, message
):
    raw = job_config(tmp_path, tiny_models["gpt2"], train, projection=projection)
    raw.update(extra)
    with pytest.raises(TributaryError, match=message):
        parse_config(raw)


@pytest.mark.heavy  # a CLI process killed and resumed / a Ray cluster: ~30 s each on 2 cores
@pytest.mark.parametrize(
    ("kind", "stage"),
    [
        ({"kind": "eigen_sketch"}, "projection"),
        ({"kind": "grad_pca"}, "projection"),
        ({"kind": "grad_pca_whitened"}, "projection"),
        ({"kind": "grad_pca_whitened"}, "projection_gram"),  # killed in its second sweep, the whitened Grams
    ],
    ids=lambda value: value["kind"] if isinstance(value, dict) else value,
)
def test_a_run_killed_during_the_fit_resumes_it_and_gives_the_same_store(tmp_path, tiny_models, train, kind, stage):
    single_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    projection = {"dim": 4, "seed": 3, "fit_rows": 9, **kind}
    path = str(tmp_path / "store.zarr")
    config = write_config(tmp_path / "job.yaml", store_config(tiny_models["gpt2"], train, path, projection=projection))
    killed = run_cli(
        "index", str(config), "--no-progress", env={"TRIBUTARY_CHAOS": f"driver:{stage}:1", **single_thread}
    )
    assert killed.returncode == -9, killed.stderr
    manifest = GradientStore.open(path).manifest
    assert not manifest.stages.get("projection") and len(manifest.shards[stage]) == 1
    assert not manifest.shards.get("gradients")
    resumed = run_cli("index", str(config), "--no-progress", env=single_thread)
    assert resumed.returncode == 0, resumed.stderr
    store = GradientStore.open(path)
    computed = store.manifest.runs[1].computed
    assert manifest.runs[0].computed[stage][0] not in computed[stage], "a committed fit shard is redone"
    if stage == "projection_gram":
        assert not computed.get("projection"), "the first sweep, finished before the kill, is redone"
    reference_path = str(tmp_path / "reference.zarr")
    reference = write_config(
        tmp_path / "reference.yaml", store_config(tiny_models["gpt2"], train, reference_path, projection=projection)
    )
    assert run_cli("index", str(reference), "--no-progress", env=single_thread).returncode == 0
    _assert_same(store_contents(path), store_contents(reference_path))
    for ours, theirs in zip(
        store.read_projection().values(), GradientStore.open(reference_path).read_projection().values(), strict=True
    ):
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def _assert_same(ours: dict, theirs: dict) -> None:
    assert np.array_equal(ours["grads"], theirs["grads"])
    for name, fields in theirs["factors"].items():
        for field, value in fields.items():
            assert np.array_equal(ours["factors"][name][field], value), f"{name}.{field}"


@pytest.mark.heavy  # a CLI process killed and resumed / a Ray cluster: ~30 s each on 2 cores
@pytest.mark.requires_ray
@pytest.mark.parametrize("kind", ["kfac_eigen", "grad_pca", "grad_pca_whitened"])
def test_one_and_two_ray_workers_fit_the_same_matrices_and_rows(tmp_path, tiny_models, train, kind):
    with local_ray():
        stores = {}
        for workers in (1, 2):
            path = str(tmp_path / f"store-{workers}.zarr")
            raw = store_config(
                tiny_models["gpt2"],
                train,
                path,
                cluster={"address": "local", "workers": workers},
                projection={"dim": 4, "seed": 3, "kind": kind},
            )
            run_index(parse_config(raw), show_progress=False)
            stores[workers] = GradientStore.open(path)
            fit_pids = {entry.pid for entry in stores[workers].manifest.shards["projection"].values()}
            assert len(fit_pids) == workers, "the fit shards are spread over the workers"
    _assert_same(store_contents(stores[1].path), store_contents(stores[2].path))
    for ours, theirs in zip(stores[1].read_projection().values(), stores[2].read_projection().values(), strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_fitting_pass_products_keep_float32_and_sum_in_float64():
    """The fitting pass's Gram products run in a float32 model's own dtype (half the CPU time) and are summed in
    float64; float64 inputs stay float64 throughout, and half-precision ones are promoted to float32."""
    from engine.curvature.statistics import _gram

    generator = torch.Generator().manual_seed(0)
    exact = torch.randn(3, 40, 24, dtype=torch.float64, generator=generator)
    flat = exact.reshape(-1, 24).numpy()
    reference = flat.T @ flat
    assert np.array_equal(_gram(exact, upcast=False), _gram(exact, upcast=True))
    single = _gram(exact.float(), upcast=False)
    assert single.dtype == np.float64
    np.testing.assert_allclose(single, reference, rtol=1e-5, atol=1e-4)
    half = _gram(exact.bfloat16(), upcast=False)
    rounded = exact.bfloat16().double().reshape(-1, 24).numpy()
    np.testing.assert_allclose(half, rounded.T @ rounded, rtol=1e-5, atol=1e-4)
