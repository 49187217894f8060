"""Every config shipped in configs/ is valid against the job schema (unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.config import parse_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert {path.name for path in CONFIGS} >= {"tiny.yaml", "gpt2-cluster.yaml", "llama-lora-cluster.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_shipped_config_validates(path):
    raw = yaml.safe_load(path.read_text())
    config = parse_config(raw, source=str(path))
    assert config.model_dump(exclude_unset=True).keys() == raw.keys()
