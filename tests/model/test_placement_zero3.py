"""placement.kind zero3: two gloo ranks in Ray actors hold a tiny Llama partitioned and index it in lockstep; the
store equals the single-process one, each rank holds about half the weights, and a killed rank loses nothing."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index, run_query
from engine.store import GradientStore
from tests.conftest import vocabulary_texts, write_jsonl
from tests.distributed_helpers import store_config, store_contents
from tests.requirements import require
from tests.zero3_models import TRAIN

ray = require("ray")
require("deepspeed")

CLUSTER = {"address": "local", "cpus_per_worker": 1, "local_cpus": 2}
ZERO3 = {"kind": "zero3", "devices_per_replica": 2}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("zero3_data") / "train.jsonl"
    return write_jsonl(path, [{"id": f"r{i:02d}", "text": text} for i, text in enumerate(TRAIN)])


@pytest.fixture
def ray_cleanup():
    yield
    ray.shutdown()


def _with_adapter(raw: dict, adapter) -> dict:
    if adapter is not None:
        raw["model"] = dict(raw["model"], adapter=str(adapter))
    return raw


def _single(model_path, train, path: str, adapter=None) -> dict:
    run_index(parse_config(_with_adapter(store_config(model_path, train, path), adapter)), show_progress=False)
    return store_contents(path)


def _zero3(model_path, train, path: str, adapter=None) -> None:
    raw = store_config(model_path, train, path, cluster=CLUSTER, placement=ZERO3)
    run_index(parse_config(_with_adapter(raw, adapter)), show_progress=False)


def _assert_close_stores(ours: dict, reference: dict) -> None:
    """Rows and factors equal to 1e-6 relative (a partitioned forward sums in another order)."""
    assert ours["ids"] == reference["ids"]
    assert ours["grads"].dtype == reference["grads"].dtype == np.float32
    scale = np.abs(reference["grads"]).max()
    np.testing.assert_allclose(ours["grads"], reference["grads"], rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_array_equal(ours["meta"]["num_tokens"], reference["meta"]["num_tokens"])
    np.testing.assert_allclose(ours["meta"]["loss"], reference["meta"]["loss"], rtol=1e-6)
    assert ours["factors"].keys() == reference["factors"].keys()
    for name, fields in reference["factors"].items():
        lam = fields["lam"]
        np.testing.assert_allclose(ours["factors"][name]["lam"], lam, rtol=0, atol=1e-6 * max(1.0, np.abs(lam).max()))
        for field in ("q_a", "q_s"):
            ref, other = fields[field], ours["factors"][name][field]
            signs = np.sign(np.sum(other * ref, axis=0))  # eigenvectors up to sign
            np.testing.assert_allclose(other * signs, ref, rtol=0, atol=1e-4)


@pytest.mark.heavy
def test_zero3_store_equals_single_and_each_rank_holds_a_partition(llama32, train_file, tmp_path, ray_cleanup):
    reference = _single(llama32, train_file, str(tmp_path / "single.zarr"))
    path = str(tmp_path / "zero3.zarr")
    raw = store_config(llama32, train_file, path, cluster=CLUSTER, placement=ZERO3)
    from engine.local_or_ray import shard_executor

    executor = shard_executor(parse_config(raw))
    try:
        facts = executor.describe()
    finally:
        executor.shutdown()
    assert len(facts["partition_bytes"]) == 2
    full = sum(p.numel() * p.element_size() for p in _unsharded_parameters(llama32))
    assert facts["full_bytes"] == full
    assert all(0 < held <= 0.6 * full for held in facts["partition_bytes"]), facts["partition_bytes"]
    _zero3(llama32, train_file, path)
    _assert_close_stores(store_contents(path), reference)
    assert GradientStore.open(path).manifest.complete


def _unsharded_parameters(model_path):
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(model_path, dtype="float32").parameters())


@pytest.mark.heavy
def test_zero3_lora_adapter_on_the_partitioned_base(llama32, lora32, train_file, tmp_path, ray_cleanup):
    reference = _single(llama32, train_file, str(tmp_path / "single.zarr"), adapter=lora32)
    assert all("lora" in name for name in reference["factors"]), "the adapter's weights are the tracked ones"
    path = str(tmp_path / "zero3.zarr")
    _zero3(llama32, train_file, path, adapter=lora32)
    _assert_close_stores(store_contents(path), reference)


@pytest.mark.heavy
def test_zero3_rank_killed_mid_index_completes_as_a_clean_run(llama32, train_file, tmp_path, monkeypatch, ray_cleanup):
    reference = _single(llama32, train_file, str(tmp_path / "single.zarr"))
    marker = tmp_path / "killed"
    monkeypatch.setenv("TRIBUTARY_CHAOS", f"actor:gradients:1:{marker}")
    path = str(tmp_path / "zero3.zarr")
    _zero3(llama32, train_file, path)
    assert marker.exists(), "the chaos hook did not fire: the test would prove nothing"
    manifest = GradientStore.open(path).manifest
    assert manifest.complete
    assert manifest.shards["gradients"][1].pid != int(marker.read_text())
    _assert_close_stores(store_contents(path), reference)


def test_zero3_refuses_nonfinite_skip_and_merged_adapters(llama32, train_file, tmp_path):
    raw = store_config(llama32, train_file, str(tmp_path / "s.zarr"), cluster=CLUSTER, placement=ZERO3)
    skip = dict(raw, data=dict(raw["data"], on_nonfinite="skip"))
    with pytest.raises(TributaryError, match="on_nonfinite skip is not supported with placement.kind zero3"):
        parse_config(skip)
    merged = dict(raw, model=dict(raw["model"], adapter=str(tmp_path), adapter_mode="merged"))
    with pytest.raises(TributaryError, match="adapter_mode merged is not supported with placement.kind zero3"):
        parse_config(merged)


QUERIES = [{"id": "q0", "text": "the fox eats clams in the snow"}, {"id": "q1", "text": "a crow eats honey"}]


def test_zero3_refuses_generation_per_token_and_serving_before_a_group_starts(llama32, train_file, tmp_path):
    from engine.config import GenerationSettings, QueryOptions
    from engine.serving.plan import resolve_serve_plan

    path = str(tmp_path / "s.zarr")
    _single(llama32, train_file, path)
    raw = store_config(llama32, train_file, path, cluster=CLUSTER, placement=ZERO3)
    config = parse_config(raw)
    queries = write_jsonl(tmp_path / "q.jsonl", QUERIES)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "p", "prompt": "the fox"}])
    generate = QueryOptions(k=1, generation=GenerationSettings(max_new_tokens=2))
    with pytest.raises(TributaryError, match="--generate with placement.kind zero3 is not supported"):
        run_query(config, str(prompts), k=1, options=generate)
    with pytest.raises(TributaryError, match="--per-token with placement.kind zero3 is not supported"):
        run_query(config, str(queries), k=1, options=QueryOptions(k=1, per_token=True))
    with pytest.raises(TributaryError, match="tributary serve with placement.kind zero3 is not supported"):
        resolve_serve_plan(config)
    assert not ray.is_initialized(), "a refused query must not have started the cluster"


@pytest.mark.heavy
def test_zero3_query_gradients_on_the_group_equal_single(llama32, lora32, train_file, tmp_path, ray_cleanup):
    """Queries with placement zero3 take their gradients from a group of 2 ranks: every score equals the one a
    single-process query of the same store gives (a LoRA adapter on the partitioned base, so the tracked
    modules are the adapter's)."""
    path = str(tmp_path / "single.zarr")
    _single(llama32, train_file, path, adapter=lora32)
    queries = write_jsonl(tmp_path / "q.jsonl", QUERIES)
    single = _with_adapter(store_config(llama32, train_file, path), lora32)
    expected = run_query(parse_config(single), str(queries), k=3, scores_out=str(tmp_path / "single.npy"))
    zero3 = _with_adapter(store_config(llama32, train_file, path, cluster=CLUSTER, placement=ZERO3), lora32)
    result = run_query(parse_config(zero3), str(queries), k=3, scores_out=str(tmp_path / "zero3.npy"))
    reference = np.load(tmp_path / "single.npy")
    ours = np.load(tmp_path / "zero3.npy")
    assert ours.shape == reference.shape == (len(QUERIES), len(TRAIN))
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())
    np.testing.assert_array_equal(result.top_indices, expected.top_indices)


@pytest.mark.heavy
def test_zero3_float64_store_equals_single(llama32, train_file, tmp_path, ray_cleanup):
    """At float64 each rank gathers the exact weights and runs the same kernels as one process, so only the
    summation order of the sums could differ: rows to 1e-12 relative, Λ to 1e-10."""

    def float64(raw: dict) -> dict:
        return dict(raw, model=dict(raw["model"], dtype="float64"), store=dict(raw["store"], dtype="float64"))

    path = str(tmp_path / "single.zarr")
    run_index(parse_config(float64(store_config(llama32, train_file, path))), show_progress=False)
    reference = store_contents(path)
    path = str(tmp_path / "zero3.zarr")
    raw = store_config(llama32, train_file, path, cluster=CLUSTER, placement=ZERO3)
    run_index(parse_config(float64(raw)), show_progress=False)
    ours = store_contents(path)
    assert ours["grads"].dtype == reference["grads"].dtype == np.float64
    scale = np.abs(reference["grads"]).max()
    np.testing.assert_allclose(ours["grads"], reference["grads"], rtol=1e-12, atol=1e-12 * scale)
    for name, fields in reference["factors"].items():
        lam = fields["lam"]
        np.testing.assert_allclose(ours["factors"][name]["lam"], lam, rtol=0, atol=1e-10 * np.abs(lam).max())


def test_a_group_the_cluster_cannot_place_is_refused_before_anything_is_written(
    llama32, train_file, tmp_path, ray_cleanup
):
    path = tmp_path / "s.zarr"
    placement = dict(ZERO3, devices_per_replica=3)  # 3 ranks of 1 CPU on a 2-CPU cluster would wait forever
    raw = store_config(llama32, train_file, str(path), cluster=CLUSTER, placement=placement)
    with pytest.raises(TributaryError, match="devices_per_replica 3 ranks needs 3 CPUs .* the cluster has 2"):
        run_index(parse_config(raw), show_progress=False)
    assert not path.exists()


def test_zero3_refuses_fused_experts_before_a_group_starts(train_file, tmp_path):
    """A mixture-of-experts model whose experts are fused into 3-D parameters: ZeRO-3 would partition what
    Tributary splits per expert, so the index is refused from the model's structure, one line, nothing written."""
    from engine.testing.families import save_family

    path = save_family(tmp_path / "mixtral", "mixtral", vocabulary_texts())
    store = tmp_path / "s.zarr"
    raw = store_config(path, train_file, str(store), cluster=CLUSTER, placement=ZERO3)
    raw["model"]["tokenizer"] = str(path / "tokenizer")
    with pytest.raises(
        TributaryError,
        match=r"placement.kind zero3 would partition the fused 3-D expert weights of "
        r"MixtralExperts \(model.layers.0.mlp.experts and 1 more\).*use placement.kind single",
    ):
        run_index(parse_config(raw), show_progress=False)
    assert not store.exists()
    assert not ray.is_initialized(), "a refused index must not have started the cluster"
