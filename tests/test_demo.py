"""`tributary demo` runs end to end offline: the toy (default group) and the SmolLM2 default (heavy group)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engine.cli import app


def test_demo_small_runs_end_to_end(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--toy", "--workdir", str(tmp_path / "demo"), "--small"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "demo" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        completion_words = record["completion"].split()
        snippets = [entry["snippet"] for entry in record["top_k"]]
        scores = [entry["score"] for entry in record["top_k"]]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
        # the top supporter teaches exactly the attributed completion: what the model ate, and where
        assert snippets[0].split()[3:] == completion_words[:1] + ["in", "the"] + completion_words[-1:]
        assert all(completion_words[0] in snippet for snippet in snippets)


@pytest.mark.heavy
def test_smollm2_demo_small_runs_end_to_end(smollm2_dir, tmp_path, monkeypatch):
    """The real default: SmolLM2 + LoRA on Shakespeare, indexed by two Ray workers, generations attributed."""
    monkeypatch.setenv("TRIBUTARY_CACHE", str(smollm2_dir.parent))  # reuse the session's conversion
    workdir = tmp_path / "demo"
    try:
        result = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), "--small"])
    finally:
        import ray

        ray.shutdown()  # the demo started Ray in this process; later tests start their own
    assert result.exit_code == 0, result.output
    train_ids = [json.loads(line)["id"] for line in (workdir / "train.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert [record["id"] for record in records] == [
        query["id"] for query in map(json.loads, (workdir / "prompts.jsonl").read_text().splitlines())
    ]
    report = (workdir / "report.html").read_text()
    for record in records:
        assert record["generated"] and record["completion"].strip()
        assert len(record["completion_tokens"]) == len(record["token_scores"])
        scores = [entry["score"] for entry in record["top_k"]]
        assert scores == sorted(scores, reverse=True)
        assert {entry["id"] for entry in record["top_k"] + record["bottom_k"]} <= set(train_ids)
        for entry in record["top_k"] + record["bottom_k"]:
            # each token's share comes from its own gradient pass; together they are the whole score
            assert sum(entry["per_token"]) == pytest.approx(entry["score"], rel=1e-3, abs=1e-6)
        assert record["top_k"][0]["id"] in report
    assert "Speak as Hamlet in Hamlet." in report and "http://" not in report and "https://" not in report
