"""A query row of 10 MB: the record echoes at most ECHO_CHARS characters of its text, prompt and completion
(with `truncated` giving each cut field's full length), keeps its id and its tokens, and the query process
stays far below the 1.6 GB that tokenising the row whole took; the tokens kept equal those of the whole row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.data.rows import Row
from engine.data.tokenize import tokenize_row
from engine.query.records import ECHO_CHARS
from tests.conftest import SENTENCES, job_config, write_jsonl
from tests.distributed_helpers import ROOT, write_config

TEN_MB = 10_000_000
PEAK_LIMIT_MB = 900  # tokenising the whole row peaked at 1.6 GB; the process itself needs about 450 MB

# runs the CLI in a child and prints that child's own peak resident memory (kB) last: VmHWM belongs to the
# child's address space (getrusage's ru_maxrss would also count the forked test process's peak)
MEASURED_CLI = (
    "import sys\n"
    "from engine.cli import app\n"
    "try:\n"
    "    app(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    status = open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
    "    print('peak_kb', status, file=sys.stderr)\n"
    "    raise\n"
)


def _long_text(chars: int) -> str:
    words = " ".join(SENTENCES) + " "
    return (words * (chars // len(words) + 1))[:chars]


@pytest.fixture(scope="module")
def indexed(tiny_models, tmp_path_factory):
    from engine.config import parse_config
    from engine.local_or_ray import run_index

    root = tmp_path_factory.mktemp("echo")
    train = write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "text": s} for i, s in enumerate(SENTENCES)])
    raw = job_config(root, tiny_models["gpt2"], train, projection={"dim": 4})
    run_index(parse_config(raw), show_progress=False)
    return root, write_config(root / "job.yaml", raw)


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="reads the peak memory from /proc")
@pytest.mark.parametrize("kind", ["completion", "text"])
def test_a_10_mb_query_row_is_echoed_capped_in_bounded_memory(indexed, kind, tiny_models):
    root, config = indexed
    long = _long_text(TEN_MB)
    row = {"id": "huge", "prompt": "the fox eats", "completion": " " + long} if kind == "completion" else None
    row = row or {"id": "huge", "text": long}
    queries = write_jsonl(root / f"{kind}.jsonl", [row])
    out = root / f"{kind}.results.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", MEASURED_CLI, "query", str(config), "--queries", str(queries), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stderr.split("peak_kb")[-1].split()[0]) / 1024
    assert peak_mb < PEAK_LIMIT_MB, f"peak {peak_mb:.0f} MB"

    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["id"] == "huge"
    echoed = row[kind]
    assert record[kind] == echoed[:ECHO_CHARS] and len(record[kind]) == ECHO_CHARS
    assert record["truncated"] == {kind: len(echoed)}
    assert out.stat().st_size < 20_000

    # the tokens attributed are those of the whole row (tokenised whole here, independently), cut to max_length
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    max_length = 32
    if kind == "text":
        whole = tokenizer(long)["input_ids"][:max_length]
        pieces = tokenizer.convert_ids_to_tokens(whole[1:])
    else:
        prompt = tokenizer("the fox eats")["input_ids"]
        whole = (prompt + tokenizer(" " + long, add_special_tokens=False)["input_ids"])[:max_length]
        pieces = tokenizer.convert_ids_to_tokens(whole[len(prompt) :])
    parsed = Row(
        index=0, id="huge", line=1, text=row.get("text"), prompt=row.get("prompt"), completion=row.get("completion")
    )
    cut, _ = tokenize_row(parsed, tokenizer, max_length, "q")
    assert cut.input_ids == whole
    assert len(record["completion_tokens"]) == len(pieces)


def test_a_short_query_is_echoed_whole(indexed):
    root, config = indexed
    queries = write_jsonl(root / "short.jsonl", [{"id": "s", "prompt": "the fox eats", "completion": " clams"}])
    out = root / "short.results.jsonl"
    from tests.cli_helpers import invoke

    assert invoke("query", config, "--queries", queries, "--out", out).exit_code == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (record["prompt"], record["completion"]) == ("the fox eats", " clams") and "truncated" not in record
