"""A store replaced, removed or rewritten under a long-lived reader (an `Attributor` kept across batches, and
`tributary serve`) is refused with StoreChanged (503 from the service), never scored with the old store's ids
and factors over the new rows; and the identity that check compares (store id + completion record), also
for stores written before stores had an id.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from engine.config import QueryOptions, parse_config
from engine.data.rows import Row
from engine.local_or_ray import run_index
from engine.query.attributor import Attributor, QueryGroup
from engine.store import GradientStore
from engine.store.identity import StoreChanged, check_unchanged, identity_at, identity_of
from engine.store.location import remove
from tests.cli_helpers import invoke
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl
from tests.distributed_helpers import local_ray
from tests.ports import unused_port

FIXTURE = Path(__file__).parents[1] / "fixtures" / "store_v1"
QUERIES = [{"id": f"q{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)]


def _raw(root: Path, model: Path, seed: int) -> dict:
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    return job_config(root, model, train, projection={"dim": 4, "seed": seed}, store={"rows_per_chunk": 3})


def _cli_records(root: Path, raw: dict, name: str) -> list[dict]:
    """`tributary query` on the store as it is now, in a fresh process state."""
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    queries = write_jsonl(root / "queries.jsonl", QUERIES)
    out = root / f"{name}.jsonl"
    result = invoke("query", config, "--queries", queries, "--top-k", 3, "--out", out)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in out.read_text().splitlines()]


def _attribute(attributor: Attributor) -> list[dict]:
    rows = [
        Row(index=i, id=q["id"], line=i, prompt=q["prompt"], completion=q["completion"]) for i, q in enumerate(QUERIES)
    ]
    queries = attributor.queries_from_rows(rows, "queries")
    (result,) = attributor.attribute([QueryGroup(queries, QueryOptions(k=3), attributor.method())])
    assert result.records is not None
    return result.records


def _ranking(records: list[dict]) -> list[list[str]]:
    return [[entry["id"] for entry in record["top_k"]] for record in records]


def test_new_stores_have_an_id_and_an_overwrite_gives_a_new_one(tiny_models, tmp_path):
    raw = _raw(tmp_path, tiny_models["gpt2"], seed=0)
    run_index(parse_config(raw), show_progress=False)
    first = identity_at(raw["store"]["path"])
    run_index(parse_config(raw), overwrite=True, show_progress=False)
    second = identity_at(raw["store"]["path"])
    assert first is not None and second is not None
    assert first.store_id and second.store_id and first.store_id != second.store_id
    assert len(first.store_id) == 36 and first.store_id.count("-") == 4  # a uuid4's text
    assert first.completion == second.completion, "same inputs: the same rows and checksums"


def test_a_kept_attributor_refuses_a_store_replaced_under_it(tiny_models, tmp_path):
    raw = _raw(tmp_path, tiny_models["gpt2"], seed=0)
    run_index(parse_config(raw), show_progress=False)
    attributor = Attributor.load(parse_config(raw))
    before = _attribute(attributor)
    assert before == _cli_records(tmp_path, raw, "old")

    replaced = dict(raw, projection={"dim": 4, "seed": 1})
    run_index(parse_config(replaced), overwrite=True, show_progress=False)
    with pytest.raises(StoreChanged, match="was replaced since this process loaded it") as caught:
        _attribute(attributor)
    assert identity_at(raw["store"]["path"]).store_id in str(caught.value)  # type: ignore[union-attr]


def test_a_pass_while_the_store_is_absent_or_incomplete_is_refused(tiny_models, tmp_path):
    raw = _raw(tmp_path, tiny_models["gpt2"], seed=0)
    run_index(parse_config(raw), show_progress=False)
    path = raw["store"]["path"]
    attributor = Attributor.load(parse_config(raw))
    _attribute(attributor)

    backup = tmp_path / "backup.zarr"
    shutil.copytree(path, backup)
    GradientStore.open(path, mode="r+").update_manifest(complete=False)  # what an overwrite in progress leaves
    with pytest.raises(StoreChanged, match="removed or is being rewritten"):
        _attribute(attributor)
    remove(path)
    with pytest.raises(StoreChanged, match="removed or is being rewritten"):
        _attribute(attributor)
    shutil.copytree(backup, path)  # the same store back: the same identity, scored again
    assert _attribute(attributor) == _cli_records(tmp_path, raw, "back")


def test_the_identity_of_a_store_without_an_id_is_its_completion_record(tmp_path):
    store_path = tmp_path / "store.zarr"
    shutil.copytree(FIXTURE / "store.zarr", store_path)
    store = GradientStore.open(str(store_path))
    loaded = identity_of(store.manifest)
    assert loaded.store_id is None and identity_at(str(store_path)) == loaded
    check_unchanged(str(store_path), loaded)
    commits = store.manifest.shards["gradients"]
    edited = {**commits, 1: commits[1].model_copy(update={"checksum": "0" * 64})}
    GradientStore.open(str(store_path), mode="r+").update_manifest(
        shards={**store.manifest.shards, "gradients": edited}
    )
    with pytest.raises(StoreChanged, match="was replaced"):
        check_unchanged(str(store_path), loaded)


# ---- the service ------------------------------------------------------------------------------------


@pytest.mark.requires_ray_serve
def test_the_service_answers_503_naming_the_change_after_an_overwrite(tiny_models, tmp_path):
    from engine.serving.client import AttributionClient, ServiceError
    from engine.serving.service import start_service, stop_service

    raw = _raw(tmp_path, tiny_models["gpt2"], seed=0)
    run_index(parse_config(raw), show_progress=False)
    old = _cli_records(tmp_path, raw, "old")
    served = dict(raw, serve={"port": unused_port(), "replica_cpus": 0.5, "batch_wait_s": 0.01})
    body = [{"id": q["id"], "prompt": q["prompt"], "completion": q["completion"]} for q in QUERIES]
    with local_ray():
        try:
            url = start_service(parse_config(served))
            with AttributionClient(url, timeout=60) as client:
                assert _ranking(client.attribute(body, top_k=3)) == _ranking(old)
                replaced = dict(raw, projection={"dim": 4, "seed": 1})
                run_index(parse_config(replaced), overwrite=True, show_progress=False)
                new = _cli_records(tmp_path, replaced, "new")
                try:
                    answer = client.attribute(body, top_k=3)
                except ServiceError as error:
                    assert error.status == 503, error.body
                    assert set(error.body) == {"error"}
                    assert "was replaced since this process loaded it" in error.body["error"]
                    assert identity_at(raw["store"]["path"]).store_id in error.body["error"]  # type: ignore[union-attr]
                else:  # a service that reloads must answer exactly what the new store answers
                    assert _ranking(answer) == _ranking(new)
        finally:
            stop_service()
