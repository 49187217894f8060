"""placement.kind device_map: accelerate dispatches the model with half its layers offloaded to disk, and its
hooks load them at run time; the store, the factors and the scores equal the single placement's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import parse_config
from engine.gradients.context import load_model_context
from engine.local_or_ray import run_index, run_query
from engine.store import GradientStore
from engine.testing.offload import memory_for_half_the_layers
from tests.conftest import PROMPTS, SENTENCES, write_jsonl
from tests.distributed_helpers import store_config, store_contents


def _configs(tmp_path: Path, model: Path, adapter: Path | None, train: Path) -> tuple[dict, dict]:
    single = store_config(model, train, str(tmp_path / "single.zarr"))
    dispatched = store_config(model, train, str(tmp_path / "dispatched.zarr"))
    if adapter is not None:
        for raw in (single, dispatched):
            raw["model"]["adapter"] = str(adapter)
    dispatched["placement"] = {
        "kind": "device_map",
        "offload": str(tmp_path / "offload"),
        "max_memory": {"cpu": memory_for_half_the_layers(model)},
    }
    return single, dispatched


@pytest.fixture
def train(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])


@pytest.fixture
def queries(tmp_path) -> Path:
    return write_jsonl(
        tmp_path / "queries.jsonl", [{"id": f"q{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(PROMPTS)]
    )


def test_device_map_offloads_half_the_layers_through_accelerate_hooks(tmp_path, tiny_models, train):
    _, raw = _configs(tmp_path, tiny_models["llama"], None, train)
    context = load_model_context(parse_config(raw))
    placed: dict[str, str] = getattr(context.model, "hf_device_map")  # noqa: B009 - set by accelerate, untyped
    assert "disk" in placed.values() and "cpu" in placed.values(), placed
    offloaded = [
        name
        for name, module in context.modules.items()
        if getattr(getattr(module, "_hf_hook", None), "offload", False) and module.weight.device.type == "meta"
    ]
    # a tracked module on disk holds no weights between calls: the hook loads them when it runs
    assert offloaded and len(offloaded) < len(context.modules), offloaded


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("with_adapter", [False, True], ids=["plain", "lora"])
def test_device_map_store_and_scores_equal_single(
    tmp_path, tiny_models, lora_adapters, train, queries, kind, with_adapter
):
    adapter = lora_adapters[kind] if with_adapter else None
    single_raw, dispatched_raw = _configs(tmp_path, tiny_models[kind], adapter, train)
    single, dispatched = parse_config(single_raw), parse_config(dispatched_raw)
    run_index(single, show_progress=False)
    run_index(dispatched, show_progress=False)
    ours, reference = store_contents(dispatched.store.path), store_contents(single.store.path)
    assert ours["ids"] == reference["ids"]
    scale = np.abs(reference["grads"]).max()
    assert scale > 0
    np.testing.assert_allclose(ours["grads"], reference["grads"], rtol=1e-6, atol=1e-6 * scale)
    for name, fields in reference["factors"].items():
        lam, other = fields["lam"], ours["factors"][name]["lam"]
        np.testing.assert_allclose(other, lam, rtol=1e-6, atol=1e-6 * np.abs(lam).max())
        for side in ("q_a", "q_s"):  # eigenvectors up to sign (well-separated eigenvalues only would be stricter)
            q, q_ref = ours["factors"][name][side], fields[side]
            if q_ref is not None:
                np.testing.assert_allclose(np.abs(q.T @ q_ref).max(axis=0), 1, atol=1e-4)
    # the model fingerprint reads offloaded weights through the hooks: the stores are interchangeable
    manifests = [GradientStore.open(path).manifest for path in (single.store.path, dispatched.store.path)]
    assert manifests[0].fingerprints == manifests[1].fingerprints
    answers = {}
    for name, config in (("single", single), ("device_map", dispatched)):
        out = tmp_path / f"{name}.jsonl"
        answers[name] = run_query(config, str(queries), 4, out=str(out))
    np.testing.assert_allclose(
        answers["device_map"].top_scores,
        answers["single"].top_scores,
        rtol=1e-6,
        atol=1e-6 * np.abs(answers["single"].top_scores).max(),
    )
    assert np.array_equal(answers["device_map"].top_indices, answers["single"].top_indices)
    # a store built with device_map answers a query that loads the model whole, and the answers agree
    crossed = parse_config(dict(single_raw, store=dispatched_raw["store"]))
    again = run_query(crossed, str(queries), 4, out=str(tmp_path / "crossed.jsonl"))
    assert np.array_equal(again.top_indices, answers["single"].top_indices)
    assert json.loads((tmp_path / "device_map.jsonl").read_text().splitlines()[0])["id"] == "q0"


def test_merged_adapter_with_offload_is_refused_before_anything_is_written(tmp_path, tiny_models, lora_adapters, train):
    from engine.errors import TributaryError

    _, raw = _configs(tmp_path, tiny_models["llama"], lora_adapters["llama"], train)
    raw["model"]["adapter_mode"] = "merged"
    with pytest.raises(TributaryError, match="adapter_mode merged"):
        run_index(parse_config(raw), show_progress=False)
    assert not Path(raw["store"]["path"]).exists()


def test_bf16_rows_follow_float32_rows(tmp_path, tiny_models, train, queries):
    """bf16 weights, float32 projections and losses: each row correlates with the float32 row (Pearson ≥ 0.999)
    and the top-10 lists agree; the store keeps its configured dtype."""
    from engine.testing.tiny import save_tiny
    from tests.conftest import vocabulary_texts

    model = save_tiny(tmp_path / "wider", "llama", vocabulary_texts(), hidden=64, layers=2, heads=4, seed=1)
    rows = write_jsonl(tmp_path / "many.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES * 2)])
    stores = {}
    for dtype in ("float32", "bfloat16"):
        raw = store_config(model, rows, str(tmp_path / f"{dtype}.zarr"), projection={"dim": 8})
        raw["placement"] = {"dtype": dtype}
        config = parse_config(raw)
        run_index(config, show_progress=False)
        stores[dtype] = (config, store_contents(config.store.path))
    reference, ours = stores["float32"][1]["grads"], stores["bfloat16"][1]["grads"]
    assert ours.dtype == np.float32  # store.dtype float32, whatever the weights
    pearson = [np.corrcoef(a, b)[0, 1] for a, b in zip(ours, reference)]
    assert min(pearson) >= 0.999, pearson
    answers = {
        dtype: run_query(config, str(queries), 10, out=str(tmp_path / f"{dtype}.jsonl"))
        for dtype, (config, _) in stores.items()
    }
    for ours_top, reference_top in zip(answers["bfloat16"].top_indices, answers["float32"].top_indices):
        assert set(ours_top) == set(reference_top)
    context = load_model_context(stores["bfloat16"][0])
    assert next(context.model.parameters()).dtype == torch.bfloat16
    assert context.capture.compute_dtype == torch.float32
