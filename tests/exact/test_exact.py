"""Exact streamed scores (`tributary query --exact`): full-width factors fitted beside a store, and one pass over
the training rows that scores each row from its per-token captures, with no rows at full width stored.

The reference is the dim-0 store: its rows are the full per-example gradients and its factors full-width EK-FAC
(which tests/spectral/test_kronfluence.py checks against kronfluence), scored by the store's own path.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.config import QueryOptions, parse_config
from engine.data.rows import field_names, read_rows
from engine.errors import TributaryError
from engine.exact import row_scores
from engine.exact.exact_query import require_finite_query_gradients
from engine.exact.queries import ExactQueries
from engine.exact.row_scores import QuerySide, ScoringBlock, block_scores, factored
from engine.exact.stored_factors import has_exact_factors
from engine.gradients.context import load_model_context
from engine.gradients.passes import gradient_pass
from engine.local_or_ray import run_exact, run_index, run_query
from engine.projection import build_projection
from engine.store import GradientStore
from engine.store.summary import store_summary
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import SENTENCES, job_config, write_jsonl
from tests.distributed_helpers import write_config
from tests.nonfinite_models import SKIPPED_IDS, all_rows, nan_word_model_in, rows_file, skip_config
from tests.requirements import require


@pytest.fixture(scope="module")
def nan_word_model(tmp_path_factory):
    return nan_word_model_in(tmp_path_factory.mktemp("nan_words"))


QUERIES = [
    {"id": "q0", "text": "the fox eats clams in the snow"},
    {"id": "q1", "prompt": "the owl eats", "completion": " fish at night"},
    {"id": "q2", "text": "a wolf eats honey in the cold forest"},
]


def _config(tmp_path, model_path, train, name, dtype="float64", **sections):
    raw = job_config(tmp_path, model_path, train, **sections)
    raw["model"]["dtype"] = dtype
    raw["store"] = dict(raw["store"], path=str(tmp_path / f"{name}.zarr"), dtype=dtype)
    return parse_config(raw)


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _store_scores(config, queries) -> np.ndarray:
    total = run_query(config, str(queries), k=3).total
    assert total is not None
    return total


@pytest.fixture
def queries(tmp_path):
    return write_jsonl(tmp_path / "queries.jsonl", QUERIES)


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("llama", marks=pytest.mark.heavy)])
def test_exact_from_a_projected_store_equals_the_dim0_store(kind, tiny_models, text_train, queries, tmp_path):
    """Factors fitted at full width beside a dim-4 store (covariances from pass 1, their own Λ pass) and the streamed
    pass give the dim-0 store's scores, for every exact method, in float64."""
    curvature = {"strategy": "ekfac", "fisher": "empirical"}
    reference = _config(tmp_path, tiny_models[kind], text_train, "dim0", curvature=curvature)
    projected = _config(
        tmp_path,
        tiny_models[kind],
        text_train,
        "dim4",
        curvature=curvature,
        projection={"dim": 4},
        exact={"factors": True},
    )
    run_index(reference, show_progress=False)
    store = run_index(projected, show_progress=False)
    assert isinstance(store, GradientStore) and has_exact_factors(store)
    assert store.manifest.width < reference_width(reference)
    assert "--exact" in store_summary(store)[0]["exact_factors"]  # what `tributary info` prints
    assert "exact_factors" not in store_summary(GradientStore.open(reference.store.path))[0]
    for method in ("if", "grad_dot", "grad_cos"):
        ours = run_exact(_with(projected, method), str(queries), QueryOptions(k=3)).scores
        theirs = _store_scores(_with(reference, method), queries)
        assert np.abs(theirs).max() > 0
        assert _relative(ours, theirs) <= 1e-10, method


def test_a_fitted_projection_lends_its_fitting_pass(tiny_models, text_train, queries, tmp_path):
    """kfac_eigen fitted on every row already summed the full-width covariances: no covariance pass runs again,
    and the exact scores still equal the dim-0 store's."""
    curvature = {"strategy": "ekfac", "fisher": "empirical"}
    reference = _config(tmp_path, tiny_models["gpt2"], text_train, "dim0", curvature=curvature)
    fitted = _config(
        tmp_path,
        tiny_models["gpt2"],
        text_train,
        "fitted",
        curvature=curvature,
        projection={"dim": 4, "kind": "kfac_eigen"},
        exact={"factors": True},
    )
    run_index(reference, show_progress=False)
    store = run_index(fitted, show_progress=False)
    assert isinstance(store, GradientStore)
    assert "exact_covariance" not in store.manifest.shards and store.manifest.shards["exact_lambdas"]
    ours = run_exact(fitted, str(queries), QueryOptions(k=3)).scores
    assert _relative(ours, _store_scores(reference, queries)) <= 1e-10


def reference_width(config) -> int:
    return GradientStore.open(config.store.path).manifest.width


def _with(config, method: str):
    return config.with_method(config.method.model_copy(update={"name": method}))


def test_exact_on_the_dim0_store_in_float32(tiny_models, text_train, queries, tmp_path):
    """At dim 0 the factors reuse pass 1's covariance sums; float32 scores agree to 1e-6 relative."""
    config = _config(tmp_path, tiny_models["gpt2"], text_train, "f32", dtype="float32", exact={"factors": True})
    run_index(config, show_progress=False)
    ours = run_exact(config, str(queries), QueryOptions(k=3)).scores
    theirs = _store_scores(config, queries)
    assert _relative(ours, theirs) <= 1e-6


def test_rescore(tiny_models, text_train, queries, tmp_path):
    """--rescore N (every row a candidate) equals --exact; with K < N every listed candidate carries its exact
    score, and the pass scored only the union of the store's candidates."""
    config = _config(tmp_path, tiny_models["gpt2"], text_train, "dim4", projection={"dim": 4}, exact={"factors": True})
    run_index(config, show_progress=False)
    options = QueryOptions(k=2)
    exact = run_exact(config, str(queries), options)
    every = run_exact(config, str(queries), options, rescore=8)  # every one of the 8 rows
    assert np.array_equal(every.scores, exact.scores)
    assert np.array_equal(every.result.top_indices, exact.result.top_indices)
    rescored = run_exact(config, str(queries), options, rescore=1)
    stored = run_query(config, str(queries), k=1)
    union = np.union1d(stored.top_indices.ravel(), stored.bottom_indices.ravel())
    assert np.array_equal(np.flatnonzero(rescored.exact), union)
    for q, record in enumerate(rescored.records):
        for entry in record["top_k"] + record["bottom_k"]:
            assert entry["source"] == "exact"
            # the same rows batched with other neighbours: equal to the last bits of float64's rounding
            assert entry["score"] == pytest.approx(exact.scores[q, entry["index"]], rel=1e-12)
    outside = np.setdiff1d(np.arange(8), union)
    assert stored.total is not None
    assert np.array_equal(rescored.scores[:, outside], stored.total[:, outside])  # marked store, kept as scored
    # --top-k beyond the candidates: the exactly scored rows first, then the rest in the store's order, marked
    every_row = run_exact(config, str(queries), QueryOptions(k=8), rescore=1)
    store_scores = stored.total
    for q, record in enumerate(every_row.records):
        sources = [entry["source"] for entry in record["top_k"]]
        assert sources == ["exact"] * len(union) + ["store"] * (8 - len(union))
        for entry in record["top_k"]:
            reference = exact.scores if entry["source"] == "exact" else store_scores
            assert entry["score"] == pytest.approx(reference[q, entry["index"]], rel=1e-12)
        store_part = [entry["index"] for entry in record["top_k"] if entry["source"] == "store"]
        assert store_part == sorted(store_part, key=lambda i: (-store_scores[q, i], i))


def test_bad_input(tiny_models, text_train, queries, tmp_path):
    plain = _config(tmp_path, tiny_models["gpt2"], text_train, "plain", projection={"dim": 4})
    run_index(plain, show_progress=False)
    with pytest.raises(TributaryError, match=r"no full-width factors.*exact: \{factors: true\}"):
        run_exact(plain, str(queries), QueryOptions(k=2))
    with pytest.raises(TributaryError, match="method trak has no exact streamed form"):
        run_exact(_with(plain, "trak"), str(queries), QueryOptions(k=2))
    with pytest.raises(TributaryError, match="--rescore must be positive, got 0"):
        run_exact(plain, str(queries), QueryOptions(k=2), rescore=0)
    too_high = plain.model_copy(update={"exact": plain.exact.model_copy(update={"query_rank": 1000})})
    with pytest.raises(TributaryError, match=r"exact.query_rank 1000 is above the full rank of module .* \(\d+ = "):
        run_exact(_with(too_high, "grad_dot"), str(queries), QueryOptions(k=2))
    with pytest.raises(TributaryError, match="exact.factors fits K-FAC/EK-FAC at full width"):
        run_index(
            _config(
                tmp_path,
                tiny_models["gpt2"],
                text_train,
                "diag",
                curvature={"strategy": "diagonal"},
                exact={"factors": True},
            ),
            show_progress=False,
        )


def test_factored_scores_equal_the_formed_gradient():
    """Σ_t (Uᵀδ_t)·(Vᵀa_t) over calls equals ⟨U Vᵀ, Σ_t δ_t a_tᵀ⟩ (and ‖G‖ from the token Grams), computed
    here by forming G with einsum, on shapes where the factored form is the one taken."""
    generator = torch.Generator().manual_seed(0)
    d_in, d_out, tokens, rank, count = 40, 30, 3, 2, 4
    assert factored(2 * tokens, rank, d_in, d_out)
    left = torch.randn(count, d_out, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(count, rank, d_in, generator=generator, dtype=torch.float64)
    whole = (left @ right).numpy()
    spec = build_projection(0, 0, "rademacher", [("m", d_in, d_out)])
    acts = [torch.randn(5, tokens, d_in, generator=generator, dtype=torch.float64) for _ in range(2)]
    dels = [torch.randn(5, tokens, d_out, generator=generator, dtype=torch.float64) for _ in range(2)]
    gradient = torch.stack([torch.einsum("btk,btj->bkj", d, a) for a, d in zip(acts, dels)]).sum(0)
    for normalise in (False, True):
        queries = ExactQueries(spec, normalise, {"m": whole}, {"m": (left.numpy(), right.numpy())})
        side = QuerySide.of(queries, torch.float64, torch.device("cpu"))
        ours = block_scores(side, [({"m": acts}, {"m": dels})]).numpy()
        expected = np.einsum("qkj,bkj->qb", whole, gradient.numpy())
        if normalise:
            expected = expected / np.linalg.norm(gradient.reshape(5, -1).numpy(), axis=1)[None, :]
        assert np.allclose(ours, expected, rtol=1e-12, atol=0)
    formed = QuerySide.of(ExactQueries(spec, False, {"m": whole}, {}), torch.float64, torch.device("cpu"))
    expected = np.einsum("qkj,bkj->qb", whole, gradient.numpy())
    assert np.allclose(block_scores(formed, [({"m": acts}, {"m": dels})]).numpy(), expected, rtol=1e-12, atol=0)


def test_scoring_blocks_equal_each_row_scored_alone(monkeypatch):
    """Batches scored in blocks (each module's queries met by the block's stacked gradients in one product) give
    each row's ⟨q, G_i⟩, G_i formed here row by row with einsum: blocks of one, two and all batches, batches of
    different lengths, one short enough for the factored form and the others not, with and without grad_cos's
    normalisation."""
    generator = torch.Generator().manual_seed(1)
    d_in, d_out, rank, count = 40, 30, 2, 3
    left = torch.randn(count, d_out, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(count, rank, d_in, generator=generator, dtype=torch.float64)
    whole = torch.randn(count, d_out, d_in, generator=generator, dtype=torch.float64).numpy()
    spec = build_projection(0, 0, "rademacher", [("m", d_in, d_out), ("n", d_out, d_in)])
    lengths, rows = [3, 40, 25, 40], [4, 3, 5, 2]
    assert factored(lengths[0], rank, d_in, d_out) and not factored(lengths[1], rank, d_in, d_out)
    batches = []
    for tokens, size in zip(lengths, rows):
        shapes = {"m": (d_in, d_out), "n": (d_out, d_in)}
        acts = {
            m: [torch.randn(size, tokens, i, generator=generator, dtype=torch.float64)] for m, (i, _) in shapes.items()
        }
        dels = {
            m: [torch.randn(size, tokens, o, generator=generator, dtype=torch.float64)] for m, (_, o) in shapes.items()
        }
        batches.append((acts, dels))
    queries = {"m": whole, "n": whole.transpose(0, 2, 1).copy()}
    gradients = {
        m: np.concatenate([torch.einsum("btk,btj->bkj", d[m][0], a[m][0]).numpy() for a, d in batches]) for m in queries
    }
    norms = np.sqrt(sum((gradients[m] ** 2).sum((1, 2)) for m in queries))
    for normalise in (False, True):
        exact = ExactQueries(spec, normalise, queries, {"m": (left.numpy(), right.numpy())})
        # the factored module's query is U Vᵀ: its whole form must agree for the reference to hold
        exact.whole["m"] = (left @ right).numpy()
        reference = np.einsum("qkj,bkj->qb", exact.whole["m"], gradients["m"])
        reference = reference + np.einsum("qkj,bkj->qb", queries["n"], gradients["n"])
        expected = reference / norms[None, :] if normalise else reference
        side = QuerySide.of(exact, torch.float64, torch.device("cpu"))
        # a batch's captures take 140 · 8 bytes a token and row: blocks of one batch, of three then one, of all
        for capture_bytes, blocks in ((1, rows), (200_000, [12, 2]), (2**40, [14])):
            monkeypatch.setattr(row_scores, "BLOCK_CAPTURE_BYTES", capture_bytes)
            block, parts, sizes = ScoringBlock(side), [], []
            for acts, dels in batches:
                block.add(acts, dels)
                if block.full():
                    sizes.append(block.rows)
                    parts.append(block.scores().numpy())
            if block.rows:
                sizes.append(block.rows)
                parts.append(block.scores().numpy())
            assert sizes == blocks
            assert np.allclose(np.concatenate(parts, axis=1), expected, rtol=1e-12, atol=0)


def test_non_finite_query_gradients_are_named_and_overflowing_sums_are_not():
    """Rows with NaN or inf are refused by id, as an elementwise check finds them; a float64 row of finite numbers
    whose sum overflows is not refused."""
    grads = np.ones((4, 6))
    grads[1, 2] = np.nan
    grads[3, 0] = -np.inf
    grads[2, :2] = np.finfo(np.float64).max  # finite, the sum is inf
    expected = [f'"q{i}"' for i in np.flatnonzero(~np.isfinite(grads).all(axis=1))]
    with pytest.raises(TributaryError) as raised:
        require_finite_query_gradients(grads, [f"q{i}" for i in range(4)])
    assert f"query {', '.join(expected)}: its gradient is not finite" in str(raised.value)
    require_finite_query_gradients(grads[[0, 2]], ["q0", "q2"])
    require_finite_query_gradients(np.ones((2, 3), dtype=np.float32), ["a", "b"])


def test_query_rank_truncates_each_module(tiny_models, queries, tmp_path):
    """exact.query_rank r scores with each module's preconditioned query cut to its top r singular directions:
    against the dim-0 store's rows with the truncation done here by numpy's SVD. The training rows are short
    enough in the first batch of 3 for every module to take the factored form (no per-example gradient), and
    long enough in the second for some to form it."""
    short = ["the fox eats", "owl eats mice", "a bear", *SENTENCES[:3]]
    train = write_jsonl(tmp_path / "short.jsonl", [{"id": f"s{i}", "text": t} for i, t in enumerate(short)])
    config = _config(
        tmp_path,
        tiny_models["gpt2"],
        train,
        "dim0",
        method={"name": "grad_dot"},
        exact={"factors": True, "query_rank": 1},
    )
    run_index(config, show_progress=False)
    ours = run_exact(config, str(queries), QueryOptions(k=2)).scores
    store = GradientStore.open(config.store.path)
    context = load_model_context(replace_rank(config))
    lengths = [len(row.input_ids) for row in context.tokenize(read_rows(str(train), field_names(config)), "t")]
    batches = [max(lengths[:3]), max(lengths[3:])]  # data.batch_size 3: the padded length of each batch
    paths = {factored(tokens, 1, m.k_in, m.k_out) for tokens in batches for m in store.modules}
    assert paths == {True, False}, "both ways of scoring a module are exercised"
    grads = gradient_pass(
        context, context.tokenize(read_rows(str(queries), field_names(config)), "q"), with_covariance=False
    ).grads
    rows = store.read_rows(0, store.rows)
    expected = np.zeros((len(QUERIES), store.rows))
    for m in store.modules:
        q = grads[:, m.offset : m.offset + m.width].reshape(-1, m.k_out, m.k_in)
        u, s, vt = np.linalg.svd(q)
        cut = (u[:, :, :1] * s[:, None, :1]) @ vt[:, :1, :]
        expected += cut.reshape(len(QUERIES), -1) @ rows[:, m.offset : m.offset + m.width].T
    assert _relative(ours, expected) <= 1e-10


def replace_rank(config):
    return config.model_copy(update={"exact": config.exact.model_copy(update={"query_rank": None})})


@pytest.mark.heavy  # two indexes and a query through the CLI: ~16 s
def test_cli_exact_and_its_refusals(tiny_models, text_train, queries, tmp_path):
    """`tributary query --exact` writes the results and scores; a store without full-width factors and
    --rescore 0 are each refused in one line naming the key and the fix."""
    raw = job_config(tmp_path, tiny_models["gpt2"], text_train, projection={"dim": 4}, exact={"factors": True})
    path = write_config(tmp_path / "job.yaml", raw)
    assert invoke("index", path, "--no-progress").exit_code == 0
    out, scores = tmp_path / "results.jsonl", tmp_path / "scores.npy"
    result = invoke("query", path, "--queries", queries, "--exact", "--top-k", 2, "--out", out, "--scores-out", scores)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = run_exact(parse_config(raw), str(queries), QueryOptions(k=2)).scores
    assert np.array_equal(np.load(scores), expected)
    assert [r["id"] for r in records] == ["q0", "q1", "q2"] and records[0]["top_k"][0]["source"] == "exact"
    assert_clean_failure(invoke("query", path, "--queries", queries, "--rescore", 0), "--rescore must be positive")
    plain = write_config(tmp_path / "plain.yaml", dict(raw, exact={}, store={"path": str(tmp_path / "p.zarr")}))
    assert invoke("index", plain, "--no-progress").exit_code == 0
    assert_clean_failure(invoke("query", plain, "--queries", queries, "--exact"), "exact: {factors: true}")


@pytest.mark.heavy  # an index, an ANN build, a store query and three exact passes: ~12 s
def test_rescore_takes_its_candidates_from_the_ann_index(tiny_models, text_train, queries, tmp_path):
    """With --approximate the ANN index picks the candidates: the exact pass scores exactly their union, and
    with every row a candidate the scores are --exact's."""
    require("faiss")
    from engine.ann.build import build_index

    config = _config(tmp_path, tiny_models["gpt2"], text_train, "dim4", projection={"dim": 4}, exact={"factors": True})
    run_index(config, show_progress=False)
    build_index(config.store.path, show_progress=False)
    approximate = QueryOptions(k=2, approximate=True)
    candidates = run_query(config, str(queries), 1, options=replace(approximate, k=1))
    rescored = run_exact(config, str(queries), approximate, rescore=1)
    union = np.union1d(candidates.top_indices.ravel(), candidates.bottom_indices.ravel())
    assert np.array_equal(np.flatnonzero(rescored.exact), union)
    every = run_exact(config, str(queries), approximate, rescore=8)
    assert np.array_equal(every.scores, run_exact(config, str(queries), QueryOptions(k=2)).scores)


@pytest.mark.heavy  # two indexes of the adapted model each: 10-16 s
@pytest.mark.parametrize("mode", ["adapter", "merged", "base"])
def test_exact_with_a_lora_adapter(mode, tiny_models, lora_adapters, text_train, queries, tmp_path):
    """The adapter's lora_A/lora_B modules (mode adapter), the merged model's or the base model's under the
    adapter's config (mode base): exact scores from a dim-2 store equal the dim-0 store's."""
    model = {"adapter": str(lora_adapters["llama"]), "adapter_mode": mode}
    curvature = {"strategy": "ekfac", "fisher": "empirical"}
    reference = _config(tmp_path, tiny_models["llama"], text_train, "dim0", model=model, curvature=curvature)
    projected = _config(
        tmp_path,
        tiny_models["llama"],
        text_train,
        "dim2",
        model=model,
        curvature=curvature,
        projection={"dim": 2},
        exact={"factors": True},
    )
    run_index(reference, show_progress=False)
    run_index(projected, show_progress=False)
    ours = run_exact(projected, str(queries), QueryOptions(k=3)).scores
    assert _relative(ours, _store_scores(reference, queries)) <= 1e-10


@pytest.mark.heavy  # two indexes and two queries of the NaN-word model: ~10 s
def test_skipped_rows_and_a_nonfinite_query(tmp_path, nan_word_model):
    """Rows pass 1 skipped (data.on_nonfinite: skip) are out of the full-width factors and never scored: the
    other rows' exact scores equal a dim-0 store of those rows alone; a query with a NaN gradient is refused."""
    raw = skip_config(tmp_path, nan_word_model, all_rows(tmp_path), "skip.zarr", projection={"dim": 4})
    raw["exact"] = {"factors": True}
    run_index(parse_config(raw), show_progress=False)
    kept = [(f"t{i}", s) for i, s in enumerate(SENTENCES) if f"t{i}" not in SKIPPED_IDS]
    reference = skip_config(tmp_path, nan_word_model, rows_file(tmp_path, kept, "kept.jsonl"), "kept.zarr")
    run_index(parse_config(reference), show_progress=False)
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q0", "prompt": "the fox eats", "completion": " berries"}])
    exact = run_exact(parse_config(raw), str(queries), QueryOptions(k=8))
    assert np.array_equal(np.flatnonzero(~exact.exact), [1, 3])
    listed = [entry["id"] for entry in exact.records[0]["top_k"]]
    assert len(listed) == 6 and not set(listed) & set(SKIPPED_IDS)
    theirs = _store_scores(parse_config(reference), queries)
    assert _relative(exact.scores[:, exact.exact], theirs) <= 1e-8
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "nanq", "prompt": "the owl eats", "completion": " mice"}])
    with pytest.raises(TributaryError, match='query "nanq": its gradient is not finite'):
        run_exact(parse_config(raw), str(bad), QueryOptions(k=2))
