"""The approximate top-k index (issue 15, part 2): recall against an exact scan computed here with numpy, exact
top-k after rerank where the candidates hold it, the normalised variant for Grad-Cos, skipped rows never
ranked, refusal when the store changes, a killed build that resumes, the fallback of other methods, and bad
input as one-line errors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.common import bare_store_manifest
from engine.ann.build import build_index
from engine.ann.index import AnnIndex
from engine.ann.layout import index_location
from engine.config import parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index
from engine.query.approximate import rank_approximate
from engine.store import GradientStore
from engine.store.identity import new_store_id
from engine.store.manifest import SkippedRow
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl

ROWS, WIDTH, CHUNK, RANK = 3000, 48, 250, 6
SKIPPED = (7, 1234)


def low_rank_rows(generator: np.random.Generator, rows: int) -> np.ndarray:
    """Rows near a RANK-dimensional subspace, with norms that vary: neighbours are meaningful."""
    basis = np.random.default_rng(99).standard_normal((RANK, WIDTH))
    coefficients = generator.standard_normal((rows, RANK)) * generator.uniform(0.5, 2.0, (rows, 1))
    return coefficients @ basis + 0.3 * generator.standard_normal((rows, WIDTH))


def synthetic_store(path: Path, skipped: tuple[int, ...] = ()) -> np.ndarray:
    """A complete store of low-rank rows (the skipped rows given a huge norm, so an index holding them would rank
    them first); returns the rows as stored."""
    manifest = bare_store_manifest(ROWS, WIDTH, CHUNK)
    store = GradientStore.create(str(path), manifest)
    rows = low_rank_rows(np.random.default_rng(0), ROWS).astype(np.float32)
    rows[list(skipped)] *= 1000
    for start, stop in store.shards():
        ids = [f"t{i}" for i in range(start, stop)]
        store.write_rows(start, rows[start:stop], ids, np.ones(stop - start), np.zeros(stop - start))
    store.update_manifest(
        complete=True,
        completed_shards=list(range(len(store.shards()))),
        skipped=[SkippedRow(row=row, id=f"t{row}", modules=["m"]) for row in skipped],
    )
    return rows


def queries(count: int = 16) -> np.ndarray:
    return low_rank_rows(np.random.default_rng(1), count)


def exact_top(scores: np.ndarray, k: int, excluded: tuple[int, ...] = ()) -> np.ndarray:
    scores = scores.astype(np.float64).copy()
    scores[:, list(excluded)] = -np.inf
    return np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ann")
    rows = synthetic_store(root / "store.zarr", SKIPPED)
    record = build_index(str(root / "store.zarr"), show_progress=False)
    store = GradientStore.open(str(root / "store.zarr"))
    return rows, store, AnnIndex(store.path, store), record


def test_recall_against_the_exact_scan(built):
    rows, store, index, record = built
    assert record.indexed_rows == ROWS - len(SKIPPED)
    q = queries()
    exact = exact_top(q @ rows.T.astype(np.float64), 10, SKIPPED)
    quantised = rank_approximate(index, store, q, False, 10, rerank=0)
    reranked = rank_approximate(index, store, q, False, 10, rerank=100)
    recall = lambda found: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert recall(quantised.top_indices) >= 0.8
    assert recall(reranked.top_indices) >= 0.95
    exact_bottom = exact_top(-(q @ rows.T.astype(np.float64)), 10, SKIPPED)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(reranked.bottom_indices, exact_bottom)]) >= 0.95


def test_rerank_gives_the_exact_top_k_where_the_candidates_hold_it(built):
    rows, store, index, _ = built
    q = queries(24)
    scores = q @ rows.T.astype(np.float64)
    exact = exact_top(scores, 10, SKIPPED)
    ids, _, _ = index.search(q, False, 60)
    result = rank_approximate(index, store, q, False, 10, rerank=60)
    held = [i for i in range(len(q)) if set(exact[i]) <= set(ids[i])]
    assert len(held) >= len(q) // 2  # not vacuous: for most queries the probed cells hold the whole top-10
    for i in held:
        assert list(result.top_indices[i]) == list(exact[i])
        np.testing.assert_allclose(result.top_scores[i], scores[i, exact[i]], rtol=1e-5)
    for i in range(len(q)):  # every score returned after rerank is the exact one
        np.testing.assert_allclose(result.top_scores[i], scores[i, result.top_indices[i]], rtol=1e-5)
        np.testing.assert_allclose(result.bottom_scores[i], scores[i, result.bottom_indices[i]], rtol=1e-5)


def test_rerank_from_the_store_equals_rerank_from_the_row_copy(built, tmp_path):
    rows, store, index, _ = built
    shutil.copytree(store.path, tmp_path / "copy.zarr")  # the same store (same identity), another index
    build_index(str(tmp_path / "copy.zarr"), show_progress=False, row_copy=False)
    copy = GradientStore.open(str(tmp_path / "copy.zarr"))
    without = AnnIndex(copy.path, copy)
    assert without.record.rows is None and index.record.rows is not None
    q = queries()
    for normalise in (False, True):
        a = rank_approximate(index, store, q, normalise, 10, rerank=50)
        b = rank_approximate(without, copy, q, normalise, 10, rerank=50)
        np.testing.assert_array_equal(a.top_indices, b.top_indices)
        np.testing.assert_array_equal(a.top_scores, b.top_scores)
        np.testing.assert_array_equal(a.bottom_indices, b.bottom_indices)


def test_grad_cos_searches_the_normalised_rows(built):
    rows, store, index, _ = built
    q = unit(queries(20))  # the Grad-Cos query side: unit-normalised
    cosines = q @ unit(rows.astype(np.float64)).T
    exact = exact_top(cosines, 10, SKIPPED)
    ids, _, _ = index.search(q, True, 40)
    result = rank_approximate(index, store, q, True, 10, rerank=40)
    held = [i for i in range(len(q)) if set(exact[i]) <= set(ids[i])]
    assert len(held) >= len(q) // 2
    for i in held:
        assert list(result.top_indices[i]) == list(exact[i])
        np.testing.assert_allclose(result.top_scores[i], cosines[i, exact[i]], rtol=1e-5)
    # the raw index would rank by inner product, which prefers long rows: the two orders differ
    raw = exact_top(q @ rows.T.astype(np.float64), 10, SKIPPED)
    assert any(list(a) != list(b) for a, b in zip(raw, exact))


def test_skipped_rows_are_never_ranked(built):
    rows, store, index, _ = built
    q = rows[list(SKIPPED)].astype(np.float64)  # each skipped row would be its own best match
    ids, _, _ = index.search(q, False, 200)
    assert not np.isin(ids, SKIPPED).any()
    result = rank_approximate(index, store, q, False, 10, rerank=200)
    assert not np.isin(result.top_indices, SKIPPED).any() and not np.isin(result.bottom_indices, SKIPPED).any()


def test_a_changed_store_is_refused(tmp_path):
    synthetic_store(tmp_path / "store.zarr")
    build_index(str(tmp_path / "store.zarr"), metrics=("dot",), show_progress=False)
    store = GradientStore.open(str(tmp_path / "store.zarr"), mode="r+")
    store.update_manifest(store_id=new_store_id())  # what `tributary index --overwrite` leaves
    with pytest.raises(TributaryError, match=r"store changed since: run `tributary ann build .*store\.zarr` again"):
        AnnIndex(store.path, GradientStore.open(store.path))
    # an index copied beside another store is refused the same way
    synthetic_store(tmp_path / "other.zarr")
    shutil.copytree(index_location(str(tmp_path / "store.zarr")), index_location(str(tmp_path / "other.zarr")))
    with pytest.raises(TributaryError, match="built for another state of store"):
        AnnIndex(str(tmp_path / "other.zarr"), GradientStore.open(str(tmp_path / "other.zarr")))
    with pytest.raises(TributaryError, match=r"has no cos index .*--metric dot,cos"):
        other = build_index(str(tmp_path / "other.zarr"), metrics=("dot",), show_progress=False)
        assert other.files == {"dot": other.files["dot"]}
        AnnIndex(str(tmp_path / "other.zarr"), GradientStore.open(str(tmp_path / "other.zarr"))).require("cos")


def _cli(*args: str, chaos: str | None = None, width: int = 80) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS=str(width))
    env.pop("TRIBUTARY_CHAOS", None)
    if chaos is not None:
        env["TRIBUTARY_CHAOS"] = chaos
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_a_killed_build_resumes_and_gives_the_uninterrupted_index(tmp_path):
    synthetic_store(tmp_path / "store.zarr", SKIPPED)
    store = str(tmp_path / "store.zarr")
    killed = _cli("ann", "build", store, "--no-progress", "--batch-rows", str(CHUNK), chaos="driver:ann:3")
    assert killed.returncode == -9, killed.stderr
    directory = index_location(store)
    assert not (directory / "index.json").exists()  # nothing half-done looks finished
    assert len(list((directory / "build" / "codes").glob("*.npz"))) == 3
    with pytest.raises(TributaryError, match="is not finished .* to resume it"):
        AnnIndex(store, GradientStore.open(store))
    resumed = _cli("ann", "build", store, "--no-progress", "--batch-rows", str(CHUNK), width=200)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming the ANN build in {directory / 'build'} (3 of {ROWS // CHUNK} batches encoded)" in resumed.stderr
    assert not (directory / "build").exists()
    (copied,) = directory.glob("rows-*.npy")  # the row copy, written across the two runs, is the store's rows
    np.testing.assert_array_equal(np.load(copied), GradientStore.open(store).read_rows(0, ROWS))
    # the same index as a build that was never interrupted, over a copy of the store
    shutil.copytree(store, tmp_path / "copy.zarr")
    build_index(str(tmp_path / "copy.zarr"), show_progress=False, batch_rows=CHUNK)
    q = queries()
    for normalise in (False, True):
        searched = [
            AnnIndex(path, GradientStore.open(path)).search(q, normalise, 20)
            for path in (store, str(tmp_path / "copy.zarr"))
        ]
        np.testing.assert_array_equal(searched[0][0], searched[1][0])
        np.testing.assert_array_equal(searched[0][1], searched[1][1])


def test_bad_input_is_one_line_exit_2(tmp_path):
    assert_clean_failure(invoke("ann", "build", tmp_path / "missing.zarr"), "does not exist")
    synthetic_store(tmp_path / "store.zarr")
    assert_clean_failure(invoke("ann", "build", tmp_path / "store.zarr", "--metric", "l2"), "--metric 'l2'")
    assert_clean_failure(invoke("ann", "build", tmp_path / "store.zarr", "--probes", "0"), "--probes must be")
    assert_clean_failure(invoke("ann", "build", tmp_path / "store.zarr", "--codec", "PQ7"), "--codec PQ7")


# ---- the query command and the attributor, on a store indexed from a tiny model ------------------------------


@pytest.fixture(scope="module")
def model_store(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ann_model")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(root, tiny_models["gpt2"], train, projection={"dim": 4}, store={"rows_per_chunk": 3})
    run_index(parse_config(raw), show_progress=False)
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    query_rows = [{"id": f"q{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)]
    return root, config, write_jsonl(root / "queries.jsonl", query_rows), raw["store"]["path"]


def _records(root: Path, config: Path, queries_file: Path, name: str, *flags) -> list[dict]:
    out = root / f"{name}.jsonl"
    result = invoke("query", config, "--queries", queries_file, "--top-k", 3, "--out", out, *flags)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in out.read_text().splitlines()]


def _ranked(records: list[dict]) -> list[list[tuple[str, float]]]:
    return [[(e["id"], round(e["score"], 9)) for e in r["top_k"] + r["bottom_k"]] for r in records]


def test_query_approximate_refuses_a_missing_index(model_store):
    root, config, queries_file, store = model_store
    shutil.rmtree(index_location(store), ignore_errors=True)
    result = invoke("query", config, "--queries", queries_file, "--approximate")
    assert_clean_failure(result, "has no ANN index", f"tributary ann build {store}")
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    # an index whose fingerprint is not the store's (as after `tributary index --overwrite`) is refused alike
    build_index(store, show_progress=False)
    record = json.loads((index_location(store) / "index.json").read_text())
    record["plan"]["completion"] = "0" * 64
    (index_location(store) / "index.json").write_text(json.dumps(record))
    result = invoke("query", config, "--queries", queries_file, "--approximate")
    assert_clean_failure(result, "the store changed since", f"tributary ann build {store}")
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("method", ["grad_dot", "grad_cos", "if", "trak"])
def test_query_approximate_with_rerank_equals_the_exact_query(model_store, method):
    root, config, queries_file, store = model_store
    assert invoke("ann", "build", store, "--no-progress").exit_code == 0
    exact = _records(root, config, queries_file, f"exact-{method}", "--method", method)
    approximate = _records(
        root, config, queries_file, f"ann-{method}", "--method", method, "--approximate", "--rerank", 50
    )
    assert _ranked(approximate) == _ranked(exact)
    # the index ranked them: its own (8-bit quantised) scores, kept with --rerank 0, are not the exact ones
    quantised = _records(root, config, queries_file, f"q-{method}", "--method", method, "--approximate", "--rerank", 0)
    assert _ranked(quantised) != _ranked(exact)


@pytest.fixture(scope="module")
def run_store(tiny_models, tmp_path_factory):
    """A training-run store of three checkpoints: TracIn sums a term per checkpoint, which no index ranks."""
    from tests.trained_checkpoints import train_checkpoints

    root = tmp_path_factory.mktemp("ann_run")
    train_checkpoints(tiny_models["gpt2"], root / "trainer")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(root, tiny_models["gpt2"], train, training_run={"trainer_dir": str(root / "trainer")})
    run_index(parse_config(raw), show_progress=False)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    query_rows = [{"id": f"q{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)]
    return root, config, write_jsonl(root / "queries.jsonl", query_rows), raw["store"]["path"]


def test_other_methods_fall_back_to_the_exact_scan_with_a_log_line(run_store, caplog):
    root, config, queries_file, store = run_store
    assert invoke("ann", "build", store, "--no-progress").exit_code == 0  # over the final checkpoint's rows
    exact = _records(root, config, queries_file, "exact-tracin", "--method", "tracin")
    with caplog.at_level(logging.INFO):
        approximate = _records(root, config, queries_file, "ann-tracin", "--method", "tracin", "--approximate")
    assert _ranked(approximate) == _ranked(exact)
    assert "method tracin is not a single-term method" in caplog.text
    # a final-model method on the same run store is ranked by the index, and equals its exact scan
    caplog.clear()
    exact = _records(root, config, queries_file, "exact-dot", "--method", "grad_dot")
    with caplog.at_level(logging.INFO):
        approximate = _records(root, config, queries_file, "ann-dot", "--method", "grad_dot", "--approximate")
    assert _ranked(approximate) == _ranked(exact)
    assert "not a single-term method" not in caplog.text


def test_the_service_with_serve_approximate_ranks_with_the_index(model_store):
    """serve.approximate: the start-up check refuses a missing index; each request is ranked by the index
    (the same pass the replicas run, here without Ray) and equals the exact answer after rerank."""
    from engine.query.attributor import Attributor, QueryGroup
    from engine.serving.plan import resolve_serve_plan
    from engine.serving.schema import AttributeRequest, QueryIn
    from engine.serving.validation import Limits, prepare

    root, config_file, _, store = model_store
    raw = yaml.safe_load(config_file.read_text())
    config = parse_config(dict(raw, serve={"approximate": True}))
    shutil.rmtree(index_location(store), ignore_errors=True)
    with pytest.raises(TributaryError, match=r"has no ANN index .*tributary ann build"):
        resolve_serve_plan(config)
    build_index(store, show_progress=False)
    resolve_serve_plan(config)
    attributor = Attributor.load(config)
    request = AttributeRequest(queries=[QueryIn(prompt=p, completion=" " + c) for p, c in PROMPTS], top_k=3)
    tokenizer = attributor.context.tokenizer
    prepared = prepare(request, attributor, Limits.from_config(config), tokenizer)
    assert prepared.options.approximate
    assert prepared.queries is not None
    (approximate,) = attributor.attribute([QueryGroup(prepared.queries, prepared.options, prepared.method)])
    passes = attributor.scoring_passes
    exact_options = prepare(request, Attributor.load(parse_config(raw)), Limits.from_config(config), tokenizer).options
    (exact,) = attributor.attribute([QueryGroup(prepared.queries, exact_options, prepared.method)])
    assert passes == 0 and attributor.scoring_passes == 1  # the index ranked the first, the scan the second
    np.testing.assert_array_equal(approximate.top_indices, exact.top_indices)
    np.testing.assert_allclose(approximate.top_scores, exact.top_scores, rtol=1e-12)
    np.testing.assert_array_equal(approximate.bottom_indices, exact.bottom_indices)
