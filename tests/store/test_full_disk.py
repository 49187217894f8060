"""A full disk under `tributary index`: the store on a small tmpfs (mounted here as root; CI runs as root) that
fills mid-index. The index stops with one line naming the store and the bytes still needed; nothing half-written
is recorded as done (every committed shard verifies); once space is freed, the same command resumes to a store
bit-identical to a clean run's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.store import GradientStore
from tests.cli_helpers import invoke
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import one_torch_thread, store_config, store_contents, write_config

SMALL = "128k"  # a fraction of the store's ~0.5 MB: fills while the gradient shards are written
ENOUGH = "8m"


def _mount(path: Path, size: str, remount: bool = False) -> None:
    options = f"{'remount,' if remount else ''}size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        _mount(mount, SMALL)
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot mount a tmpfs here ({error.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.heavy
def test_a_full_disk_stops_with_one_line_and_resumes_to_the_clean_store(tiny_models, tmp_path, small_disk):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(SENTENCES)])
    sections = {"projection": {"dim": 0}}  # full-width rows (float32, shards of 3): a store of ~0.5 MB
    clean = tmp_path / "clean.zarr"
    full = small_disk / "store.zarr"
    clean_config = write_config(
        tmp_path / "clean.yaml", store_config(tiny_models["gpt2"], train, str(clean), **sections)
    )
    config = write_config(tmp_path / "full.yaml", store_config(tiny_models["gpt2"], train, str(full), **sections))

    with one_torch_thread():
        assert invoke("index", clean_config, "--no-progress").exit_code == 0
        stopped = invoke("index", config, "--no-progress")
    # the coverage report (issue 28) is logged before pass 1; what the disk failure adds is the error line alone
    _, marker, error = stopped.output.partition("error:")
    lines = [marker + line for line in error.splitlines() if line.strip()]
    assert stopped.exit_code == 2 and len(lines) == 1 and "Traceback" not in stopped.output, stopped.output
    assert f"store.path {full}: the file system is full (No space left on device" in lines[0]
    needed = re.search(r"about ([\d,]+) bytes more are needed", lines[0])
    assert needed is not None, lines[0]
    on_disk = sum(f.stat().st_size for f in clean.rglob("*") if f.is_file())
    assert 0 < int(needed.group(1).replace(",", "")) <= 2 * on_disk

    # nothing half-written is recorded done: every committed shard re-reads to its recorded checksums
    opened = GradientStore.open(str(full))
    committed = opened.manifest.shards.get("gradients", {})
    assert not opened.manifest.complete and len(committed) < len(opened.shards())
    for shard in committed:
        assert opened.shard_checksum(shard) == committed[shard].checksum
    assert not list(full.rglob("*.partial")), "a temporary chunk file was left behind"

    _mount(small_disk, ENOUGH, remount=True)
    with one_torch_thread():
        resumed = invoke("index", config, "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    ours, reference = store_contents(str(full)), store_contents(str(clean))
    np.testing.assert_array_equal(ours["grads"], reference["grads"])
    assert ours["ids"] == reference["ids"]
    for name, fields in reference["factors"].items():
        for field, values in fields.items():
            np.testing.assert_array_equal(ours["factors"][name][field], values, err_msg=f"{name}.{field}")
    verify = invoke("info", full, "--verify")
    assert verify.exit_code == 0 and json.loads(verify.stdout)["verify"]["problems"] == [], verify.output
