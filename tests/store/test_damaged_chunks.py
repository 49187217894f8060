"""Nothing is scored from bytes other than the ones written: a deleted or altered chunk of rows, factors or partial
sums stops `tributary query`, the Attributor (what `serve` runs), the exact rescoring of candidates and
`ann build` with one line naming the chunk and `info --verify`, where Zarr alone reads fill values (rows scored
0.0) or the altered bytes. An older store (no per-chunk checksum, all-zero chunks never written) still reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from engine.errors import TributaryError
from engine.store import GradientStore
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import PROMPTS, SENTENCES, write_jsonl
from tests.distributed_helpers import single_thread_store, store_config
from tests.requirements import require

QUERIES = [{"id": f"q{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory) -> tuple[Path, dict]:
    """8 rows in shards of 3, and the config that built them."""
    root = tmp_path_factory.mktemp("damaged")
    train = write_jsonl(root / "train.jsonl", [{"id": f"r{i}", "text": text} for i, text in enumerate(SENTENCES)])
    store = root / "store.zarr"
    single_thread_store(tiny_models["gpt2"], train, str(store))
    return store, store_config(tiny_models["gpt2"], train, str(store))


@pytest.fixture
def copy(built, tmp_path) -> tuple[Path, Path]:
    """A copy of the store, and a config pointing at it."""
    source, raw = built
    store = tmp_path / "store.zarr"
    shutil.copytree(source, store)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({**raw, "store": {**raw["store"], "path": str(store)}}))
    return store, config


def _query(tmp_path: Path, config: Path):
    queries = write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    return invoke("query", config, "--queries", queries, "--top-k", 8, "--out", tmp_path / "out.jsonl")


def _flip_byte(chunk: Path, offset: int = 17) -> None:
    data = bytearray(chunk.read_bytes())
    data[offset] ^= 0x01
    chunk.write_bytes(bytes(data))


def test_an_intact_store_queries(copy, tmp_path):
    result = _query(tmp_path, copy[1])
    assert result.exit_code == 0, result.output


def test_a_deleted_grads_chunk_stops_the_query_naming_it(copy, tmp_path):
    store, config = copy
    (store / "grads" / "c" / "1" / "0").unlink()
    result = _query(tmp_path, config)
    assert_clean_failure(result, "grads/c/1/0 (rows 3..5)", "is missing", "tributary info --verify")
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text().strip()


def test_a_flipped_byte_in_grads_stops_the_query_naming_the_chunk(copy, tmp_path):
    store, config = copy
    _flip_byte(store / "grads" / "c" / "2" / "0")
    result = _query(tmp_path, config)
    assert_clean_failure(result, "grads/c/2/0 (rows 6..7)", "checksum", "tributary info --verify")


def test_every_reader_of_rows_refuses_a_missing_chunk(copy):
    """The scan (query, serve's row-range scorers), the rescoring of ANN candidates, the ids and metadata."""
    store, _ = copy
    (store / "grads" / "c" / "1" / "0").unlink()
    (store / "rows" / "loss" / "c" / "2").unlink()
    opened = GradientStore.open(str(store))
    with pytest.raises(TributaryError, match=r"grads/c/1/0 \(rows 3\.\.5\) is missing"):
        list(opened.iter_chunks())
    with pytest.raises(TributaryError, match=r"grads/c/1/0 \(rows 3\.\.5\) is missing"):
        opened.read_row_selection(np.array([7, 4, 0]))
    assert opened.read_row_selection(np.array([7, 0])).shape[0] == 2, "rows in intact chunks still read"
    with pytest.raises(TributaryError, match=r"rows/loss/c/2 \(rows 6\.\.7\) is missing"):
        opened.row_metadata()


def test_the_attributor_that_serve_runs_refuses_a_damaged_chunk(copy):
    from engine.config import QueryOptions, parse_config
    from engine.data.rows import Row
    from engine.query.attributor import Attributor, QueryGroup

    store, config = copy
    _flip_byte(store / "grads" / "c" / "0" / "0", offset=3)
    attributor = Attributor.load(parse_config(yaml.safe_load(config.read_text())))
    rows = [
        Row(index=i, id=q["id"], line=i, prompt=q["prompt"], completion=q["completion"]) for i, q in enumerate(QUERIES)
    ]
    queries = attributor.queries_from_rows(rows, "queries")
    with pytest.raises(TributaryError, match=r"grads/c/0/0 \(rows 0\.\.2\) fails its checksum.*info --verify"):
        attributor.attribute([QueryGroup(queries, QueryOptions(k=3), attributor.method())])


def test_ann_build_refuses_a_missing_chunk(copy):
    store, _ = copy
    (store / "grads" / "c" / "2" / "0").unlink()
    result = invoke("ann", "build", store, "--no-progress")
    assert_clean_failure(result, "grads/c/2/0 (rows 6..7) is missing", "tributary info --verify")


def test_a_missing_factor_chunk_stops_the_query(copy, tmp_path):
    store, config = copy
    (store / "factors" / "sigma" / "c" / "0").unlink()
    assert_clean_failure(_query(tmp_path, config), "factors/sigma/c/0", "is missing", "tributary info --verify")


def test_all_zero_chunks_are_stored_so_a_missing_one_is_never_ambiguous(tmp_path):
    from benchmarks.common import bare_store_manifest

    store = GradientStore.create(str(tmp_path / "zero.zarr"), bare_store_manifest(4, 3, 2))
    store.write_rows(0, np.zeros((2, 3), np.float32), ["a", "b"], np.zeros(2), np.zeros(2))
    for name in ("grads/c/0/0", "rows/loss/c/0", "rows/num_tokens/c/0", "rows/id/c/0"):
        assert (tmp_path / "zero.zarr" / name).is_file(), name
    np.testing.assert_array_equal(store.read_rows(0, 2), np.zeros((2, 3)))


def test_an_older_store_without_chunk_digests_still_reads_its_skipped_zero_chunks(tmp_path):
    """Stores written before per-chunk checksum skipped all-zero chunks: the shard's recorded digest vouches for
    them, while a chunk deleted from such a store is still refused."""
    import zarr

    from benchmarks.common import bare_store_manifest

    path = tmp_path / "old.zarr"
    store = GradientStore.create(str(path), bare_store_manifest(4, 3, 2))
    group = zarr.open_group(str(path), mode="r+")
    for name in ("grads", "rows/id", "rows/num_tokens", "rows/loss"):  # re-created as the old layout had them
        node = group[name]
        assert isinstance(node, zarr.Array)
        parent, _, leaf = name.rpartition("/")
        target = group[parent] if parent else group
        assert isinstance(target, zarr.Group)
        target.create_array(
            leaf, shape=node.shape, chunks=node.chunks, dtype=node.dtype, fill_value=node.fill_value, overwrite=True
        )
    group["grads"].attrs["logical_dtype"] = "float32"
    store = GradientStore.open(str(path), mode="r+")
    commits = {}
    for start, rows in ((0, np.zeros((2, 3), np.float32)), (2, np.ones((2, 3), np.float32))):
        commits[start // 2] = store.write_rows(start, rows, ["a", "b"], np.ones(2), np.ones(2))
    (path / "grads" / "c" / "0" / "0").unlink()  # the old layout's writer skipped the all-zero chunk
    from engine.store.manifest import ShardCommit

    shards = {i: ShardCommit(checksum=c, arrays=d, node="n", pid=1, seconds=0.0) for i, (c, d) in commits.items()}
    store.update_manifest(shards={"gradients": shards})
    np.testing.assert_array_equal(store.read_rows(0, 4), np.repeat([0.0, 1.0], 2)[:, None] * np.ones((4, 3)))
    (path / "grads" / "c" / "1" / "0").unlink()
    with pytest.raises(TributaryError, match=r"grads/c/1/0 \(rows 2\.\.3\) is missing"):
        store.read_rows(2, 4)


def test_a_chunk_file_is_its_bytes_then_their_xxh3_digest(built):
    """Recomputed with the xxhash library from the chunk file and the rows Zarr reads."""
    import xxhash

    store, _ = built
    opened = GradientStore.open(str(store))
    for shard, (start, stop) in enumerate(opened.shards()):
        raw = (store / "grads" / "c" / str(shard) / "0").read_bytes()
        assert raw[-8:] == xxhash.xxh3_64_digest(raw[:-8])
        chunk = np.zeros((opened.rows_per_chunk, opened.manifest.width), np.float32)  # the last one padded
        chunk[: stop - start] = opened.read_rows(start, stop)
        assert raw[:-8] == chunk.tobytes()


# ---- everything scores depend on: factors and partial sums --------------------------------------------------
def _verify_problems(store: Path) -> tuple[int, list[str]]:
    import json

    result = invoke("info", store, "--verify")
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)["verify"]["problems"]


def test_a_query_refuses_factors_that_fail_their_checksum(copy, tmp_path):
    """Values rewritten through Zarr get fresh chunk digests: the sha256 recorded per module is what catches
    them, on every read of the factors, not only under `info --verify`."""
    import zarr

    store, config = copy
    lam = zarr.open_group(str(store), mode="r+")["factors/lam"]
    assert isinstance(lam, zarr.Array)
    values = np.asarray(lam[...])
    values[0] *= 2  # the first module's first value
    lam[...] = values
    first = GradientStore.open(str(store)).modules[0].name
    assert_clean_failure(_query(tmp_path, config), f"factors/lam of {first} does not match its checksum", "--verify")


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_info_verify_names_a_damaged_chunk_of_the_partial_sums(copy, damage):
    store, _ = copy
    for name in ("covariance", "lambda_counts"):
        chunk = store / "partials" / name / "c" / "1" / "0"
        assert chunk.is_file(), chunk
        _flip_byte(chunk, offset=0) if damage == "flip" else chunk.unlink()
    code, problems = _verify_problems(store)
    why = "checksum mismatch (stored data changed" if damage == "flip" else "missing (chunk deleted"
    assert code == 1 and sorted(problems) == [
        f"partials/covariance/c/1/0: {why} after it was written)",
        f"partials/lambda_counts/c/1/0: {why} after it was written)",
    ]


def test_info_verify_names_the_chunk_of_a_flipped_byte_in_factors(copy):
    store, _ = copy
    _flip_byte(store / "factors" / "q_a" / "c" / "0", offset=0)
    code, problems = _verify_problems(store)
    assert (code, problems) == (1, ["factors/q_a/c/0: checksum mismatch (stored data changed after it was written)"])


# ---- the ANN index beside the store ------------------------------------------------------------------------
def test_a_damaged_ann_index_file_is_named_by_verify_and_refused_by_an_approximate_query(copy, tmp_path):
    import json

    import xxhash

    require("faiss")
    from engine.ann.layout import index_location

    store, config = copy
    assert invoke("ann", "build", store, "--no-progress").exit_code == 0
    root = index_location(str(store))
    record = json.loads((root / "index.json").read_text())
    names = [*record["files"].values(), record["rows"]]
    for name in names:  # recorded as the xxhash library computes them over the files
        assert record["digests"][name] == xxhash.xxh3_128_hexdigest((root / name).read_bytes())
    assert _verify_problems(store) == (0, [])
    dot = root / record["files"]["dot"]
    _flip_byte(dot, offset=dot.stat().st_size // 2)
    assert _verify_problems(store) == (1, [f"{dot}: checksum mismatch (changed after the index was built)"])
    queries = write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    result = invoke(
        "query",
        config,
        "--queries",
        queries,
        "--top-k",
        3,
        "--approximate",
        "--method",
        "grad_dot",
        "--out",
        tmp_path / "out.jsonl",
    )
    assert_clean_failure(result, f"the ANN index file {dot}: checksum mismatch", "tributary ann build")
