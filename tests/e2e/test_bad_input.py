"""Bad input: a clear error naming the input (file:line or config key, and what to do), or a documented,
logged skip — and nothing half-written: no store after a failing `index`, no results, scores or `.part`
files after a failing `query`. CLI errors exit with code 2 and print no traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from engine.store import GradientStore
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def base_config(tmp_path: Path, model_path: Path, train: Path, **sections) -> dict:
    sections.setdefault("curvature", {"strategy": "identity"})
    sections.setdefault("method", {"name": "grad_dot"})
    return job_config(tmp_path, model_path, train, **sections)


def index_fails(tmp_path: Path, raw: dict, *expected: str):
    """`tributary index` exits 2 with `expected` in its message and leaves no store behind."""
    store = Path(raw["store"]["path"]) if isinstance(raw.get("store"), dict) else tmp_path / "store.zarr"
    result = invoke("index", write_config(tmp_path / "job.yaml", raw), "--no-progress")
    assert_clean_failure(result, *expected)
    assert not store.exists(), "a failing index must not create the store"
    return result


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---- training data -------------------------------------------------------------------------------

TEXT = json.dumps({"id": "ok", "text": SENTENCES[0]})
BAD_TRAINING_FILES = {
    # name: (lines, line the error names, words the message must contain)
    "empty text": ([TEXT, json.dumps({"text": ""})], 2, ["field 'text' is empty", "remove the row"]),
    "blank text": ([TEXT, json.dumps({"text": "   "})], 2, ["field 'text' is empty"]),
    "one-token text": (
        [TEXT, TEXT.replace('"ok"', '"one"').replace(SENTENCES[0], "fox")],
        2,
        ["1 token(s)", "at least 2"],
    ),
    "empty completion": (
        [json.dumps({"prompt": PROMPTS[0][0], "completion": ""})],
        1,
        ["field 'completion' is empty", "give it a completion"],
    ),
    "blank completion": (
        [TEXT, json.dumps({"prompt": PROMPTS[0][0], "completion": "  "})],
        2,
        ["field 'completion' is empty"],
    ),
    "prompt without completion": (
        [TEXT, json.dumps({"prompt": PROMPTS[0][0]})],
        2,
        ["field 'completion' is missing", "needs a completion"],
    ),
    "not JSON": ([TEXT, TEXT, '{"text": "the owl eats mice"'], 3, ["not valid JSON"]),
    "not an object": ([TEXT, json.dumps(["the", "owl"])], 2, ["must be a JSON object", "got list"]),
    "text not a string": ([TEXT, json.dumps({"text": 3})], 2, ["field 'text' must be a string"]),
    "no known field": (
        [TEXT, json.dumps({"id": "x", "body": "the owl"})],
        2,
        ["neither 'text' nor 'prompt'+'completion'", "data.text_field"],
    ),
    "duplicate id": (
        [
            json.dumps({"id": "a", "text": SENTENCES[0]}),
            json.dumps({"id": "b", "text": SENTENCES[1]}),
            json.dumps({"id": "a", "text": SENTENCES[2]}),
        ],
        3,
        ["id 'a' already used on line 1", "must be unique"],
    ),
    "prompt longer than max_length": (
        [TEXT, json.dumps({"prompt": "the fox eats berries in the forest at night", "completion": " now"})],
        2,
        ["prompt is 9 tokens", "data.max_length=6", "shorten the prompt or raise data.max_length"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_TRAINING_FILES))
def test_bad_training_row_is_refused_before_the_store_exists(case, tiny_models, tmp_path):
    lines, line, words = BAD_TRAINING_FILES[case]
    train = write_lines(tmp_path / "train.jsonl", lines)
    raw = base_config(tmp_path, tiny_models["gpt2"], train, data={"max_length": 6})
    index_fails(tmp_path, raw, f"{train}:{line}:", *words)


def test_missing_and_empty_training_files(tiny_models, tmp_path):
    missing = tmp_path / "absent.jsonl"
    index_fails(tmp_path, base_config(tmp_path, tiny_models["gpt2"], missing), f"data.train {missing} does not exist")
    empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    index_fails(tmp_path, base_config(tmp_path, tiny_models["gpt2"], empty), f"data.train {empty} has no rows")


def test_overlong_rows_are_truncated_and_counted_in_the_log(tiny_models, tmp_path, caplog):
    """Documented skip/repair: rows longer than max_length are cut, and how many is logged; blank lines
    are skipped."""
    rows = [json.dumps({"id": f"t{i}", "text": s}) for i, s in enumerate(SENTENCES)]
    rows.insert(3, "")
    rows.append(json.dumps({"id": "short", "text": "the owl"}))
    train = write_lines(tmp_path / "train.jsonl", rows)
    raw = base_config(tmp_path, tiny_models["gpt2"], train, data={"max_length": 4})
    with caplog.at_level(logging.WARNING, logger="engine.data.tokenize"):
        result = invoke("index", write_config(tmp_path / "job.yaml", raw), "--no-progress")
    assert result.exit_code == 0, result.output
    messages = [r.getMessage() for r in caplog.records if r.name == "engine.data.tokenize"]
    assert any(
        f"{train}: {len(SENTENCES)} of {len(SENTENCES) + 1} rows were longer than max_length=4" in message
        and "truncated" in message
        for message in messages
    ), messages
    store = GradientStore.open(raw["store"]["path"])
    assert store.manifest.complete is True and store.rows == len(SENTENCES) + 1
    tokens = store.row_metadata()["num_tokens"]
    assert tokens.max() == 4 and tokens[-1] == 2


# ---- config --------------------------------------------------------------------------------------


def _rename(raw: dict, path: tuple[str, ...], new: str) -> dict:
    section = raw
    for key in path[:-1]:
        section = section[key]
    section[new] = section.pop(path[-1])
    return raw


@pytest.mark.parametrize(
    "path, typo, named",
    [
        (("projection",), "projecton", "projecton: unknown key"),
        (("data", "max_length"), "max_lenght", "data.max_lenght: unknown key"),
        (("store", "dtype"), "dtyp", "store.dtyp: unknown key"),
    ],
)
def test_config_key_typo_names_the_key(path, typo, named, tiny_models, text_train, tmp_path):
    raw = _rename(base_config(tmp_path, tiny_models["gpt2"], text_train), path, typo)
    index_fails(tmp_path, raw, str(tmp_path / "job.yaml"), named, "check its spelling")


def test_config_bad_values_and_missing_sections(tiny_models, text_train, tmp_path):
    raw = base_config(tmp_path, tiny_models["gpt2"], text_train, projection={"dim": -1})
    index_fails(tmp_path, raw, "projection.dim", "greater than or equal to 0")
    raw = base_config(tmp_path, tiny_models["gpt2"], text_train)
    del raw["store"]
    index_fails(tmp_path, raw, "store: required key is missing")
    raw = base_config(tmp_path, tiny_models["gpt2"], text_train, method={"name": "source"})
    index_fails(tmp_path, raw, "method.eta", "method.steps")


def test_config_file_unreadable(tmp_path):
    assert_clean_failure(
        invoke("index", tmp_path / "nope.yaml"), f"config file {tmp_path / 'nope.yaml'} does not exist"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: [unclosed\n")
    assert_clean_failure(invoke("index", bad), f"config file {bad} is not valid YAML")
    bad.write_text("- just\n- a list\n")
    assert_clean_failure(invoke("index", bad), "must hold a mapping")
    assert not (tmp_path / "store.zarr").exists()


def test_model_path_that_does_not_exist(text_train, tmp_path):
    missing = tmp_path / "no-model"
    index_fails(tmp_path, base_config(tmp_path, missing, text_train), f"model.path {missing} does not exist")


def test_model_path_that_is_not_a_model(text_train, tmp_path):
    (tmp_path / "empty-dir").mkdir()
    index_fails(tmp_path, base_config(tmp_path, tmp_path / "empty-dir", text_train), "is not an HF model directory")


def test_module_pattern_matching_nothing(tiny_models, text_train, tmp_path):
    raw = base_config(
        tmp_path, tiny_models["gpt2"], text_train, model={"modules": ["transformer.h.0.mlp.c_fc", "*.no_such_layer"]}
    )
    index_fails(
        tmp_path,
        raw,
        "model.modules pattern '*.no_such_layer' matches no supported modules",
        "transformer.h.0.attn.c_attn",
    )


def test_store_path_holding_other_files_is_not_wiped(tiny_models, text_train, tmp_path):
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    raw = base_config(tmp_path, tiny_models["gpt2"], text_train, store={"path": str(precious)})
    for extra in ([], ["--overwrite"]):
        result = invoke("index", write_config(tmp_path / "job.yaml", raw), "--no-progress", *extra)
        assert_clean_failure(result, f"store.path {precious} already exists and is not a Tributary store")
        assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]


def test_error_text_is_printed_literally(tiny_models, tmp_path):
    """Paths with brackets are not Rich markup: printed as given, and '[/]' does not crash the CLI."""
    train = tmp_path / "a[/]b[bold]" / "train.jsonl"
    raw = base_config(tmp_path, tiny_models["gpt2"], train)
    index_fails(tmp_path, raw, f"data.train {train} does not exist")


# ---- queries ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_config(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_queries")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = base_config(root, tiny_models["gpt2"], train)
    config = write_config(root / "job.yaml", raw)
    result = invoke("index", config, "--no-progress")
    assert result.exit_code == 0, result.output
    return root, raw, config


def query_fails(tmp_path: Path, config: Path, queries: Path, *expected: str, extra=()):
    out, scores_out = tmp_path / "out" / "results.jsonl", tmp_path / "out" / "scores.npy"
    result = invoke(
        "query", config, "--queries", queries, "--top-k", 3, "--out", out, "--scores-out", scores_out, *extra
    )
    assert_clean_failure(result, *expected)
    assert not out.exists() and not scores_out.exists()
    assert not list(tmp_path.rglob("*.part"))
    return result


BAD_QUERY_FILES = {
    "missing field": (
        [json.dumps({"id": "q0", "text": SENTENCES[0]}), json.dumps({"id": "q1", "txt": "the owl"})],
        2,
        ["row has neither 'text' nor 'prompt'+'completion'", "'txt'"],
    ),
    "empty text": ([json.dumps({"text": ""})], 1, ["field 'text' is empty"]),
    "one token": ([json.dumps({"text": "owl"})], 1, ["1 token(s)"]),
    "empty completion": ([json.dumps({"prompt": "the owl", "completion": ""})], 1, ["field 'completion' is empty"]),
    "not JSON": ([json.dumps({"text": SENTENCES[0]}), "text: the owl"], 2, ["not valid JSON"]),
    "duplicate id": (
        [json.dumps({"id": "q", "text": SENTENCES[0]}), json.dumps({"id": "q", "text": SENTENCES[1]})],
        2,
        ["id 'q' already used on line 1"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_QUERY_FILES))
def test_bad_query_row_writes_nothing(case, store_config, tmp_path):
    lines, line, words = BAD_QUERY_FILES[case]
    queries = write_lines(tmp_path / "queries.jsonl", lines)
    query_fails(tmp_path, store_config[2], queries, f"{queries}:{line}:", *words)


def test_query_bad_options_and_paths(store_config, tiny_models, tmp_path):
    root, raw, config = store_config
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"id": "q", "text": SENTENCES[1]}])
    query_fails(tmp_path, config, tmp_path / "absent.jsonl", f"queries file {tmp_path / 'absent.jsonl'} does not exist")
    query_fails(tmp_path, config, queries, "--top-k must be positive", extra=["--top-k", "0"])
    query_fails(
        tmp_path, config, queries, "--method", "name", extra=["--method", "lissa"]
    )  # not a method (tracin now is)
    # the model is gone
    no_model = dict(raw, model=dict(raw["model"], path=str(tmp_path / "gone")))
    query_fails(
        tmp_path,
        write_config(tmp_path / "no_model.yaml", no_model),
        queries,
        f"model.path {tmp_path / 'gone'} does not exist",
    )
    # the store is not there
    no_store = dict(raw, store=dict(raw["store"], path=str(tmp_path / "missing.zarr")))
    query_fails(
        tmp_path,
        write_config(tmp_path / "no_store.yaml", no_store),
        queries,
        f"store {tmp_path / 'missing.zarr'} does not exist",
        "tributary index",
    )
    assert not (tmp_path / "missing.zarr").exists()
    # --out names a directory, and --out == --scores-out
    (tmp_path / "a_dir").mkdir()
    result = invoke("query", config, "--queries", queries, "--out", tmp_path / "a_dir")
    assert_clean_failure(result, f"--out {tmp_path / 'a_dir'} is a directory")
    same = tmp_path / "same.out"
    result = invoke("query", config, "--queries", queries, "--out", same, "--scores-out", same)
    assert_clean_failure(result, "--out and --scores-out are both")
    assert not same.exists() and not list(tmp_path.rglob("*.part"))


def test_query_after_bad_input_then_good_input_writes_both(store_config, tmp_path):
    """The same command succeeds once the input is fixed (the failures above were about the input)."""
    queries = write_jsonl(tmp_path / "queries.jsonl", [{"id": "q", "text": SENTENCES[1]}])
    out, scores_out = tmp_path / "out" / "results.jsonl", tmp_path / "out" / "scores.npy"
    result = invoke(
        "query", store_config[2], "--queries", queries, "--top-k", 2, "--out", out, "--scores-out", scores_out
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and scores_out.is_file() and not list(tmp_path.rglob("*.part"))
