"""Property-based tests (hypothesis) of the parsers users feed: the YAML job config, JSONL and Parquet rows and
query files, and the results reader. Whatever they are given, they return a result or raise one
TributaryError (which the CLI prints as one line); never another exception, which would reach the user as
a traceback. Where the input is well-formed, what they return is compared with what was written.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import JobConfig, load_config, parse_config
from engine.data.rows import read_rows
from engine.errors import TributaryError
from engine.report.html import load_results

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECTIONS = ["model", "data", "projection", "curvature", "method", "store", "serve", "cluster", "placement"]
KEYS = [
    "path", "train", "dim", "seed", "strategy", "name", "dtype", "batch_size", "max_length", "rows_per_chunk",
    "port", "workers", "kind", "lambdas", "text_field", "max_top_k", "approximate", "address", "eta", "steps",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["float32", "ekfac", "if", "auto", "grad_dot", "local", "0", "-1", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner)
    ),
    max_leaves=12,
)
sections = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), values, max_size=6)
configs = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS), st.text(max_size=10)), st.one_of(sections, values), max_size=8
)


def _only_tributary_errors(call) -> object | None:
    try:
        return call()
    except TributaryError as error:
        assert str(error).strip(), "an empty message"
        return None


# ---- the job config ---------------------------------------------------------------------------------------
@SETTINGS
@given(raw=configs)
def test_any_mapping_is_a_config_or_one_tributary_error(raw):
    result = _only_tributary_errors(lambda: parse_config(raw))
    assert result is None or isinstance(result, JobConfig)


@SETTINGS
@given(raw=configs)
def test_any_mapping_written_as_yaml_is_a_config_or_one_tributary_error(raw):
    import yaml

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_text(yaml.safe_dump(raw))
        result = _only_tributary_errors(lambda: load_config(path))
    assert result is None or isinstance(result, JobConfig)


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_any_yaml_text_is_a_config_or_one_tributary_error_of_one_line(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            load_config(path)
        except TributaryError as error:
            if "not valid YAML" in str(error):
                assert "\n" not in str(error)


# ---- rows and query files -----------------------------------------------------------------------------------
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
ROW_KEYS = ["id", "text", "prompt", "completion", "messages", "role", "content"]
records = st.dictionaries(st.one_of(st.sampled_from(ROW_KEYS), st.text(max_size=6)), json_values, max_size=5)
lines = st.one_of(records.map(json.dumps), json_values.map(json.dumps), st.text(max_size=40))


@SETTINGS
@given(content=st.lists(lines, max_size=6), raw_bytes=st.binary(max_size=30))
def test_any_jsonl_file_is_rows_or_one_tributary_error(content, raw_bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_bytes("\n".join(content).encode("utf-8", "surrogatepass") + raw_bytes)
        for what in ("training file", "queries file"):
            _only_tributary_errors(lambda what=what: read_rows(path, what=what))


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(st.text(min_size=1, max_size=10), st.text(max_size=30).filter(lambda t: t.strip())),
        min_size=1,
        max_size=6,
        unique_by=lambda row: row[0],
    )
)
def test_well_formed_jsonl_rows_come_back_as_written(rows):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows))
        read = read_rows(path)
    assert [(row.id, row.text, row.line) for row in read] == [(i, t, n + 1) for n, (i, t) in enumerate(rows)]


COLUMN_VALUES = {
    "string": st.one_of(st.none(), st.text(max_size=20)),
    "int": st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    "float": st.one_of(st.none(), st.floats()),
    "list": st.one_of(st.none(), st.lists(st.text(max_size=5), max_size=3)),
}


@st.composite
def tables(draw):
    rows = draw(st.integers(min_value=0, max_value=5))
    names = draw(st.lists(st.sampled_from(ROW_KEYS + ["extra"]), unique=True, max_size=4))
    columns = {}
    for name in names:
        kind = draw(st.sampled_from(sorted(COLUMN_VALUES)))
        columns[name] = (kind, draw(st.lists(COLUMN_VALUES[kind], min_size=rows, max_size=rows)))
    return rows, columns


@SETTINGS
@given(table=tables())
def test_any_parquet_file_is_rows_or_one_tributary_error(table):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, columns = table
    types = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "list": pa.list_(pa.string())}
    arrays = {name: pa.array(values, type=types[kind]) for name, (kind, values) in columns.items()}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.parquet"
        pq.write_table(pa.table(arrays) if arrays else pa.table({"empty": pa.array([None] * rows)}), path)
        for what in ("training file", "queries file"):
            _only_tributary_errors(lambda what=what: read_rows(path, what=what))


# ---- the results reader -------------------------------------------------------------------------------------
@SETTINGS
@given(content=st.lists(lines, max_size=6), raw_bytes=st.binary(max_size=30))
def test_any_results_file_is_records_or_one_tributary_error(content, raw_bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "results.jsonl"
        path.write_bytes("\n".join(content).encode("utf-8", "surrogatepass") + raw_bytes)
        try:
            result = load_results(path)
        except TributaryError:
            return
    assert all(isinstance(record, dict) for record in result)


@pytest.mark.parametrize("depth", [100_000])
def test_json_nested_past_the_recursion_limit_is_one_tributary_error(tmp_path, depth):
    """What hypothesis's nesting cannot reach: json.loads raises RecursionError past Python's limit."""
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * depth + "]" * depth + "\n")
    for call in (lambda: read_rows(path), lambda: load_results(path)):
        with pytest.raises(TributaryError, match="nested too deeply"):
            call()
