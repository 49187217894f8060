"""Every bad placement is refused with a message naming the key and the fix, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import parse_config
from engine.errors import TributaryError
from engine.local_or_ray import run_index
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import run_cli, store_config, write_config


@pytest.fixture
def base(tmp_path, tiny_models) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    return store_config(tiny_models["llama"], train, str(tmp_path / "store.zarr"))


def _refused(raw: dict, match: str) -> None:
    with pytest.raises(TributaryError, match=match):
        run_index(parse_config(raw, source="job.yaml"), show_progress=False)
    assert not Path(raw["store"]["path"]).exists(), "a refused placement wrote the store"


def test_unknown_kind_names_the_key(base):
    with pytest.raises(TributaryError, match=r"placement\.kind: Input should be 'single', 'device_map' or 'zero3'"):
        parse_config(dict(base, placement={"kind": "fsdp"}), source="job.yaml")


def test_more_devices_than_exist(base):
    devices = torch.cuda.device_count() + 2
    _refused(
        dict(base, placement={"kind": "device_map", "devices_per_replica": devices}),
        rf"placement.devices_per_replica is {devices} but a node here has .*set placement.devices_per_replica",
    )


def test_several_devices_for_single_is_a_config_error(base):
    with pytest.raises(TributaryError, match="placement.devices_per_replica is 2 but placement.kind single"):
        parse_config(dict(base, placement={"devices_per_replica": 2}), source="job.yaml")


def test_offload_for_another_kind(base):
    with pytest.raises(TributaryError, match="placement.offload is for placement.kind device_map, not zero3"):
        parse_config(dict(base, placement={"kind": "zero3", "offload": "cpu"}, cluster={}), source="job.yaml")


def test_offload_directory_that_is_a_file(base, tmp_path):
    blocker = tmp_path / "offload-file"
    blocker.write_text("not a directory")
    _refused(dict(base, placement={"kind": "device_map", "offload": str(blocker)}), "is a file, not a directory")
    _refused(
        dict(base, placement={"kind": "device_map", "offload": str(blocker / "below")}),
        r"placement.offload .*below is not writable \(at .*offload-file\); give a writable directory",
    )


def test_zero3_without_torch_distributed(base, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    _refused(
        dict(base, placement={"kind": "zero3", "devices_per_replica": 2}, cluster={"address": "local"}),
        "placement.kind zero3 needs torch.distributed",
    )


def test_zero3_without_a_cluster_section(base):
    with pytest.raises(TributaryError, match="placement.kind zero3 runs its ranks as Ray actors; add a cluster"):
        parse_config(dict(base, placement={"kind": "zero3", "devices_per_replica": 2}), source="job.yaml")


def test_cli_gives_one_line_and_exit_code_2(base, tmp_path):
    config = write_config(tmp_path / "job.yaml", dict(base, placement={"kind": "device_map", "devices_per_replica": 9}))
    result = run_cli("index", str(config))
    assert result.returncode == 2, result.stderr
    assert "placement.devices_per_replica is 9" in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(base["store"]["path"]).exists()
