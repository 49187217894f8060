"""Pre-tokenized rows (`input_ids`, optional `labels` and `attention_mask`) in JSONL, Parquet and save_to_disk
are used as given: the store built from them equals the store built from text that encodes to the same ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer

from engine.store import GradientStore
from tests.cli_helpers import assert_clean_failure, invoke
from tests.conftest import PROMPTS, SENTENCES, job_config, write_jsonl
from tests.requirements import require

pa = require("pyarrow")
pq = require("pyarrow.parquet")
datasets = require("datasets")


def _index(tmp_path: Path, name: str, model: Path, train: Path | str) -> np.ndarray:
    root = tmp_path / name
    root.mkdir()
    raw = job_config(root, model, Path(train))
    config = root / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = invoke("index", config, "--no-progress")
    assert result.exit_code == 0, result.output
    store = GradientStore.open(raw["store"]["path"])
    return np.concatenate([rows for _, _, rows in store.iter_chunks()])


def _id_rows(tokenizer) -> list[dict]:
    return [{"id": f"t{i}", "input_ids": tokenizer(s)["input_ids"]} for i, s in enumerate(SENTENCES)]


def _table(rows: list[dict]):
    return pa.table(
        {
            "id": pa.array([row["id"] for row in rows], type=pa.string()),
            "input_ids": pa.array([row["input_ids"] for row in rows], type=pa.list_(pa.int64())),
        }
    )


def _write_rows(tmp_path: Path, kind: str, rows: list[dict]) -> Path:
    if kind == "jsonl":
        return write_jsonl(tmp_path / "ids.jsonl", rows)
    if kind == "parquet":
        pq.write_table(_table(rows), tmp_path / "ids.parquet", row_group_size=3)
        return tmp_path / "ids.parquet"
    datasets.Dataset(_table(rows)).save_to_disk(str(tmp_path / "saved_rows"))
    return tmp_path / "saved_rows"


@pytest.mark.parametrize(
    "kind", ["jsonl", pytest.param("parquet", marks=pytest.mark.heavy), pytest.param("saved", marks=pytest.mark.heavy)]
)
def test_store_from_input_ids_equals_store_from_text(kind, tmp_path, tiny_models, text_train):
    model = tiny_models["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = _id_rows(tokenizer)
    assert all(row["input_ids"][0] == tokenizer.bos_token_id for row in rows)  # special tokens are the row's own
    from_ids = _index(tmp_path, "ids", model, _write_rows(tmp_path, kind, rows))
    np.testing.assert_array_equal(from_ids, _index(tmp_path, "text", model, text_train))


def test_labels_and_padding_mask_are_used_as_given(tmp_path, tiny_models, prompt_train):
    """Prompt/completion rows against input_ids with the prompt's labels -100 and padding at the end masked."""
    model = tiny_models["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    from_prompts = _index(tmp_path, "prompts", model, prompt_train)
    rows = []
    for i, (prompt, completion) in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(" " + completion, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + completion_ids
        labels = [-100] * len(prompt_ids) + completion_ids
        padding = i % 3  # some rows padded at the end, their padding masked out
        rows.append(
            {
                "id": f"p{i}",
                "input_ids": ids + [tokenizer.pad_token_id] * padding,
                "labels": labels + [-100] * padding,
                "attention_mask": [1] * len(ids) + [0] * padding,
            }
        )
    train = write_jsonl(tmp_path / "ids.jsonl", rows)
    np.testing.assert_array_equal(_index(tmp_path, "ids", model, train), from_prompts)


def _refused(tmp_path, tiny_models, rows: list[dict], *expected: str) -> None:
    train = write_jsonl(tmp_path / "bad.jsonl", rows)
    raw = job_config(tmp_path, tiny_models["llama"], train)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = invoke("index", config, "--no-progress")
    assert_clean_failure(result, *expected)
    assert not Path(raw["store"]["path"]).exists()


def test_an_id_outside_the_vocabulary_is_refused_naming_the_row(tmp_path, tiny_models):
    vocabulary = json.loads((tiny_models["llama"] / "config.json").read_text())["vocab_size"]
    rows = [{"input_ids": [2, 5, 6]}, {"input_ids": [2, vocabulary, 6]}]
    _refused(tmp_path, tiny_models, rows, "bad.jsonl:2:", f"token id {vocabulary} is not below", str(vocabulary))


def test_a_row_with_text_and_input_ids_is_refused_naming_the_row(tmp_path, tiny_models):
    rows = [{"input_ids": [2, 5, 6]}, {"text": "the fox", "input_ids": [2, 5, 6]}]
    _refused(tmp_path, tiny_models, rows, "bad.jsonl:2:", "both 'input_ids' and 'text'")


def test_a_mask_with_a_hole_is_refused(tmp_path, tiny_models):
    rows = [{"input_ids": [2, 5, 6, 7], "attention_mask": [1, 0, 1, 1]}]
    _refused(tmp_path, tiny_models, rows, "bad.jsonl:1:", "zeros between ones")
