"""`tributary index` on a one-machine Ray cluster prints its progress and result, not notices about the expected
state of the machine: Ray's token-authentication announcement (the local cluster is loopback-only, token on)
and DeepSpeed's CPU-fallback warning (accelerate imports DeepSpeed whenever transformers loads a model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import SENTENCES, job_config, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def test_a_local_cluster_index_prints_no_ray_or_deepspeed_notices(tiny_models, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(tmp_path, tiny_models["gpt2"], train)
    raw["cluster"] = {"address": "local", "workers": 1, "cpus_per_worker": 1, "local_cpus": 2}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    environment = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default: tokens on
    environment["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "index", str(config), "--no-progress"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "indexed" in output and "store:" in output
    assert "Token authentication is enabled" not in output
    assert "Setting accelerator to CPU" not in output
    assert "Traceback" not in output
