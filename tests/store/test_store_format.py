"""Stores written before the manifest was typed and versioned keep opening, summarising and scoring the same.

tests/fixtures/store_v1 was written by the code of commit 1e4c583 (its README says how): a 4-row store of a
tiny GPT-2 at projection dim 4, with the model, data and config it was built from, what `tributary info
--verify` and `tributary query` printed then, and the root manifest of a training-run store of that time.
Independent checks: row ids and token counts from the training file and the fixture's tokenizer, checksums
re-read from the stored rows, fingerprints recomputed from the files, `info` compared with the old code's
output, scores compared with a store the current code builds afresh from the same inputs and with the scores
the old code gave.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from benchmarks.common import bare_store_manifest
from engine.data.rows import file_fingerprint
from engine.errors import TributaryError
from engine.store import GradientStore
from engine.store.manifest import FORMAT_VERSION, RunManifest, StoreManifest
from engine.store.run_store import RunStore
from engine.store.summary import store_summary
from tests.cli_helpers import assert_clean_failure, invoke

FIXTURE = Path(__file__).parents[1] / "fixtures" / "store_v1"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _raw_manifest(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["manifest"]


def _write_config(root: Path, store: Path) -> Path:
    raw = yaml.safe_load((root / "job.yaml").read_text())
    raw["model"]["path"] = str(root / "model")
    raw["data"]["train"] = str(root / "train.jsonl")
    raw["store"]["path"] = str(store)
    config = root / f"{store.stem}.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


@pytest.fixture
def old(tmp_path) -> Path:
    """A copy of the fixture folder (nothing here may write into the repository)."""
    root = tmp_path / "store_v1"
    shutil.copytree(FIXTURE, root)
    return root


def test_the_fixture_is_in_the_unversioned_format(old):
    raw = _raw_manifest(old / "store.zarr")
    assert raw["format"] == "tributary-store/1" and "format_version" not in raw, (
        "the fixture must stay as the old code wrote it: do not regenerate it with newer code"
    )


def test_the_typed_manifest_of_an_unversioned_store(old):
    store = GradientStore.open(str(old / "store.zarr"))
    manifest = store.manifest
    assert isinstance(manifest, StoreManifest) and manifest.format_version == 1
    train = _read_jsonl(old / "train.jsonl")
    assert manifest.complete is True and manifest.rows == len(train) == 4
    assert (manifest.rows_per_chunk, manifest.width, manifest.dtype) == (2, 128, "float64")
    assert manifest.completed_shards == [0, 1] and manifest.stages == {"eigen": True, "final": True}
    assert store.ids() == [row["id"] for row in train]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(old / "model")
    counts = [len(tokenizer(row["text"])["input_ids"]) for row in train]
    assert store.row_metadata()["num_tokens"].tolist() == counts == [7, 6, 7, 7]

    assert manifest.fingerprints.dataset == file_fingerprint(old / "train.jsonl")
    assert manifest.fingerprints.projection == manifest.projection.fingerprint()
    assert (manifest.projection.dim, manifest.projection.seed, manifest.projection.kind) == (4, 0, "rademacher")
    assert len(manifest.projection.modules) == 8 and sum(m.width for m in manifest.projection.modules) == 128
    assert manifest.curvature["strategy"] == "ekfac" and manifest.model["path"] == "model"
    assert sorted(manifest.shards) == ["gradients", "lambdas"]
    for shard in (0, 1):
        assert manifest.shards["gradients"][shard].checksum == store.shard_checksum(shard)
        assert manifest.shards["lambdas"][shard].checksum is None
    assert len(manifest.runs) == 1 and manifest.runs[0].computed == {"gradients": [0, 1], "lambdas": [0, 1]}
    assert set(manifest.timings or {}) == {"setup_s", "pass1_s", "pass2_s", "total_s"}


def test_info_prints_what_the_old_code_printed(old):
    store = old / "store.zarr"
    result = invoke("info", store, "--verify")
    assert result.exit_code == 0, result.output
    expected = json.loads((old / "info.json").read_text())
    expected["path"] = str(store)
    # what is new since: the old store's factors carry no checksums, and verify says so
    expected["verify"]["unchecked"] = [
        "factors: unchecked (written before Tributary checksummed factors and preconditioners)"
    ]
    assert json.loads(result.stdout) == expected
    assert list(json.loads(result.stdout)) == list(expected), "the keys come in the same order"


def test_scores_equal_those_of_a_fresh_store_and_of_the_old_code(old):
    fresh = old / "fresh.zarr"
    assert invoke("index", _write_config(old, fresh), "--no-progress").exit_code == 0
    scores = {}
    for store in (old / "store.zarr", fresh):
        out = old / f"{store.stem}.npy"
        result = invoke("query", _write_config(old, store), "--queries", old / "queries.jsonl", "--scores-out", out)
        assert result.exit_code == 0, result.output
        scores[store.stem] = np.load(out)
    assert scores["store"].shape == (2, 4) and np.abs(scores["store"]).min() > 1e-3
    np.testing.assert_allclose(scores["store"], scores["fresh"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scores["store"], np.load(old / "scores.npy"), rtol=1e-10, atol=1e-12)

    written, opened = GradientStore.open(str(fresh)), GradientStore.open(str(old / "store.zarr"))
    assert written.manifest.fingerprints == opened.manifest.fingerprints
    np.testing.assert_allclose(written.read_rows(0, 4), opened.read_rows(0, 4), rtol=1e-12, atol=1e-14)
    assert _raw_manifest(fresh)["format_version"] == FORMAT_VERSION, "new stores record their format version"


def test_indexing_again_over_the_old_store_finds_it_complete(old):
    store = old / "store.zarr"
    before = (store / "zarr.json").read_text()
    result = invoke("index", _write_config(old, store), "--no-progress")
    assert result.exit_code == 0, result.output
    assert (store / "zarr.json").read_text() == before, "a complete, identical store is left as it is"


def test_the_run_manifest_of_that_time_reads_typed(tmp_path):
    raw = json.loads((FIXTURE / "run_manifest.json").read_text())
    assert "format_version" not in raw
    path = tmp_path / "run.zarr"
    zarr.open_group(str(path), mode="w", attributes={"manifest": raw})
    run = RunStore.open(str(path))
    manifest = run.manifest
    assert isinstance(manifest, RunManifest) and manifest.format_version == 1 and manifest.complete is True
    plan = run.plan
    assert [(c.name, c.segment, c.learning_rate, c.step) for c in plan.checkpoints] == [
        ("c0", 0, 0.05, 1),
        ("c1", 0, 0.03, 2),
    ]
    assert [(s.index, s.checkpoints, s.steps) for s in plan.segments] == [(0, ("c0", "c1"), 2)]
    assert plan.segments[0].eta == pytest.approx(0.04) and not plan.preconditioned and not plan.averaged
    assert manifest.segments_done == [0] and (manifest.store.dtype, manifest.store.rows_per_chunk) == ("float64", 2)
    stored = GradientStore.open(str(FIXTURE / "store.zarr")).manifest.projection
    assert manifest.projection == stored and manifest.curvature == {"strategy": "ekfac", "fisher": True, "seed": 0}
    summary, problems = store_summary(run, verify=True)
    assert summary["plan"] == raw["plan"] and summary["timings"] == raw["timings"] and not problems
    assert summary["checkpoints"] == {"c0": "not written yet", "c1": "not written yet"}


def _with_manifest(store: Path, **changes) -> None:
    group = zarr.open_group(str(store), mode="r+")
    manifest = group.attrs["manifest"]
    assert isinstance(manifest, dict)
    group.attrs["manifest"] = {**manifest, **changes}


def test_a_store_from_a_newer_tributary_is_refused(old):
    store = old / "store.zarr"
    _with_manifest(store, format_version=FORMAT_VERSION + 1)
    with pytest.raises(TributaryError, match=f"newer Tributary \\(store format version {FORMAT_VERSION + 1}"):
        GradientStore.open(str(store))
    assert_clean_failure(invoke("info", store), "upgrade Tributary")


def test_an_unreadable_manifest_is_refused_naming_the_field(old):
    store = old / "store.zarr"
    _with_manifest(store, rows="many")
    assert_clean_failure(invoke("info", store), f"manifest of store {store} cannot be read (rows:", "--overwrite")


def test_a_misspelt_manifest_change_is_an_error(old):
    store = GradientStore.open(str(old / "store.zarr"), mode="r+")
    with pytest.raises(ValueError, match="no field compelte"):
        store.update_manifest(compelte=False)
    assert store.manifest.complete is True


def test_partial_sums_are_added_one_shard_at_a_time_in_shard_order(tmp_path):
    """summed_partials equals the shards' rows added in shard order (bit for bit: the order the workers' sums
    have always been reduced in) and the counts' column sums, reading one shard's row at a time."""
    store = GradientStore.create(str(tmp_path / "store.zarr"), bare_store_manifest(10, 4, 2))
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((5, 7)) * 10.0 ** rng.integers(-8, 8, size=(5, 7))
    counts = rng.integers(0, 100, size=(5, 2))
    store.create_partials("covariance", 7, 2)
    for shard in (3, 0, 4, 1, 2):  # written in any order, as workers finish
        store.write_partial("covariance", shard, rows[shard], counts[shard])
    expected = rows[0] + rows[1] + rows[2] + rows[3] + rows[4]
    total, summed_counts = store.summed_partials("covariance")
    assert total.tobytes() == expected.tobytes()
    assert summed_counts.tolist() == counts.sum(axis=0).tolist()


def test_the_default_chunk_is_about_16_mib_but_never_less_than_a_batch():
    from engine.store.zarr_store import default_rows_per_chunk

    mib = 1 << 20
    assert default_rows_per_chunk(1024, "float32", 100_000) == 16 * mib // 4096  # 4 KiB rows: 4096 of them
    assert default_rows_per_chunk(1024, "bfloat16", 100_000, batch_size=8) == 16 * mib // 2048
    assert default_rows_per_chunk(1024, "float32", 300, batch_size=8) == 300  # never more than the rows
    # 16 MiB rows (projection dim 0 on a model of 4M tracked parameters): a batch a shard, not one row
    assert default_rows_per_chunk(4 * mib, "float32", 512) == 1
    assert default_rows_per_chunk(4 * mib, "float32", 512, batch_size=8) == 8
    assert default_rows_per_chunk(4 * mib, "float32", 5, batch_size=8) == 5


def test_where_shards_write_partial_sums_the_default_chunk_makes_them_a_quarter_of_the_rows_up_to_512_mib():
    from engine.store.zarr_store import default_rows_per_chunk

    mib = 1 << 20
    # 4 MiB rows, 32 MiB of float64 partial sums a shard: 4 x 32 / 4 = 32 rows, a multiple of the batch
    assert default_rows_per_chunk(mib, "float32", 512, batch_size=8, partial_width=4 * mib) == 32
    assert default_rows_per_chunk(mib, "float32", 512, batch_size=10, partial_width=4 * mib) == 40
    assert default_rows_per_chunk(mib, "float32", 20, batch_size=8, partial_width=4 * mib) == 20  # all the rows
    # 800 MiB of partial sums: capped at 512 MiB of rows (128 rows of 4 MiB)
    assert default_rows_per_chunk(mib, "float32", 10_000, batch_size=8, partial_width=100 * mib) == 128
    # 1 GiB rows: the cap is below a batch, and a batch it stays
    assert default_rows_per_chunk(256 * mib, "float32", 512, batch_size=8, partial_width=mib) == 8
    # projected rows (4 KiB): the 16 MiB target already dwarfs the partial sums
    assert default_rows_per_chunk(1024, "float32", 100_000, batch_size=8, partial_width=16 * 512) == 4096


def test_an_index_of_wide_rows_gets_shards_of_a_batch(tiny_models, tmp_path, monkeypatch):
    """The driver passes data.batch_size: with a 1 KiB chunk target every row of the tiny model is too wide for
    the target, and each shard still holds a batch (3 rows), not one row (Grad-Dot: no partial sums)."""
    import engine.store.zarr_store as zarr_store
    from engine.config import parse_config
    from engine.local_or_ray import run_index
    from tests.conftest import SENTENCES, job_config, write_jsonl

    monkeypatch.setattr(zarr_store, "TARGET_CHUNK_BYTES", 1024)
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(tmp_path, tiny_models["gpt2"], train, curvature={"strategy": "identity"})
    run_index(parse_config(raw), show_progress=False)
    store = GradientStore.open(raw["store"]["path"])
    assert store.manifest.width * 8 > 1024  # float64 rows wider than the target
    assert store.rows_per_chunk == raw["data"]["batch_size"] == 3
    assert store.shards()[0] == (0, 3) and store.manifest.complete


def test_an_exact_ekfac_index_gets_shards_whose_partial_sums_are_a_quarter_of_their_rows(
    tiny_models, tmp_path, monkeypatch
):
    """At projection dim 0 the driver passes the width of the partial sums each shard writes (covariances and
    Λ): the default chunk is the fewest whole batches whose rows outweigh four times those sums, measured here
    from the arrays the store holds."""
    import engine.store.zarr_store as zarr_store
    from engine.config import parse_config
    from engine.local_or_ray import run_index
    from tests.conftest import job_config, write_jsonl

    monkeypatch.setattr(zarr_store, "TARGET_CHUNK_BYTES", 1024)
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": f"w{i} " * 12} for i in range(200)])
    raw = job_config(tmp_path, tiny_models["gpt2"], train, data={"max_length": 16})
    run_index(parse_config(raw), show_progress=False)
    store = GradientStore.open(raw["store"]["path"])
    widths = [
        zarr.open_array(f"{raw['store']['path']}/partials/{name}", mode="r").shape[1]
        for name in ("covariance", "lambda")
    ]
    partial_bytes = 8 * sum(widths)
    row_bytes, batch = 8 * store.manifest.width, raw["data"]["batch_size"]
    expected = batch
    while expected * row_bytes < 4 * partial_bytes:
        expected += batch
    assert batch < expected < store.rows, "the test's rows must be many enough to see the rule"
    assert store.rows_per_chunk == expected and store.manifest.complete


def test_resuming_with_another_chunking_is_refused_naming_both_values(tiny_models, tmp_path):
    """A partly built store with one-row chunks (the old default for wide rows), resumed under the new default
    (a batch per chunk): one line naming the setting and both values, and the store is left as it was."""
    from engine.config import parse_config
    from engine.local_or_ray import run_index
    from tests.conftest import SENTENCES, job_config, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(tmp_path, tiny_models["gpt2"], train, store={"rows_per_chunk": 1})
    run_index(parse_config(raw), show_progress=False)
    group = zarr.open_group(raw["store"]["path"], mode="r+")
    manifest: dict = json.loads(json.dumps(group.attrs["manifest"]))
    manifest["complete"] = False
    group.attrs["manifest"] = manifest
    del raw["store"]["rows_per_chunk"]
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = invoke("index", config, "--no-progress")
    assert_clean_failure(result, "rows_per_chunk: store 1 vs now", "--overwrite")
    assert result.output.count("rows_per_chunk") == 1
    assert json.loads(json.dumps(zarr.open_group(raw["store"]["path"], mode="r").attrs["manifest"])) == manifest


def test_a_pass_1_begun_by_an_earlier_version_is_refused_on_resume_naming_the_store(tiny_models, tmp_path):
    """A store whose pass 1 began when a shard's covariance counts were 2 wide (tokens, examples: before the
    per-module token counts of routed experts): resuming it is one line naming the store and the fix, not a
    shape error from Zarr, and the store is left as it was."""
    from engine.config import parse_config
    from engine.curvature.packing import covariance_counts
    from engine.local_or_ray import run_index
    from tests.conftest import SENTENCES, job_config, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(tmp_path, tiny_models["gpt2"], train, store={"rows_per_chunk": 2})
    store = run_index(parse_config(raw), show_progress=False)
    assert isinstance(store, GradientStore)
    path = raw["store"]["path"]
    group = zarr.open_group(path, mode="r+")
    counts = group["partials/covariance_counts"]
    assert isinstance(counts, zarr.Array)
    assert counts.shape[1] == covariance_counts(store.manifest.projection) > 2
    old_counts = np.asarray(counts[:, :2])
    del group["partials/covariance_counts"]
    group.create_array("partials/covariance_counts", data=old_counts)
    manifest: dict = json.loads(json.dumps(group.attrs["manifest"]))
    manifest["complete"] = False
    manifest["stages"] = {}
    manifest["shards"]["gradients"] = dict(list(manifest["shards"]["gradients"].items())[:1])
    group.attrs["manifest"] = manifest
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = invoke("index", config, "--no-progress")
    assert_clean_failure(result, f"store {path} was begun by an earlier version", "--overwrite", "delete")
    assert result.output.count("error:") == 1
    after = zarr.open_group(path, mode="r")
    assert json.loads(json.dumps(after.attrs["manifest"])) == manifest
    after_counts = after["partials/covariance_counts"]
    assert isinstance(after_counts, zarr.Array)
    assert np.array_equal(np.asarray(after_counts[:]), old_counts)
