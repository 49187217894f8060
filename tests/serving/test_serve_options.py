"""`tributary serve CONFIG --port ...`: the command line's serve settings over a config's, every other setting
kept as the file gave it. A config whose rules read what was given (cluster.node_wait_s is for min_nodes,
projection.budget replaces dim) must come through unchanged, not be refused for defaults it never set."""

from __future__ import annotations

import pytest

from engine.config import parse_config
from engine.errors import TributaryError
from engine.serving.service import with_serve_options

RAW = {
    "model": {"path": "/models/tiny"},
    "data": {"train": "/data/train.jsonl"},
    "store": {"path": "/stores/store.zarr"},
    "projection": {"budget": {"numbers_per_row": 64, "measured_on": "/stores/measured.zarr"}},
    "cluster": {"address": "local", "workers": 2, "cpus_per_worker": 1},
    "serve": {"port": 8000, "batch_wait_s": 0.05},
}


def test_command_line_serve_settings_replace_the_files_and_keep_the_rest():
    config = parse_config(RAW, source="job.yaml")
    served = with_serve_options(config, "job.yaml", port=23456, host=None, batch_max_queries=128)
    expected = parse_config(dict(RAW, serve={"port": 23456, "batch_wait_s": 0.05, "batch_max_queries": 128}))
    assert served == expected
    assert with_serve_options(config, "job.yaml", port=None) is config


def test_a_bad_command_line_setting_is_refused_naming_it():
    config = parse_config(RAW, source="job.yaml")
    with pytest.raises(TributaryError, match="serve.port") as refused:
        with_serve_options(config, "job.yaml", port=-1)
    assert "job.yaml" in str(refused.value)
