"""Training and query rows from Parquet files (one, or a glob of several) and from a `datasets.save_to_disk`
directory: the same store, bit for bit, as the JSONL file of the same rows; bad rows and bad paths are errors
that name the file and row (or the key and the fix) before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.config import parse_config
from engine.data.rows import FieldNames, iter_rows, read_rows, row_count, rows_between
from engine.errors import TributaryError
from engine.local_or_ray import run_index, run_query
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl
from tests.distributed_helpers import one_torch_thread, store_contents
from tests.requirements import require

pq = require("pyarrow.parquet")
pa = require("pyarrow")
datasets = require("datasets")

# text rows and prompt/completion rows mixed: in a table the absent fields are nulls
ROWS = [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)] + [
    {"id": f"p{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)
]
QUERIES = [
    {"id": "q0", "text": "the fox eats clams in the snow"},
    {"id": "q1", "prompt": "the owl", "completion": " eats"},
]


def _table(rows: list[dict]):
    columns = ["id", "text", "prompt", "completion"]
    return pa.table({c: pa.array([row.get(c) for row in rows], type=pa.string()) for c in columns})


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 3) -> Path:
    pq.write_table(_table(rows), path, row_group_size=row_group_size)
    return path


def save_dataset(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset(_table(rows)).save_to_disk(str(path))
    return path


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    """The same rows as JSONL, one Parquet file, three Parquet files (a glob) and a save_to_disk directory."""
    parts = tmp_path / "parts"
    parts.mkdir()
    for number, start in enumerate(range(0, len(ROWS), 4)):
        write_parquet(parts / f"part-{number:02d}.parquet", ROWS[start : start + 4])
    return {
        "jsonl": str(write_jsonl(tmp_path / "train.jsonl", ROWS)),
        "parquet": str(write_parquet(tmp_path / "train.parquet", ROWS)),
        "glob": str(parts / "part-*.parquet"),
        "save_to_disk": str(save_dataset(tmp_path / "saved", ROWS)),
    }


def _raw(tmp_path: Path, model: Path, train: str, name: str) -> dict:
    raw = job_config(tmp_path, model, Path(train), store={"path": str(tmp_path / f"{name}.zarr")})
    raw["projection"] = {"dim": 4, "seed": 1}
    raw["store"]["rows_per_chunk"] = 4  # several shards, so workers read row ranges across file boundaries
    return raw


def _index(tmp_path: Path, model: Path, train: str, name: str) -> dict:
    run_index(parse_config(_raw(tmp_path, model, train, name)), show_progress=False)
    return store_contents(str(tmp_path / f"{name}.zarr"))


def test_rows_are_the_jsonl_rows_whatever_the_format(sources):
    reference = read_rows(sources["jsonl"])
    for kind in ("parquet", "glob", "save_to_disk"):
        rows = read_rows(sources[kind])
        assert [(r.id, r.text, r.prompt, r.completion) for r in rows] == [
            (r.id, r.text, r.prompt, r.completion) for r in reference
        ], kind
        assert row_count(sources[kind]) == len(ROWS)
        middle = rows_between(sources[kind], FieldNames(), 3, 9)  # crosses row groups and files
        assert [r.id for r in middle] == [r.id for r in reference[3:9]]
        assert [r.index for r in middle] == list(range(3, 9))


@pytest.mark.parametrize("kind", ["parquet", "glob", "save_to_disk"])
def test_the_store_equals_the_jsonl_store(kind, sources, tiny_models, tmp_path):
    reference = _index(tmp_path, tiny_models["gpt2"], sources["jsonl"], "jsonl")
    ours = _index(tmp_path, tiny_models["gpt2"], sources[kind], kind)
    assert ours["ids"] == reference["ids"]
    np.testing.assert_array_equal(ours["grads"], reference["grads"])
    np.testing.assert_array_equal(ours["meta"]["num_tokens"], reference["meta"]["num_tokens"])
    for name, fields in reference["factors"].items():
        for field, value in fields.items():
            np.testing.assert_array_equal(ours["factors"][name][field], value)


def test_parquet_queries_score_as_jsonl_queries(sources, tiny_models, tmp_path):
    _index(tmp_path, tiny_models["llama"], sources["parquet"], "store")
    config = parse_config(_raw(tmp_path, tiny_models["llama"], sources["parquet"], "store"))
    as_jsonl = run_query(config, str(write_jsonl(tmp_path / "q.jsonl", QUERIES)), k=3)
    out = tmp_path / "answers.jsonl"
    as_parquet = run_query(config, str(write_parquet(tmp_path / "q.parquet", QUERIES)), k=3, out=str(out))
    np.testing.assert_array_equal(as_parquet.top_indices, as_jsonl.top_indices)
    np.testing.assert_array_equal(as_parquet.top_scores, as_jsonl.top_scores)
    shown = {row["id"]: row.get("text") or row["completion"] for row in ROWS}
    for record in map(json.loads, out.read_text().splitlines()):  # snippets read back from the Parquet file
        for hit in record["top_k"]:
            assert shown[hit["id"]].startswith(hit["snippet"])


def test_the_fingerprint_follows_the_rows(sources, tmp_path):
    from engine.data.rows import dataset_fingerprint

    before = dataset_fingerprint(sources["parquet"])
    assert dataset_fingerprint(sources["parquet"]) == before
    changed = [dict(r) for r in ROWS]
    changed[4]["text"] = "the fox eats something else"
    write_parquet(Path(sources["parquet"]), changed)
    assert dataset_fingerprint(sources["parquet"]) != before


def test_a_bad_row_names_the_file_and_row(tmp_path):
    bad = write_parquet(tmp_path / "bad.parquet", ROWS[:5] + [{"id": "x"}] + ROWS[5:])
    with pytest.raises(TributaryError, match=r"bad\.parquet row 6: row has neither 'text'"):
        list(iter_rows(str(bad)))
    empty = write_parquet(tmp_path / "empty_text.parquet", [{"id": "a", "text": "ok"}, {"id": "b", "text": " "}])
    with pytest.raises(TributaryError, match=r"empty_text\.parquet row 2: field 'text' is empty"):
        read_rows(str(empty))
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": [1, 2]}), numbers)
    with pytest.raises(TributaryError, match=r"numbers\.parquet row 1: field 'text' must be a string"):
        read_rows(str(numbers))
    columns = tmp_path / "columns.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["x y"]}), columns)
    with pytest.raises(TributaryError, match=r"its columns are \['id', 'body'\], none of them 'text'"):
        read_rows(str(columns))
    twice = write_parquet(tmp_path / "twice.parquet", [{"id": "a", "text": "x y"}, {"id": "a", "text": "y z"}])
    with pytest.raises(TributaryError, match=r"twice\.parquet row 2: id 'a' already used at .*twice\.parquet row 1"):
        read_rows(str(twice))


def test_bad_paths_are_refused_before_anything_is_written(tmp_path, tiny_models):
    not_saved = tmp_path / "plain_dir"
    not_saved.mkdir()
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"not parquet at all")
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset(_table(ROWS))}).save_to_disk(str(splits))
    cases = {
        str(tmp_path / "nothing-*.parquet"): "matches no files",
        str(not_saved): "not one written by datasets' save_to_disk",
        str(fake): "is not a Parquet file",
        str(splits): r"holds a DatasetDict \(splits train\); point data.train at one split",
        str(tmp_path / "missing.parquet"): "does not exist",
    }
    for train, message in cases.items():
        raw = job_config(tmp_path, tiny_models["gpt2"], Path(train))
        with pytest.raises(TributaryError, match=message):
            run_index(parse_config(raw), show_progress=False)
        assert not (tmp_path / "store.zarr").exists(), train


def test_a_save_to_disk_dataset_with_several_arrow_files(tmp_path):
    path = tmp_path / "sharded"
    datasets.Dataset(_table(ROWS)).save_to_disk(str(path), num_shards=3)
    state = json.loads((path / "state.json").read_text())
    assert len(state["_data_files"]) == 3
    assert [r.id for r in read_rows(str(path))] == [r["id"] for r in ROWS]
    assert [r.id for r in rows_between(str(path), FieldNames(), 2, 7)] == [r["id"] for r in ROWS[2:7]]


def test_two_ray_workers_read_their_row_ranges_of_a_parquet_glob(sources, tiny_models, tmp_path):
    ray = require("ray")
    with one_torch_thread():  # bitwise equality is claimed at the workers' thread count (BLAS rounds by it)
        reference = _index(tmp_path, tiny_models["gpt2"], sources["jsonl"], "jsonl")
    raw = _raw(tmp_path, tiny_models["gpt2"], sources["glob"], "ray")
    raw["cluster"] = {"address": "local", "workers": 2, "cpus_per_worker": 1, "local_cpus": 2}
    try:
        run_index(parse_config(raw), show_progress=False)
    finally:
        ray.shutdown()
    ours = store_contents(str(tmp_path / "ray.zarr"))
    assert ours["ids"] == reference["ids"]
    np.testing.assert_array_equal(ours["grads"], reference["grads"])
