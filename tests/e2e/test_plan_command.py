"""`tributary plan CONFIG [--queries Q]`: what index or query would run, read and write, with nothing loaded or
written. The row width is checked against the tiny model's own parameter shapes, the byte estimate against
the store the index then writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from engine.store import GradientStore
from engine.store.sizes import format_bytes
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import SENTENCES, job_config, write_jsonl


def _lines(output: str) -> dict[str, str]:
    """`what  value` lines -> {what: value} (the widest label sets the column)."""
    parsed = {}
    for line in output.splitlines():
        what, _, value = line.partition("  ")
        parsed[what.strip()] = value.strip()
    return parsed


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.fixture
def tiny(tmp_path, tiny_models) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(tmp_path, tiny_models["gpt2"], train)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    width = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if type(m) is Conv1D)
    return {"root": tmp_path, "raw": raw, "config": config, "width": width, "train": train}


def test_index_plan_names_the_work_and_writes_nothing(tiny):
    before = _files(tiny["root"])
    result = invoke("plan", tiny["config"])
    assert result.exit_code == 0, result.output
    assert _files(tiny["root"]) == before
    lines = _lines(result.output)
    rows, width = len(SENTENCES), tiny["width"]
    assert lines["command"] == "index" and lines["method"] == "if"
    assert lines["store"] == tiny["raw"]["store"]["path"]
    assert lines["store.path holds"] == "nothing (a new store)"
    assert lines["training rows"] == f"{rows} in {tiny['train']}"
    assert lines["row width"].startswith(f"{width} (float64)")
    assert lines["store bytes"] == format_bytes(rows * width * 8) + " of rows"
    # EK-FAC, dim 0, true Fisher: Λ from a second model pass (curvature.lambdas auto)
    assert lines["pass 1"].startswith("gradients") and "covariances" in lines["pass 1"]
    assert lines["pass 3"] == "Λ: a second forward and backward per row"
    assert lines["writes"] == tiny["raw"]["store"]["path"]

    index = invoke("index", tiny["config"], "--no-progress")
    assert index.exit_code == 0, index.output
    store = GradientStore.open(tiny["raw"]["store"]["path"])
    assert (store.manifest.rows, store.manifest.width) == (rows, width)
    assert (
        f"{-(-rows // store.manifest.rows_per_chunk)} of up to {store.manifest.rows_per_chunk} rows" == lines["shards"]
    )
    assert _lines(invoke("plan", tiny["config"]).output)["store.path holds"].startswith("a complete store")


def test_query_plan_names_store_queries_and_outputs(tiny):
    assert invoke("index", tiny["config"], "--no-progress").exit_code == 0
    queries = write_jsonl(tiny["root"] / "queries.jsonl", [{"id": "q", "text": SENTENCES[0]}, {"text": "a fox"}])
    before = _files(tiny["root"])
    result = invoke("plan", tiny["config"], "--queries", queries, "--method", "grad_dot")
    assert result.exit_code == 0, result.output
    assert _files(tiny["root"]) == before
    lines = _lines(result.output)
    assert lines["command"] == "query" and lines["method"] == "grad_dot"
    assert lines["queries"] == f"2 from {queries}"
    assert lines["training rows"] == str(len(SENTENCES))
    assert lines["store bytes"].startswith(format_bytes(len(SENTENCES) * tiny["width"] * 8))
    assert lines["ranking"] == "exact scan of the stored rows"
    assert lines["writes"].startswith("nothing")


def test_a_bad_config_or_request_is_one_clean_line(tiny, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(tiny["raw"], store=dict(tiny["raw"]["store"], colour="red"))))
    assert_clean_failure(invoke("plan", bad), "store.colour: unknown key")
    assert_clean_failure(invoke("plan", tmp_path / "missing.yaml"), "does not exist")
    assert_clean_failure(invoke("plan", tiny["config"], "--method", "nope"), "unknown method 'nope'")
    # a query plan needs a complete store: none is there yet
    assert_clean_failure(invoke("plan", tiny["config"], "--queries", tiny["train"]), "store", "tributary index")
