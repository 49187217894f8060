"""Training runs in the LM store: several checkpoints of a tiny GPT-2, indexed into one store group and
attributed with every method.

Independent computations: per-example gradients by brute-force autograd one example at a time
(tests/reference.py) at each checkpoint's weights, explicit formulas (TracInCP's sum, TRAK's dense
solve, DataInf's loop, Source's walk with dense matrices built from the stored factors), and factors
fitted directly from each checkpoint's partial sums outside the driver.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.config import parse_config
from engine.curvature.factors import final_factors, initial_factors
from engine.curvature.statistics import merge_all
from engine.errors import TributaryError
from engine.gradients.passes import gradient_pass, lambda_pass
from engine.local_or_ray import run_index, run_query
from engine.store.run_store import RunStore
from engine.training_run.resolve import resolve_run
from tests.conftest import SENTENCES, job_config, write_jsonl
from tests.trained_checkpoints import QUERIES, RATES, checkpoint_context, reference_rows, train_checkpoints


@pytest.fixture(scope="module")
def run_setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    checkpoints = train_checkpoints(tiny_models["gpt2"], root / "trainer")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    queries = write_jsonl(root / "queries.jsonl", QUERIES)
    raw = job_config(
        root, tiny_models["gpt2"], train, training_run={"trainer_dir": str(root / "trainer"), "segments": 2}
    )
    store = run_index(parse_config(raw), show_progress=False)
    return root, raw, checkpoints, store, queries


def test_plan_comes_from_trainer_state(run_setup):
    """3 checkpoints (steps 2, 4, 6) in 2 segments: η_c = the rate logged at each step, η̄ = mean of the rates
    logged in the segment's steps, K = step differences."""
    root, raw, checkpoints, store, _ = run_setup
    plan = store.plan
    assert [c.path for c in plan.checkpoints] == [str(p.resolve()) for p in checkpoints]
    assert [c.learning_rate for c in plan.checkpoints] == [RATES[1], RATES[3], RATES[5]]
    assert [s.checkpoints for s in plan.segments] == [("c0", "c1"), ("c2",)]
    assert [s.steps for s in plan.segments] == [4, 2]
    assert plan.segments[0].eta == pytest.approx(np.mean(RATES[:4]))
    assert plan.segments[1].eta == pytest.approx(np.mean(RATES[4:]))
    momentum = resolve_run(parse_config(dict(raw, training_run=dict(raw["training_run"], optimizer={"momentum": 0.9}))))
    assert momentum is not None
    assert momentum.segments[1].eta == pytest.approx(10 * np.mean(RATES[4:]))


def test_each_checkpoint_store_holds_that_checkpoints_gradients(run_setup):
    """Rows of checkpoints/cJ equal brute-force autograd at checkpoint J's weights (dim 0, float64)."""
    root, raw, checkpoints, store, _ = run_setup
    for index, weights in enumerate(checkpoints):
        rows = store.checkpoint(f"c{index}").read_rows(0, len(SENTENCES))
        np.testing.assert_allclose(
            rows, reference_rows(raw, weights, Path(raw["data"]["train"])), rtol=1e-9, atol=1e-12
        )


def test_segment_factors_average_over_checkpoints_in_one_basis(run_setup):
    """Segment 0's factors equal: covariance sums of both checkpoints added, one eigendecomposition, Λ from a
    lambda pass at each checkpoint in that basis, averaged — computed here outside the driver."""
    root, raw, checkpoints, store, _ = run_setup
    jobs = [checkpoint_context(raw, weights, Path(raw["data"]["train"])) for weights in checkpoints[:2]]
    widths = {m.name: (m.k_in, m.k_out) for m in jobs[0].context.spec.modules}
    covariance = merge_all([gradient_pass(job.context, job.tokenized).sums for job in jobs]).covariance
    basis = initial_factors("ekfac", covariance, widths)
    lambdas = merge_all([lambda_pass(job.context, job.tokenized, basis) for job in jobs]).lambdas
    expected = final_factors("ekfac", basis, lambdas)
    stored = store.read_segment_factors(0)
    for name, factors in expected.items():
        np.testing.assert_allclose(stored[name].lam, factors.lam, rtol=1e-9, atol=1e-13)
        for field in ("q_a", "q_s"):
            mine, theirs = getattr(stored[name], field), getattr(factors, field)
            np.testing.assert_allclose(np.abs(mine.T @ theirs), np.eye(len(mine)), atol=1e-7)
    assert not store.has_segment_factors(1)  # one plain checkpoint: its own factors serve


def _scores(raw: dict, queries: Path, method: dict, tmp: Path) -> np.ndarray:
    config = parse_config(dict(raw, method=method))
    target = tmp / f"{method['name']}.npy"
    run_query(config, str(queries), k=3, scores_out=str(target))
    return np.load(target)


def _per_module(rows: np.ndarray, spec) -> list[np.ndarray]:
    return [rows[:, m.offset : m.offset + m.width] for m in spec.modules]


def test_methods_on_the_store_equal_their_explicit_formulas(run_setup, tmp_path):
    """Through `run_query` on the run store: TracInCP = Σ_c η_c g_q^c·g_i^c; TRAK = mean over checkpoints of
    Σ_m g_qᵀ(ΦᵀΦ + λI)⁻¹g_i; DataInf at the final checkpoint = its loop formula; Source = u·R₂·g^(c2) +
    u·S₂R₁·(g^(c0) + g^(c1))/2 with R, S dense matrices of the stored segment factors. Every gradient by autograd."""
    root, raw, checkpoints, store, queries = run_setup
    train_file = Path(raw["data"]["train"])
    rows = [reference_rows(raw, w, train_file) for w in checkpoints]
    query_rows = [reference_rows(raw, w, queries) for w in checkpoints]
    plan = store.plan
    spec = checkpoint_context(raw, checkpoints[0], train_file).context.spec

    tracin = sum(c.learning_rate * q @ r.T for c, q, r in zip(plan.checkpoints, query_rows, rows))
    np.testing.assert_allclose(_scores(raw, queries, {"name": "tracin"}, tmp_path), tracin, rtol=1e-8)

    trak = np.zeros_like(tracin)
    for q, r in zip(query_rows, rows):
        for phi, g in zip(_per_module(r, spec), _per_module(q, spec)):
            trak += g @ np.linalg.solve(phi.T @ phi + 0.5 * np.eye(phi.shape[1]), phi.T) / len(rows)
    np.testing.assert_allclose(_scores(raw, queries, {"name": "trak", "damping": 0.5}, tmp_path), trak, rtol=1e-7)

    datainf = np.zeros_like(tracin)
    for g, v in zip(_per_module(rows[-1], spec), _per_module(query_rows[-1], spec)):
        lam = 0.1 * np.mean(np.sum(g**2, axis=1)) / g.shape[1]
        for i in range(len(g)):
            datainf -= np.outer(v @ g[i], g[i] @ g.T) / (lam + g[i] @ g[i]) / len(g) / lam
        datainf += v @ g.T / lam
    np.testing.assert_allclose(_scores(raw, queries, {"name": "datainf"}, tmp_path), datainf, rtol=1e-7)

    def dense(factors, function) -> np.ndarray:
        out = np.zeros((spec.total_width, spec.total_width))
        for m in spec.modules:
            f = factors[m.name]
            basis = np.kron(f.q_s, f.q_a)
            out[m.offset : m.offset + m.width, m.offset : m.offset + m.width] = (
                basis @ np.diag(function(f.lam).ravel()) @ basis.T
            )
        return out

    def residual(horizon):
        return lambda lam: np.where(lam > 0, -np.expm1(-horizon * lam) / np.where(lam > 0, lam, 1.0), horizon)

    first, second = plan.segments
    r1 = dense(store.read_segment_factors(0), residual(first.eta * first.steps))
    final_factors_ = store.checkpoint("c2").read_factors()
    r2 = dense(final_factors_, residual(second.eta * second.steps))
    s2 = dense(final_factors_, lambda lam: np.exp(-second.eta * second.steps * lam))
    u = query_rows[-1]
    source = u @ r2 @ rows[2].T + u @ s2 @ r1 @ ((rows[0] + rows[1]) / 2).T
    np.testing.assert_allclose(_scores(raw, queries, {"name": "source"}, tmp_path), source, rtol=1e-7)


def test_results_and_per_module_shares_for_a_multi_checkpoint_method(run_setup, tmp_path):
    """The results file lists the top rows of the summed scores, with per-module shares that add up to them."""
    root, raw, checkpoints, store, queries = run_setup
    from engine.query.plan_and_score import QueryOptions

    config = parse_config(dict(raw, method={"name": "tracin"}))
    result = run_query(
        config,
        str(queries),
        k=3,
        out=str(tmp_path / "r.jsonl"),
        scores_out=str(tmp_path / "s.npy"),
        options=QueryOptions(k=3, per_module=True),
    )
    total = np.load(tmp_path / "s.npy")
    for q, record in enumerate(json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()):
        assert [e["index"] for e in record["top_k"]] == list(np.argsort(-total[q], kind="stable")[:3])
        for entry in record["top_k"]:
            assert sum(entry["per_module"].values()) == pytest.approx(total[q, entry["index"]], rel=1e-9)
            assert entry["id"] == f"t{entry['index']}" and entry["snippet"] == SENTENCES[entry["index"]]
    assert result.top_scores.shape == (2, 3)


def test_cli_info_and_query_on_a_run_store(run_setup, tmp_path):
    """`tributary info` lists the plan and every checkpoint store (with --verify, their checksums);
    `tributary query --method trak` scores through the CLI like the library call."""
    import yaml

    from tests.cli_helpers import invoke

    root, raw, checkpoints, store, queries = run_setup
    result = invoke("info", store.path, "--verify")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["format"] == "tributary-run/1" and summary["complete"]
    assert {key: value["complete"] for key, value in summary["checkpoints"].items()} == {
        "c0": True,
        "c1": True,
        "c2": True,
    }
    assert all(not value["verify"]["problems"] for value in summary["checkpoints"].values())
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = invoke("query", config, "--queries", queries, "--method", "trak", "--scores-out", tmp_path / "cli.npy")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(
        np.load(tmp_path / "cli.npy"), _scores(raw, queries, {"name": "trak"}, tmp_path), rtol=1e-12
    )


def test_a_run_stores_segment_factors_are_checked_on_every_read(run_setup, tmp_path):
    """A segment's factors (Source's averaged basis) are re-hashed on read like a checkpoint's own: values
    rewritten through Zarr (so their chunk digests are fresh) fail the per-module sha256 recorded when they were
    written, and `query` refuses them; a flipped byte fails its chunk's digest, and `info --verify` names the
    chunk."""
    import shutil

    import yaml
    import zarr

    from tests.cli_helpers import assert_clean_failure, invoke

    _, raw, _, store, queries = run_setup
    first = store.modules[0].name

    def damaged_copy(name: str):
        copy = tmp_path / name
        shutil.copytree(store.path, copy)
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            yaml.safe_dump({**raw, "method": {"name": "source"}, "store": {**raw["store"], "path": str(copy)}})
        )
        return copy, config

    def query(config):
        return invoke("query", config, "--queries", queries, "--top-k", 3, "--out", tmp_path / "out.jsonl")

    def verify_problems(copy) -> list[str]:
        result = invoke("info", copy, "--verify")
        assert result.exit_code == 1, result.output
        return json.loads(result.stdout[result.stdout.index("{") :])["verify"]["problems"]

    rewritten, config = damaged_copy("rewritten.zarr")
    lam = zarr.open_group(str(rewritten), mode="r+")["segments/s0/factors/lam"]
    assert isinstance(lam, zarr.Array)
    values = np.asarray(lam[...])
    values[0] *= 2  # the first module's first value
    lam[...] = values
    with pytest.raises(TributaryError, match=f"segments/s0/factors/lam of {first} does not match its checksum"):
        RunStore.open(str(rewritten)).read_segment_factors(0)
    assert_clean_failure(query(config), f"segments/s0/factors/lam of {first} does not match its checksum", "--verify")
    assert any(p.startswith(f"segments/s0/factors/{first}/lam (chunk ") for p in verify_problems(rewritten))

    flipped, config = damaged_copy("flipped.zarr")
    chunk = flipped / "segments" / "s0" / "factors" / "q_a" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x01
    chunk.write_bytes(bytes(data))
    assert verify_problems(flipped) == [
        "segments/s0/factors/q_a/c/0: checksum mismatch (stored data changed after it was written)"
    ]
    assert_clean_failure(query(config), "segments/s0/factors/q_a/c/0", "--verify")
