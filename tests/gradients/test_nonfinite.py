"""Non-finite values never reach a complete store, a ranking or an answer (issue 11, item 1).

A model with a NaN weight (every row NaN) must stop `tributary index` with one line naming a row and a module,
leaving the store incomplete; `data.on_nonfinite: skip` with a model that is NaN only on some words must give the
store of the other rows (compared with indexing a file without them) and never rank the skipped rows; a query
whose gradient is NaN is refused by id, on the CLI and by the service.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
import yaml

from engine.config import parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index, run_query
from engine.store import GradientStore
from tests.conftest import SENTENCES, job_config, write_jsonl
from tests.distributed_helpers import run_cli, store_contents
from tests.nonfinite_models import (
    SKIPPED_IDS,
    all_rows,
    edited_model,
    nan_word_model_in,
    rows_file,
    skip_config,
)
from tests.requirements import require


@pytest.fixture(scope="module")
def nan_weight_model(tmp_path_factory) -> Path:
    def one_nan(model, _tokenizer):
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")

    return edited_model(tmp_path_factory.mktemp("nan_weight"), one_nan)


@pytest.fixture(scope="module")
def nan_word_model(tmp_path_factory) -> Path:
    return nan_word_model_in(tmp_path_factory.mktemp("nan_words"))


def _committed_rows_are_finite(path: str) -> None:
    store = GradientStore.open(path)
    assert not store.manifest.complete
    for shard in store.manifest.completed_shards:
        start, stop = store.shards()[shard]
        assert np.isfinite(store.read_rows(start, stop)).all(), f"committed shard {shard} holds NaN/inf"
        assert np.isfinite(store.row_metadata()["loss"][start:stop]).all()


@pytest.mark.parametrize(
    ("strategy", "method", "cluster"),
    [
        ("identity", "grad_dot", None),
        ("ekfac", "if", None),
        ("identity", "grad_dot", {"address": "local", "workers": 2, "cpus_per_worker": 1}),  # Ray wraps the error
    ],
    ids=["identity", "ekfac", "ray"],
)
def test_a_nan_weight_stops_index_naming_a_row_and_a_module(tmp_path, nan_weight_model, strategy, method, cluster):
    raw = job_config(
        tmp_path, nan_weight_model, all_rows(tmp_path), curvature={"strategy": strategy}, method={"name": method}
    )
    raw["store"]["rows_per_chunk"] = 3
    if cluster is not None:
        require("ray")
        raw["cluster"] = cluster
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = run_cli("index", str(config), "--no-progress")
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r'row \d+ \(id "t\d+": model\.layers\.', errors[0]) and "non-finite" in errors[0], errors[0]
    assert "RayTaskError" not in result.stderr
    _committed_rows_are_finite(raw["store"]["path"])


def test_skip_leaves_out_exactly_the_nonfinite_rows(tmp_path, nan_word_model, caplog):
    """The skipped rows are listed, stored as zeros, out of the curvature sums (the factors equal those of a
    store of the other rows alone) and never ranked."""
    train = all_rows(tmp_path)
    raw = skip_config(tmp_path, nan_word_model, train, "skip.zarr")
    with caplog.at_level("WARNING"):
        run_index(parse_config(raw), show_progress=False)
    assert "skipped 2 of 8 rows" in caplog.text
    store = GradientStore.open(raw["store"]["path"])
    manifest = store.manifest
    assert manifest.complete
    assert [row.id for row in manifest.skipped] == SKIPPED_IDS and [row.row for row in manifest.skipped] == [1, 3]
    assert all(row.modules for row in manifest.skipped)

    kept = [(f"t{i}", s) for i, s in enumerate(SENTENCES) if f"t{i}" not in SKIPPED_IDS]
    reference_raw = skip_config(tmp_path, nan_word_model, rows_file(tmp_path, kept, "kept.jsonl"), "kept.zarr")
    reference_raw["data"]["on_nonfinite"] = "error"  # the other rows alone are finite
    run_index(parse_config(reference_raw), show_progress=False)
    ours, reference = store_contents(raw["store"]["path"]), store_contents(reference_raw["store"]["path"])

    assert np.isfinite(ours["grads"]).all() and np.isfinite(ours["meta"]["loss"]).all()
    positions = [ours["ids"].index(row_id) for row_id, _ in kept]
    np.testing.assert_allclose(ours["grads"][positions], reference["grads"], rtol=1e-10, atol=1e-12)
    assert not ours["grads"][[1, 3]].any(), "skipped rows are stored as zeros"
    for name, fields in reference["factors"].items():
        np.testing.assert_allclose(ours["factors"][name]["lam"], fields["lam"], rtol=1e-8, atol=1e-12)
        for field in ("q_a", "q_s"):  # eigenvectors up to sign
            signs = np.sign(np.sum(ours["factors"][name][field] * fields[field], axis=0))
            np.testing.assert_allclose(ours["factors"][name][field] * signs, fields[field], atol=1e-6)

    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "q0", "prompt": "the fox eats", "completion": " berries"}])
    out = tmp_path / "results.jsonl"
    run_query(parse_config(raw), str(queries), k=8, out=str(out))
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    for side in ("top", "bottom"):
        listed = [entry["id"] for entry in record[f"{side}_k"]]
        assert len(listed) == 6 and not set(listed) & set(SKIPPED_IDS), listed


def test_a_nonfinite_query_is_refused_by_id(tmp_path, nan_word_model):
    """On the CLI (exit 2, one line) and by the service (422 naming the query; the other requests answered)."""
    raw = skip_config(tmp_path, nan_word_model, all_rows(tmp_path), "skip.zarr")
    run_index(parse_config(raw), show_progress=False)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    queries = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"id": "fine", "prompt": "the fox eats", "completion": " berries"},
            {"id": "nanq", "prompt": "the owl eats", "completion": " mice at night"},
        ],
    )
    result = run_cli("query", str(config), "--queries", str(queries), "--out", str(tmp_path / "r.jsonl"))
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert '"nanq"' in errors[0] and "not finite" in errors[0], errors[0]
    assert not (tmp_path / "r.jsonl").exists()

    require("ray.serve")
    from engine.serving.app import AttributionService, build_api
    from tests.service_helpers import asgi_request

    # the replica class itself, in this process (Serve's ingress wrapper around it needs a running Serve)
    wrapped = cast(type, AttributionService.func_or_class)  # Serve types it as a class or an import path
    replica: Any = next(c for c in wrapped.__mro__ if "_score_batch" in vars(c))
    service = replica.__new__(replica)
    replica.__init__(service, parse_config(raw))
    api = build_api(service)

    def ask(query: dict) -> tuple[int, dict]:
        return asgi_request(api, "POST", "/v1/attribute", json.dumps({"queries": [query], "top_k": 3}).encode())

    status, answer = ask({"id": "nanq", "prompt": "the owl eats", "completion": " mice at night"})
    assert status == 422 and '"nanq"' in answer["error"] and "not finite" in answer["error"], answer
    status, answer = ask({"id": "fine", "prompt": "the fox eats", "completion": " berries"})
    assert status == 200, answer
    (attribution,) = answer["results"]
    entries = attribution["top_k"] + attribution["bottom_k"]
    assert entries and all(np.isfinite(entry["score"]) for entry in entries)
    assert not {entry["id"] for entry in entries} & set(SKIPPED_IDS)

    # both in one scoring pass: the refused request does not fail the other
    from engine.serving.responses import RequestError
    from engine.serving.schema import AttributeRequest
    from engine.serving.validation import prepare

    requests = [
        AttributeRequest.model_validate({"queries": [query], "top_k": 3})
        for query in (
            {"id": "nanq", "prompt": "the owl eats", "completion": " mice at night"},
            {"id": "fine", "prompt": "the fox eats", "completion": " berries"},
        )
    ]
    refused, answered = service._score_batch(
        [prepare(request, service.attributor, service.limits, service.request_tokenizer) for request in requests]
    )
    assert isinstance(refused, RequestError) and refused.status == 422 and '"nanq"' in str(refused.body())
    assert not isinstance(answered, RequestError)
    assert [entry["id"] for entry in answered[0]["top_k"]] == [entry["id"] for entry in attribution["top_k"]]


def test_a_float16_model_that_overflows_is_an_error(tmp_path):
    def overflowing(model, _tokenizer):  # finite weights whose MLP outputs pass float16's 65504
        for layer in model.model.layers:
            for projection in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                projection.weight.mul_(1e3)
        assert all(torch.isfinite(p.to(torch.float16)).all() for p in model.parameters())

    model = edited_model(tmp_path / "fp16", overflowing, torch.float16)
    raw = job_config(tmp_path, model, all_rows(tmp_path), curvature={"strategy": "identity"})
    raw["model"]["dtype"] = "float16"
    raw["store"].update(dtype="float16", rows_per_chunk=3)
    with pytest.raises(TributaryError, match=r'row \d+ \(id "t\d+"'):
        run_index(parse_config(raw), show_progress=False)
    _committed_rows_are_finite(raw["store"]["path"])


def test_a_workers_error_comes_back_as_its_own_line():
    """Ray wraps a worker's exception (RayTaskError with the remote traceback); the pool hands back the
    TributaryError's own message."""
    ray = require("ray")
    from engine.distributed.pool import _unwrapped

    cause = TributaryError('train.jsonl: non-finite gradient (NaN/inf) at row 4 (id "t4": model.layers.0.mlp)')
    wrapped = ray.exceptions.RayTaskError("ShardWorker.gradients", "Traceback (most recent call last): ...", cause)
    unwrapped = _unwrapped(wrapped)
    assert isinstance(unwrapped, TributaryError) and str(unwrapped) == str(cause)
    other = ray.exceptions.RayTaskError("ShardWorker.gradients", "tb", KeyError("bug"))
    assert _unwrapped(other) is other


def test_skip_is_refused_for_a_training_run(tmp_path, tiny_models):
    """Each checkpoint would skip its own rows, so no one set of rows could be ranked: refused before any work."""
    from tests.trained_checkpoints import train_checkpoints

    train_checkpoints(tiny_models["gpt2"], tmp_path / "trainer", saves=(2,))
    raw = job_config(
        tmp_path, tiny_models["gpt2"], all_rows(tmp_path), training_run={"trainer_dir": str(tmp_path / "trainer")}
    )
    raw["data"]["on_nonfinite"] = "skip"
    with pytest.raises(TributaryError, match="on_nonfinite: skip is for single-checkpoint stores"):
        run_index(parse_config(raw), show_progress=False)
    assert not Path(raw["store"]["path"]).exists()


def test_skip_with_every_row_non_finite_is_a_clean_error(tmp_path, nan_weight_model):
    """A model that is NaN everywhere leaves no row to fit the curvature on: an error naming the file, not
    numpy's "covariance has no data", and the store stays incomplete."""
    train = all_rows(tmp_path)
    raw = skip_config(tmp_path, nan_weight_model, train, "all.zarr")
    with pytest.raises(TributaryError, match="every row of .*train.jsonl has non-finite values"):
        run_index(parse_config(raw), show_progress=False)
    assert not GradientStore.open(raw["store"]["path"]).manifest.complete


def test_the_fitting_pass_follows_on_nonfinite(tmp_path, nan_word_model):
    """projection.kind kfac_eigen: with data.on_nonfinite: skip the fit leaves out the NaN rows, so its matrices
    equal those fitted on the other rows alone; with error it stops naming a row, before any gradient is stored."""
    fitted = {"dim": 4, "kind": "kfac_eigen"}
    raw = skip_config(tmp_path, nan_word_model, all_rows(tmp_path), "skip.zarr", projection=fitted)
    run_index(parse_config(raw), show_progress=False)
    ours = GradientStore.open(raw["store"]["path"])
    assert ours.manifest.complete and [row.id for row in ours.manifest.skipped] == SKIPPED_IDS

    kept = [(f"t{i}", s) for i, s in enumerate(SENTENCES) if f"t{i}" not in SKIPPED_IDS]
    reference_raw = skip_config(
        tmp_path, nan_word_model, rows_file(tmp_path, kept, "kept.jsonl"), "kept.zarr", projection=fitted
    )
    reference_raw["data"]["on_nonfinite"] = "error"
    run_index(parse_config(reference_raw), show_progress=False)
    reference = GradientStore.open(reference_raw["store"]["path"]).read_projection()
    for name, (p_in, p_out) in ours.read_projection().items():
        assert np.isfinite(p_in).all() and np.isfinite(p_out).all()
        np.testing.assert_allclose(p_in, reference[name][0], atol=1e-5)
        np.testing.assert_allclose(p_out, reference[name][1], atol=1e-5)

    strict = skip_config(tmp_path, nan_word_model, all_rows(tmp_path), "strict.zarr", projection=fitted)
    strict["data"]["on_nonfinite"] = "error"
    with pytest.raises(TributaryError, match=r'non-finite gradient \(NaN/inf\) at row 1 \(id "t1"'):
        run_index(parse_config(strict), show_progress=False)
    assert not GradientStore.open(strict["store"]["path"]).manifest.completed_shards


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_statistics_names_exactly_the_rows_an_elementwise_check_names(dtype):
    """The sum-first check against isfinite row by row: NaN, ±inf, an inf beside a -inf (their sum is NaN), and
    finite values whose sum overflows (a false alarm the elementwise fallback must clear)."""
    from engine.gradients.finite import nonfinite_statistics

    big = torch.finfo(dtype).max
    clean = torch.randn(4, 3, 5, dtype=torch.float64).to(dtype)
    overflowing = torch.full((4, 3, 5), big / 2, dtype=dtype)
    poisoned = torch.randn(4, 3, 5, dtype=torch.float64).to(dtype)
    poisoned[1, 0, 2] = float("nan")
    poisoned[2, 2, 4] = float("inf")
    poisoned[2, 1, 0] = float("-inf")
    poisoned[3, 0, 0] = float("-inf")
    tensors = {"a": [clean, overflowing], "b": [poisoned], "c": [clean]}
    expected: dict[int, list[str]] = {}
    for name, calls in tensors.items():
        for tensor in calls:
            for row in range(tensor.shape[0]):
                if not torch.isfinite(tensor[row].double()).all() and name not in expected.setdefault(row + 10, []):
                    expected[row + 10].append(name)
    expected = {row: names for row, names in expected.items() if names}
    assert nonfinite_statistics(tensors, offset=10) == expected == {11: ["b"], 12: ["b"], 13: ["b"]}
    assert nonfinite_statistics({}) == {}
