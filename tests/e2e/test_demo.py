"""`tributary demo` runs end to end offline: the toy (default group) and the SmolLM2 default (heavy group);
the demo's report renders in headless Chromium at a laptop's width."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from tests.chromium import png_summary, require_chromium, run_chromium, screenshot_and_dom

LAPTOP = (1366, 900)


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


def _demo_record(play: str, speaker: str, own: bool) -> dict:
    entries = [
        {
            "rank": rank,
            "id": f"{'hamlet' if own else 'othello'}-3-1-{rank:03d}",
            "score": score,
            "snippet": "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer",
            "source": f"{play if own else 'Othello'} · {speaker} 3.1",
        }
        for rank, score in ((1, 41.5), (2, 17.25), (3, 3.5))
    ]
    return {
        "query": 0,
        "id": f"query-{play.lower()}",
        "instruction": f"Speak as {speaker} in {play}.",
        "method": "if",
        "measurement": "logprob_sum",
        "generated": True,
        "prompt": f"<|im_start|>user\nSpeak as {speaker} in {play}.<|im_end|>\n<|im_start|>assistant\n",
        "completion": "O, that this too too solid flesh would melt",
        "completion_tokens": ["O", ",", " that", " this", " too", " too", " solid", " flesh", " would", " melt"],
        "token_scores": [4.0, 0.5, -1.5, 2.0, 3.0, 3.0, 6.0, 5.0, -0.5, 1.0],
        "baseline": {"label": "base model (adapter off)", "text": "As Hamlet, I would say that life is a question."},
        "note": "IF (logprob_sum): the top supporter is from Hamlet; 60% of the top 10 are (chance 17%).",
        "top_k": entries,
        "bottom_k": [  # opposers from another play
            dict(entry, id=f"othello-1-1-{rank:03d}", source="Othello · Hamlet 3.1", score=-entry["score"] / 2)
            for rank, entry in enumerate(entries, 1)
        ],
    }


def test_demo_report_reads_at_laptop_width(tmp_path):
    """The demo's report (summary table, base vs tuned answer, shaded tokens, the chart, sources) renders in
    headless Chromium at 1366 px; the screenshot is kept in tmp_path to look at."""
    require_chromium()
    from engine.demo_assets.attribution import Outcome

    summary = {
        "rows": 64,
        "top": 10,
        "chance": 0.17,
        "columns": [
            {"label": "IF sum", "top1_count": 1, "top10_mean": 0.6, "bottom10_mean": 0.3},
            {"label": "random", "top1_count": 0, "top10_mean": 0.1, "bottom10_mean": 0.2},
        ],
        "prompts": [
            {
                "id": "query-hamlet",
                "instruction": "Speak as Hamlet in Hamlet.",
                "play": "Hamlet",
                "chance": 0.17,
                "figures": [
                    {"ranking": "IF sum", "top1": True, "top10": 0.6, "bottom10": 0.3},
                    {"ranking": "random", "top1": False, "top10": 0.1, "bottom10": 0.2},
                ],
            }
        ],
    }
    outcome = Outcome([_demo_record("Hamlet", "Hamlet", True)], summary, {"method": "if", "training rows": 64})
    report = outcome.write_report(tmp_path / "report.html")
    url = report.resolve().as_uri()
    _, (width, height, distinct), dom = screenshot_and_dom(tmp_path, url, LAPTOP)
    assert (width, height) == LAPTOP and distinct > 50
    for needle in (
        "Speak as Hamlet in Hamlet.",
        "base model (adapter off)",
        "As Hamlet, I would say that life is a question.",
        "Hamlet · Hamlet 3.1",
        "Othello · Hamlet 3.1",
        'class="chart"',
        "Scores of the listed examples",
        "yes · 60% · 30%",
        "1/1 · 60% · 30%",
        "Does the attribution follow the play the prompt names?",
    ):
        assert needle in dom, needle
    # six bars: three supporters (right of the axis) and three opposers (left), scaled to the largest |score|
    assert dom.count('class="fill pos"') == 3 and dom.count('class="fill neg"') == 3
    assert 'style="width: 50.0%"' in dom  # the largest score fills its half of the track


def test_own_play_figures_count_the_named_play_at_each_end():
    from engine.demo_assets.own_play import chance, own_play, random_ranking

    play_of = {f"r{i}": ("Hamlet" if i % 4 == 0 else "Othello") for i in range(40)}  # 10 of 40 from Hamlet
    supporting = ["r0", "r1", "r4", "r2", "r3", "r8", "r5", "r6", "r7", "r9", "r12"]
    opposing = ["r39", "r36", "r38", "r32", "r37", "r35", "r34", "r33", "r31", "r30"]
    figures = own_play(supporting, opposing, play_of, "Hamlet")
    assert figures.top1 and figures.top10 == 3 / 10 and figures.bottom10 == 2 / 10  # r0,r4,r8 · r36,r32
    assert not own_play(supporting[1:], opposing, play_of, "Hamlet").top1
    assert chance(play_of, "Hamlet") == 0.25
    ranking = random_ranking(list(play_of), seed=3)
    assert sorted(ranking) == sorted(play_of) and ranking == random_ranking(list(play_of), seed=3)
    assert ranking != random_ranking(list(play_of), seed=4)
    with pytest.raises(ValueError, match="top and bottom 10"):
        own_play(supporting[:5], opposing, play_of, "Hamlet")


def test_same_prompt_counts_the_rows_taught_that_instruction():
    from engine.demo_assets.attribution import same_prompt

    rows = [
        {"id": f"r{i}", "prompt": f"<user>Speak as {'Hamlet' if i < 5 else 'Horatio'} in Hamlet.<end>"}
        for i in range(30)
    ]
    supporting = [f"r{i}" for i in (0, 9, 10, 11, 12, 13, 14, 15, 16, 17, 1)]  # r1 is 11th: outside the top 10
    opposing = [f"r{i}" for i in (2, 3, 29, 28, 27, 26, 25, 24, 23, 22)]
    assert same_prompt("Speak as Hamlet in Hamlet.", rows, supporting, opposing) == {
        "rows": 5,
        "top10": 1,
        "bottom10": 2,
    }


def _own_play_slug(entry_id: str, slugs: set[str]) -> str:
    """The play slug an id like "romeo-and-juliet-2-2-014" starts with."""
    return max((slug for slug in slugs if entry_id.startswith(slug + "-")), key=len)


def _words(output: str) -> str:
    """The console output with its line wrapping undone: rich breaks lines at 80 columns, so a phrase after a
    long path can straddle a line break, depending on the path's length."""
    return " ".join(output.split())


def _run_demo(smollm2_dir: Path, workdir: Path, monkeypatch, *flags: str) -> str:
    monkeypatch.setenv("TRIBUTARY_CACHE", str(smollm2_dir.parent))  # reuse the session's conversion
    try:
        result = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), *flags])
    finally:
        import ray

        ray.shutdown()  # the demo started Ray in this process; later tests start their own
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.heavy
def test_smollm2_demo_small_runs_end_to_end(smollm2_dir, tmp_path, monkeypatch):
    """The real default: SmolLM2 + the committed LoRA on Shakespeare, indexed by two Ray workers, generations
    attributed; a second run reuses the index."""
    workdir = tmp_path / "demo"
    output = _run_demo(smollm2_dir, workdir, monkeypatch, "--small")
    assert output.index(str(workdir / "report.html")) < output.index("1/4")  # where the report will be, first
    assert "WARNING" not in output and "Warning" not in output
    train_ids = [json.loads(line)["id"] for line in (workdir / "train.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert [record["id"] for record in records] == [
        query["id"] for query in map(json.loads, (workdir / "prompts.jsonl").read_text().splitlines())
    ]
    assert len(records) == 4
    report = (workdir / "report.html").read_text()
    for record in records:
        assert record["generated"] and record["completion"].strip() and record["baseline"]["text"].strip()
        assert len(record["completion_tokens"]) == len(record["token_scores"])
        scores = [entry["score"] for entry in record["top_k"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 10
        assert {entry["id"] for entry in record["top_k"] + record["bottom_k"]} <= set(train_ids)
        for entry in record["top_k"] + record["bottom_k"]:
            # each token's share comes from its own gradient pass; together they are the whole score
            assert sum(entry["per_token"]) == pytest.approx(entry["score"], rel=1e-3, abs=1e-6)
        assert record["top_k"][0]["id"] in report
    assert "Speak as Hamlet in Hamlet." in report and "http://" not in report and "https://" not in report
    assert "indexing the 64 training rows" in _words(output)
    again = _words(_run_demo(smollm2_dir, workdir, monkeypatch, "--small"))
    assert "is reused" in again and "indexing the" not in again


@pytest.mark.heavy
def test_smollm2_demo_learned_and_attributions_follow_the_play(smollm2_dir, tmp_path, monkeypatch):
    """The full demo: the tuned answers differ from the base model's, and the influence function's top-1
    supporter comes from the prompt's own play for at least 3 of the 4 prompts."""
    from engine.demo_assets.shakespeare import DEMO_PLAYS, DEMO_QUERIES, demo_queries

    workdir = tmp_path / "demo"
    _run_demo(smollm2_dir, workdir, monkeypatch)
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    query_plays = {query["id"]: play for query, (_, play) in zip(demo_queries(), DEMO_QUERIES)}
    assert len(records) == 4 and set(query_plays) == {record["id"] for record in records}
    for record in records:
        assert record["completion"].strip() != record["baseline"]["text"].strip(), record["id"]
    own = [_own_play_slug(record["top_k"][0]["id"], set(DEMO_PLAYS)) == query_plays[record["id"]] for record in records]
    for record in records:  # the reported shares, recounted from the listed ids
        for end, key in (("top_k", "top10"), ("bottom_k", "bottom10")):
            slugs = [_own_play_slug(entry["id"], set(DEMO_PLAYS)) for entry in record[end][:10]]
            assert record["own_play"]["figures"][0][key] == pytest.approx(slugs.count(query_plays[record["id"]]) / 10)
    assert sum(own) >= 3, [(record["id"], record["top_k"][0]["id"]) for record in records]
    require_chromium()
    shot = tmp_path / "report.png"
    run_chromium(tmp_path, "shot", f"--screenshot={shot}", "--window-size=1366,900", (workdir / "report.html").as_uri())
    assert png_summary(shot)[:2] == LAPTOP


@pytest.mark.heavy  # 16 SmolLM2 LoRA steps: 68 min on 2 cores shared with ~30 processes (~1.5 s a step idle)
def test_smollm2_demo_retrain_builds_its_store_through_the_callback(smollm2_dir, tmp_path, monkeypatch):
    """`--retrain --small`: 16 LoRA steps through the Trainer with TributaryCallback write a training-run store
    (no index pass, no Ray); the demo's queries are answered from it."""
    workdir = tmp_path / "demo"
    output = _words(_run_demo(smollm2_dir, workdir, monkeypatch, "--small", "--retrain"))
    assert "TributaryCallback writes the store" in output and "indexing the" not in output
    assert_retrained_demo(workdir, smollm2_dir, tmp_path / "start")


def assert_retrained_demo(workdir: Path, model_dir: Path, scratch: Path) -> None:
    """What a `--retrain --small` run in `workdir` must hold. The rows captured at step 1 equal `tributary index`'s
    gradient pass at the adapter the fine-tune started from (its seeded initialisation, saved to `scratch`)."""
    import numpy as np

    from engine.config import load_config
    from engine.demo_assets.captured import recipe_lora
    from engine.gradients.context import prepare_index_job
    from engine.gradients.passes import gradient_pass
    from engine.integrations.store_writer import captured_rows
    from engine.store.run_store import RunStore

    train_ids = [json.loads(line)["id"] for line in (workdir / "train.jsonl").read_text().splitlines()]
    run = RunStore.open(str(workdir / "store.zarr"))
    assert run.manifest.complete and [s.steps for s in run.plan.segments] == [8, 8]  # the last epoch apart
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        assert record["generated"] and record["completion"].strip()
        assert {entry["id"] for entry in record["top_k"] + record["bottom_k"]} <= set(train_ids)
        for entry in record["top_k"]:
            assert sum(entry["per_token"]) == pytest.approx(entry["score"], rel=1e-3, abs=1e-6)
    first = run.checkpoint(run.plan.checkpoints[0].name)
    rows = np.flatnonzero(captured_rows(first)["step"] == 1).tolist()
    assert len(rows) == 8
    recipe_lora(model_dir).save_pretrained(str(scratch))
    config = load_config(str(workdir / "config.yaml"))
    job = prepare_index_job(
        config.derive(model={"adapter": str(scratch)}, training_run=None, store={"path": f"{scratch}.zarr"})
    )
    expected = gradient_pass(job.context, [job.tokenized[i] for i in rows], with_covariance=False).grads
    stored = first.read_rows(0, first.rows)[rows]
    np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["index", "exact", "retrain"])
def test_the_demos_written_config_reads_back_as_the_same_config(tmp_path, kind):
    """runs/demo/config.yaml is what a user passes to `tributary query`: read back, it is the demo's config (a
    default written out would read as given, and cluster.node_wait_s without min_nodes is refused)."""
    import yaml

    from engine.config import parse_config
    from engine.demo import _demo_config, _write_config
    from engine.demo_assets.captured import capture_config

    config = _demo_config(tmp_path / "model", tmp_path / "adapter", tmp_path, workers=2, exact=kind == "exact")
    if kind == "retrain":
        config = capture_config(config, steps=16, rows=64)
    _write_config(tmp_path, config)
    assert parse_config(yaml.safe_load((tmp_path / "config.yaml").read_text())) == config
