"""`tributary info --verify` covers everything a score depends on, and names what changed.

A real EK-FAC store (8 rows in shards of 3) is copied per test and changed on disk the way a user or a
failing disk would: factor values scaled, row metadata edited, chunk files deleted. The expected names
come from the store's own layout (its modules, the arrays' chunk grids), not from the verifier.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.curvature.factors import ModuleFactors
from engine.store import GradientStore
from engine.store.manifest import FORMAT_VERSION, RunManifest
from engine.store.run_store import RunStore
from engine.store.summary import store_summary
from tests.cli_helpers import invoke
from tests.conftest import SENTENCES, write_jsonl
from tests.distributed_helpers import single_thread_store

FIXTURE = Path(__file__).parents[1] / "fixtures" / "store_v1"


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    train = write_jsonl(root / "train.jsonl", [{"id": f"r{i}", "text": text} for i, text in enumerate(SENTENCES)])
    return Path(single_thread_store(tiny_models["gpt2"], train, str(root / "store.zarr")))


@pytest.fixture
def store(built, tmp_path) -> Path:
    copy = tmp_path / "store.zarr"
    shutil.copytree(built, copy)
    return copy


def _verify(path: Path) -> tuple[int, list[str]]:
    result = invoke("info", path, "--verify")
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)["verify"]["problems"]


def _array(path: Path, name: str) -> zarr.Array:
    array = zarr.open_group(str(path), mode="r+")[name]
    assert isinstance(array, zarr.Array)
    return array


def test_a_clean_store_verifies_clean(store):
    result = invoke("info", store, "--verify")
    assert result.exit_code == 0, result.output
    verify = json.loads(result.stdout)["verify"]
    assert verify == {"shards_checked": 3, "problems": []}, "nothing unchecked in a store of this version"


def test_factors_scaled_are_named_by_module_and_field(store):
    modules = [m.name for m in GradientStore.open(str(store)).modules]
    lam = _array(store, "factors/lam")
    lam[...] = np.asarray(lam[...]) * 100
    code, problems = _verify(store)
    assert code == 1
    assert sorted(problems) == sorted(
        f"factors/{name}/lam (chunk factors/lam/c/0): checksum mismatch (stored data changed after it was written)"
        for name in modules
    )


def test_one_factor_value_changed_names_only_its_module(store):
    opened = GradientStore.open(str(store))
    first, second = opened.modules[:2]
    q_a = _array(store, "factors/q_a")
    values = np.asarray(q_a[...])
    values[first.k_in**2] += 1e-9  # the first value of the second module's Q_A
    q_a[...] = values
    code, problems = _verify(store)
    assert code == 1 and len(problems) == 1 and problems[0].startswith(f"factors/{second.name}/q_a ")


def test_edited_row_ids_are_named_rows_id(store):
    ids = _array(store, "rows/id")
    ids[4] = "tampered"
    code, problems = _verify(store)
    assert (code, problems) == (
        1,
        ["rows/id/c/1 (rows 3..5): checksum mismatch (stored data changed after it was written)"],
    )


def test_edited_losses_are_named_rows_loss(store):
    loss = _array(store, "rows/loss")
    loss[0] = np.asarray(loss[0]) + 1
    code, problems = _verify(store)
    assert (code, problems) == (
        1,
        ["rows/loss/c/0 (rows 0..2): checksum mismatch (stored data changed after it was written)"],
    )


def test_a_deleted_grads_chunk_is_missing(store):
    chunk = store / "grads" / "c" / "2" / "0"
    assert chunk.is_file()
    chunk.unlink()
    code, problems = _verify(store)
    assert (code, problems) == (1, ["grads/c/2/0 (rows 6..7): missing (chunk deleted after it was written)"])


def test_a_deleted_factor_chunk_is_missing(store):
    opened = GradientStore.open(str(store))
    sigma = _array(store, "factors/sigma")
    chunk = sigma.chunks[0]
    assert sigma.shape[0] == sum(m.k_out for m in opened.modules)
    (store / "factors" / "sigma" / "c" / "0").unlink()
    expected, offset = [], 0
    for module in opened.modules:  # the modules with a value in chunk 0
        if offset < chunk:
            expected.append(
                f"factors/{module.name}/sigma: missing (chunk factors/sigma/c/0 deleted after it was written)"
            )
        offset += module.k_out
    code, problems = _verify(store)
    assert code == 1 and sorted(problems) == sorted(expected) and expected


def _run_store(path: Path) -> RunStore:
    """A training-run store holding the fixture's plan, written by this version's RunStore."""
    raw = json.loads((FIXTURE / "run_manifest.json").read_text())
    manifest = RunManifest.model_validate({**raw, "format_version": FORMAT_VERSION})
    return RunStore.create(str(path), manifest)


def test_edited_run_preconditioner_and_segment_factors_are_named(tmp_path):
    run = _run_store(tmp_path / "run.zarr")
    generator = np.random.default_rng(0)
    preconditioner = {m.name: generator.random((m.k_out, m.k_in)) + 0.5 for m in run.modules}
    run.write_segment_preconditioner(0, preconditioner)
    run.write_segment_factors(0, {m.name: ModuleFactors("diagonal", preconditioner[m.name] * 3) for m in run.modules})
    reopened = RunStore.open(run.path)
    summary, problems = store_summary(reopened, verify=True)
    assert problems == [] and summary["verify"] == {"problems": []}

    second = reopened.modules[1]
    array = _array(tmp_path / "run.zarr", "segments/s0/preconditioner")
    values = np.asarray(array[...])
    values[reopened.modules[0].k_in * reopened.modules[0].k_out] *= 2  # the second module's first value
    array[...] = values
    _, problems = store_summary(RunStore.open(run.path), verify=True)
    assert len(problems) == 1 and problems[0].startswith(f"segments/s0/preconditioner/{second.name} ")
    result = invoke("info", tmp_path / "run.zarr", "--verify")
    assert result.exit_code == 1 and f"segments/s0/preconditioner/{second.name}" in result.output

    lam = _array(tmp_path / "run.zarr", "segments/s0/factors/lam")
    lam[...] = np.asarray(lam[...]) * 100
    _, problems = store_summary(RunStore.open(run.path), verify=True)
    named = sorted(problem.split(" ")[0] for problem in problems)
    expected = [f"segments/s0/factors/{m.name}/lam" for m in reopened.modules]
    assert named == sorted([*expected, f"segments/s0/preconditioner/{second.name}"])


def test_an_old_store_verifies_its_rows_and_says_its_factors_are_unchecked(tmp_path):
    old = tmp_path / "store.zarr"
    shutil.copytree(FIXTURE / "store.zarr", old)
    result = invoke("info", old, "--verify")
    assert result.exit_code == 0, result.output
    verify = json.loads(result.stdout)["verify"]
    assert verify["problems"] == [] and any(entry.startswith("factors: unchecked") for entry in verify["unchecked"])
    loss = _array(old, "rows/loss")
    loss[3] = np.asarray(loss[3]) + 1
    code, problems = _verify(old)
    assert code == 1 and len(problems) == 1 and problems[0].startswith("rows 2..3: checksum mismatch")
    assert "rows/loss/c/1" in problems[0]


def test_a_shard_commit_holds_sha256_of_each_array_and_of_those_digests(built):
    """Recomputed with hashlib from the arrays as Zarr reads them: each row array's digest, and the shard's
    checksum as sha256 over the names and digests (the rows are hashed once, not once per digest)."""
    import hashlib

    opened = GradientStore.open(str(built))
    group = zarr.open_group(str(built), mode="r")
    for shard, (start, stop) in enumerate(opened.shards()):
        commit = opened.manifest.shards["gradients"][shard]
        expected = {}
        for name in ("grads", "rows/id", "rows/num_tokens", "rows/loss"):
            node = group[name]
            assert isinstance(node, zarr.Array)
            values = np.asarray(node[start:stop])
            raw = "\x1f".join(map(str, values)).encode() if values.dtype.kind in "UOT" else values.tobytes()
            expected[name] = hashlib.sha256(raw).hexdigest()
        assert commit.arrays == expected
        joined = "".join(f"{name}\x1f{digest}\x1e" for name, digest in expected.items())
        assert commit.checksum == hashlib.sha256(joined.encode()).hexdigest() == opened.shard_checksum(shard)
