"""A local index (no `cluster` section) runs without Ray: importing Ray only to find it not running cost the
index about 45 MB of its peak memory (issue 13's memory goal)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import SENTENCES, job_config, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = """
import sys
import yaml
from engine.config import parse_config
from engine.local_or_ray import run_index
run_index(parse_config(yaml.safe_load(open(sys.argv[1]))), overwrite=True)
print("ray imported:", "ray" in sys.modules)
"""


def test_a_local_index_does_not_import_ray(tiny_models, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job_config(tmp_path, tiny_models["gpt2"], train)))
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(config)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ray imported: False" in result.stdout
