"""`tributary demo --small` runs end to end offline, and its attributions make sense."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from engine.cli import app


def test_demo_small_runs_end_to_end(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--small"])
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
