"""The `tributary` CLI end to end: index → query (scores.npy, results JSONL, --per-module) → info.

Scores are checked against an independent computation: brute-force autograd per-example gradients
(one example at a time, tests/reference.py) dotted with each other. Mismatched and incomplete stores
are refused with a message that names what differs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from engine.data.labels import IGNORE
from engine.data.tokenize import TokenizedRow
from engine.query.scoring import top_k
from engine.store import GradientStore
from engine.testing.tiny import save_tiny
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import SENTENCES, job_config, vocabulary_texts, write_jsonl
from tests.reference import autograd_per_example

runner = CliRunner()

# Training rows in file order; ids deliberately not sorted, so "file order" and "id order" differ.
TRAIN = [{"id": f"{name}", "text": text} for name, text in zip("kbxaqmzc", SENTENCES)]
QUERIES = [
    {"id": "q-owl", "text": "the owl eats fish in the cold sea"},
    {"id": "q-prompt", "prompt": "the fox eats", "completion": " honey in the valley"},
    {"id": "q-copy", "text": SENTENCES[5]},
]


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reference_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Highest score first, ties to the lower training index: a plain Python sort."""
    return np.array([sorted(range(len(row)), key=lambda i: (-row[i], i))[:k] for row in scores])


# ---- an independent computation of the scores ---------------------------------------------------


def reference_gradients(model_path: Path, rows: list[dict]) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """(n, D) per-example gradients by brute-force autograd, and (module, width) in layout order.

    Tokenisation is redone here from the tokenizer itself: text rows count every token, prompt rows
    only completion tokens. Tracked modules: every GPT-2 Conv1D (lm_head is a Linear, not tracked).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64).eval()
    model.requires_grad_(False)
    modules = {name: m for name, m in model.named_modules() if type(m) is Conv1D}
    tokenized = []
    for index, row in enumerate(rows):
        if "text" in row:
            ids = tokenizer(row["text"])["input_ids"]
            labels = list(ids)
        else:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
        tokenized.append(TokenizedRow(index=index, input_ids=ids, labels=labels))
    grads = autograd_per_example(model, modules, tokenized, tokenizer.pad_token_id)
    widths = [(name, m.weight.numel() + m.bias.numel()) for name, m in modules.items()]
    return grads, widths


# ---- one indexed store shared by the module ----------------------------------------------------


@pytest.fixture(scope="module")
def indexed(tiny_models, tmp_path_factory):
    """grad_dot, projection dim 0 (exact), 3 rows per chunk so scoring streams several chunks."""
    root = tmp_path_factory.mktemp("cli")
    train = write_jsonl(root / "train.jsonl", TRAIN)
    queries = write_jsonl(root / "queries.jsonl", QUERIES)
    raw = job_config(
        root,
        tiny_models["gpt2"],
        train,
        curvature={"strategy": "identity"},
        method={"name": "grad_dot"},
        store={"rows_per_chunk": 3},
    )
    config = write_config(root / "job.yaml", raw)
    result = invoke("index", config, "--no-progress")
    assert result.exit_code == 0, result.output
    store = Path(raw["store"]["path"])
    assert store.is_dir()
    grads, widths = reference_gradients(tiny_models["gpt2"], TRAIN + QUERIES)
    return {
        "root": root,
        "config": config,
        "raw": raw,
        "store": store,
        "queries": queries,
        "train_grads": grads[: len(TRAIN)].numpy(),
        "query_grads": grads[len(TRAIN) :].numpy(),
        "widths": widths,
    }


def test_info_prints_complete_manifest(indexed):
    result = invoke("info", indexed["store"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["complete"] is True
    assert info["rows"] == len(TRAIN)
    assert info["rows_per_chunk"] == 3 and info["shards_completed"] == "3 of 3"
    assert info["modules"] == len(indexed["widths"])
    assert set(info["fingerprints"]) == {"model", "tokenizer", "dataset", "projection"}
    assert info["width"] == sum(width for _, width in indexed["widths"])


def test_store_rows_are_in_training_file_order(indexed):
    store = GradientStore.open(str(indexed["store"]))
    assert store.ids() == [row["id"] for row in TRAIN]
    stored = np.concatenate([rows for _, _, rows in store.iter_chunks()])
    np.testing.assert_allclose(stored, indexed["train_grads"], rtol=1e-8, atol=1e-12)


def test_query_scores_match_autograd_dot_products(indexed):
    out, scores_out = indexed["root"] / "results.jsonl", indexed["root"] / "scores.npy"
    result = invoke(
        "query",
        indexed["config"],
        "--queries",
        indexed["queries"],
        "--top-k",
        3,
        "--out",
        out,
        "--scores-out",
        scores_out,
    )
    assert result.exit_code == 0, result.output

    scores = np.load(scores_out)
    expected = indexed["query_grads"] @ indexed["train_grads"].T  # rows: query order; columns: file order
    assert scores.shape == (len(QUERIES), len(TRAIN))
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-10)
    assert np.abs(expected).min() > 1e-3  # no vacuous zeros

    records = read_jsonl(out)
    assert [r["id"] for r in records] == [q["id"] for q in QUERIES]
    assert [r["query"] for r in records] == list(range(len(QUERIES)))
    assert records[1]["prompt"] == QUERIES[1]["prompt"] and records[1]["completion"] == QUERIES[1]["completion"]
    order = reference_top_k(expected, 3)
    for q, record in enumerate(records):
        assert record["method"] == "grad_dot"
        entries = record["top_k"]
        assert [e["rank"] for e in entries] == [1, 2, 3]
        assert [e["index"] for e in entries] == order[q].tolist()
        assert [e["id"] for e in entries] == [TRAIN[i]["id"] for i in order[q]]
        assert [e["snippet"] for e in entries] == [TRAIN[i]["text"] for i in order[q]]
        np.testing.assert_allclose([e["score"] for e in entries], expected[q, order[q]], rtol=1e-8)
        assert all(a["score"] >= b["score"] for a, b in zip(entries, entries[1:]))
    assert not list(indexed["root"].glob("*.part"))


def test_query_equal_to_a_training_row_ranks_it_first_with_grad_cos(indexed):
    picks = [5, 2, 7]
    queries = write_jsonl(indexed["root"] / "copies.jsonl", [{"id": f"c{i}", "text": TRAIN[i]["text"]} for i in picks])
    out, scores_out = indexed["root"] / "cos.jsonl", indexed["root"] / "cos.npy"
    result = invoke(
        "query",
        indexed["config"],
        "--queries",
        queries,
        "--top-k",
        2,
        "--method",
        "grad_cos",
        "--out",
        out,
        "--scores-out",
        scores_out,
    )
    assert result.exit_code == 0, result.output
    scores = np.load(scores_out)
    train = indexed["train_grads"]
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, unit[picks] @ unit.T, rtol=1e-8, atol=1e-12)
    for record, pick in zip(read_jsonl(out), picks):
        assert record["method"] == "grad_cos"
        best = record["top_k"][0]
        assert best["index"] == pick and best["id"] == TRAIN[pick]["id"]
        assert best["score"] == pytest.approx(1.0, abs=1e-9)
        assert record["top_k"][1]["score"] < 1.0 - 1e-6


def test_per_module_scores_sum_to_total_and_match_reference(indexed):
    out = indexed["root"] / "per_module.jsonl"
    result = invoke(
        "query", indexed["config"], "--queries", indexed["queries"], "--top-k", len(TRAIN), "--out", out, "--per-module"
    )
    assert result.exit_code == 0, result.output
    names = [name for name, _ in indexed["widths"]]
    bounds = np.cumsum([0] + [width for _, width in indexed["widths"]])
    query_grads, train_grads = indexed["query_grads"], indexed["train_grads"]
    for q, record in enumerate(read_jsonl(out)):
        assert len(record["top_k"]) == len(TRAIN)
        for entry in record["top_k"]:
            per_module = entry["per_module"]
            assert list(per_module) == names
            assert sum(per_module.values()) == pytest.approx(entry["score"], rel=1e-10, abs=1e-12)
            i = entry["index"]
            expected = [query_grads[q, a:b] @ train_grads[i, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            np.testing.assert_allclose(list(per_module.values()), expected, rtol=1e-8, atol=1e-10)


def test_top_k_sorts_descending_with_ties_to_the_lower_index():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(6, 40)).astype(np.float64)  # many exact ties
    scores[0] = 1.0  # all tied
    scores[1, ::7] = -np.inf
    for k in (1, 5, 40, 100):
        got = top_k(scores, k)
        assert got.shape == (6, min(k, 40))
        np.testing.assert_array_equal(got, reference_top_k(scores, k))
    np.testing.assert_array_equal(top_k(scores, 5)[0], np.arange(5))


# ---- refusals ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def projected(tiny_models, tmp_path_factory):
    """A store with a real projection (dim 2, seed 0) to query with changed settings."""
    root = tmp_path_factory.mktemp("projected")
    train = write_jsonl(root / "train.jsonl", TRAIN)
    queries = write_jsonl(root / "queries.jsonl", QUERIES[:1])
    raw = job_config(
        root,
        tiny_models["gpt2"],
        train,
        projection={"dim": 2, "seed": 0},
        curvature={"strategy": "identity"},
        method={"name": "grad_dot"},
    )
    result = invoke("index", write_config(root / "job.yaml", raw), "--no-progress")
    assert result.exit_code == 0, result.output
    return {"root": root, "raw": raw, "queries": queries}


def _query_refused(projected, raw: dict, name: str, *expected: str) -> None:
    root = projected["root"]
    config = write_config(root / f"{name}.yaml", raw)
    out, scores_out = root / f"{name}.jsonl", root / f"{name}.npy"
    result = invoke("query", config, "--queries", projected["queries"], "--out", out, "--scores-out", scores_out)
    assert_clean_failure(result, *expected)
    assert not out.exists() and not scores_out.exists()
    assert not list(root.glob("*.part"))


def test_query_refuses_other_projection_seed(projected):
    raw = dict(projected["raw"], projection={"dim": 2, "seed": 1})
    _query_refused(
        projected, raw, "seed", "projection.seed (store: 0, config: 1)", str(projected["raw"]["store"]["path"])
    )


def test_query_refuses_other_projection_dim(projected):
    raw = dict(projected["raw"], projection={"dim": 3, "seed": 0})
    _query_refused(projected, raw, "dim", "projection.dim (store: 2, config: 3)")


def test_query_refuses_other_model_of_same_shape(projected, tmp_path):
    other = save_tiny(tmp_path / "gpt2-other", "gpt2", vocabulary_texts(), hidden=8, layers=2, heads=2, seed=7)
    raw = dict(projected["raw"], model=dict(projected["raw"]["model"], path=str(other)))
    _query_refused(projected, raw, "model", "different model", f"config: '{other}'")


def test_query_refuses_other_model_architecture(projected, tiny_models):
    raw = dict(projected["raw"], model=dict(projected["raw"]["model"], path=str(tiny_models["llama"])))
    _query_refused(projected, raw, "llama", "different model", str(tiny_models["llama"]), "tracked modules")


def test_incomplete_store_is_refused_for_queries(projected):
    root = projected["root"]
    incomplete = root / "incomplete.zarr"
    shutil.copytree(projected["raw"]["store"]["path"], incomplete)
    GradientStore.open(str(incomplete), mode="r+").update_manifest(complete=False, completed_shards=[])
    info = invoke("info", incomplete)
    assert info.exit_code == 0 and json.loads(info.stdout)["complete"] is False
    raw = dict(projected["raw"], store=dict(projected["raw"]["store"], path=str(incomplete)))
    _query_refused(projected, raw, "incomplete", "incomplete", "tributary index")


def test_info_on_missing_store_fails_cleanly(tmp_path):
    assert_clean_failure(invoke("info", tmp_path / "nowhere.zarr"), "does not exist")
    assert not (tmp_path / "nowhere.zarr").exists()


def test_snippet_of_a_prompt_row_is_its_completion(tiny_models, tmp_path):
    rows = [
        {"id": "p0", "prompt": "the fox eats", "completion": " berries in the forest"},
        {"id": "p1", "prompt": "a seal eats", "completion": " fish in the cold sea"},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = write_config(
        tmp_path / "job.yaml",
        job_config(
            tmp_path, tiny_models["gpt2"], train, curvature={"strategy": "identity"}, method={"name": "grad_dot"}
        ),
    )
    assert invoke("index", config, "--no-progress").exit_code == 0
    out = tmp_path / "results.jsonl"
    result = invoke("query", config, "--queries", train, "--top-k", 2, "--out", out)
    assert result.exit_code == 0, result.output
    for record in read_jsonl(out):
        assert {e["id"]: e["snippet"] for e in record["top_k"]} == {row["id"]: row["completion"] for row in rows}
