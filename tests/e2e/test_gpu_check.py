"""launch/gpu_check.sh's script, checked on CPU (`--cpu-dry-run`): every step indexes and queries, and its figures
are consistent with the store it built."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_check


@pytest.mark.parametrize("steps", ["single_bf16,single_bf16_lora,device_map_offload"])
def test_gpu_check_dry_run_writes_every_step(tmp_path, steps):
    assert gpu_check.main(["--cpu-dry-run", "--rows", "12", "--out", str(tmp_path), "--steps", steps]) == 0
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"] is True
    assert list(summary["steps"]) == steps.split(",")
    for name, figures in summary["steps"].items():
        assert json.loads((tmp_path / f"gpu_{name}.json").read_text()) == figures
        assert figures["rows"] == 12 and figures["queries"] == 4
        assert figures["index_tokens_per_s"] == pytest.approx(figures["tokens"] / figures["index_passes_s"], rel=2e-2)
        assert figures["bare_tokens_per_s"] > 0
    assert summary["steps"]["device_map_offload"]["placement"]["kind"] == "device_map"


def test_gpu_check_records_a_step_that_cannot_run_and_goes_on(tmp_path, monkeypatch):
    from engine.errors import TributaryError

    index_and_query = gpu_check._index_and_query

    def refuse_device_map(raw, queries, work):
        if raw["placement"]["kind"] == "device_map":
            raise TributaryError("placement.kind device_map: refused here")
        return index_and_query(raw, queries, work)

    monkeypatch.setattr(gpu_check, "_index_and_query", refuse_device_map)
    steps_run = "device_map_offload,single_bf16"
    assert gpu_check.main(["--cpu-dry-run", "--rows", "12", "--out", str(tmp_path), "--steps", steps_run]) == 0
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert steps["device_map_offload"]["error"] == "placement.kind device_map: refused here"
    assert steps["single_bf16"]["rows"] == 12


@pytest.mark.heavy
def test_gpu_check_dry_run_zero3_indexes_on_two_gloo_ranks_and_queries_the_store(tmp_path):
    import ray

    try:
        assert gpu_check.main(["--cpu-dry-run", "--rows", "12", "--out", str(tmp_path), "--steps", "zero3"]) == 0
    finally:
        ray.shutdown()
    figures = json.loads((tmp_path / "gpu_zero3.json").read_text())
    assert figures["placement"]["kind"] == "zero3" and figures["placement"]["devices_per_replica"] == 2
    assert figures["rows"] == 12 and figures["queries"] == 4
    assert figures["index_tokens_per_s"] == pytest.approx(figures["tokens"] / figures["index_passes_s"], rel=2e-2)


def test_gpu_check_without_a_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real check runs here")
    assert gpu_check.main([]) == 2
    assert "--cpu-dry-run" in capsys.readouterr().err
