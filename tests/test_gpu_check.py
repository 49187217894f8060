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


def test_gpu_check_records_a_step_that_cannot_run_and_goes_on(tmp_path):
    assert (
        gpu_check.main(["--cpu-dry-run", "--rows", "12", "--out", str(tmp_path), "--steps", "zero3,single_bf16"]) == 0
    )
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert "placement.kind zero3" in steps["zero3"]["error"]
    assert steps["single_bf16"]["rows"] == 12


def test_gpu_check_without_a_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real check runs here")
    assert gpu_check.main([]) == 2
    assert "--cpu-dry-run" in capsys.readouterr().err
