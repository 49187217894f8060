"""The result records of a query run: one per query, the same from the CLI and the service.

`QueryAttribution` is the record's one description: `tributary query --out` writes it, the service answers
with it and publishes it in its OpenAPI document. `as_json` is the one place a record becomes JSON (an
absent option, such as a snippet or per-module scores, is left out, not written as null).

A record echoes the query's text, prompt and completion only up to ECHO_CHARS characters each: a 10 MB query
row echoed whole made every record (and the service's answer) that large. `truncated` gives the full length
of each field that was cut; the id and the tokens (which are what was attributed) are kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from engine.data.tokenize import TokenizedRow
from engine.query.scoring import QueryResult

ECHO_CHARS = 2000  # characters of a query's text, prompt and completion a record echoes


@dataclass
class Query:
    """One query as attributed: its display fields and the exact tokens whose measurement is scored."""

    id: str
    row: TokenizedRow
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    generated: bool = False


class TrainingExample(BaseModel):
    rank: int
    index: int = Field(description="row of the training file (0-based)")
    id: str
    score: float = Field(description="positive: the example supports the query")
    snippet: str | None = Field(
        None, description="the start of the training text (absent when data.train is not the indexed file)"
    )
    per_module: dict[str, float] | None = Field(None, description="--per-module: the score of each tracked module")
    per_token: list[float] | None = Field(None, description="--per-token: each completion token's share of the score")
    source: Literal["exact", "store"] | None = Field(
        default=None,
        description="serve.rescore / --rescore: exact when the exact pass scored the example, store when its score "
        "is the store's (absent otherwise)",
    )


class QueryAttribution(BaseModel):
    query: int
    id: str
    method: str
    measurement: str
    generated: bool
    completion_tokens: list[str]
    top_k: list[TrainingExample] = Field(description="most supporting first")
    bottom_k: list[TrainingExample] = Field(description="most opposing (most negative score) first")
    token_scores: list[float] | None = Field(None, description="--per-token: the top example's per_token")
    text: str | None = Field(None, description="a text query")
    prompt: str | None = Field(None, description="a prompt/completion (or generated) query's prompt")
    completion: str | None = None
    truncated: dict[str, int] | None = Field(
        None,
        description=f"the echoed fields cut to their first {ECHO_CHARS} characters, with their full length in "
        "characters",
    )


def _echoed(fields: dict[str, str | None]) -> tuple[dict[str, str | None], dict[str, int] | None]:
    """(each field cut to ECHO_CHARS characters, the full length of each one cut, or None when none was)."""
    cut = {name: len(value) for name, value in fields.items() if value is not None and len(value) > ECHO_CHARS}
    return {name: None if value is None else value[:ECHO_CHARS] for name, value in fields.items()}, cut or None


def as_json(records: list[QueryAttribution]) -> list[dict]:
    """The records as JSON objects, in field order, without the options a record does not carry."""
    return [record.model_dump(exclude_none=True) for record in records]


def _entries(
    kind: str, q: int, result: QueryResult, ids: list[str], snippets: list[str] | None, module_names: list[str]
) -> list[TrainingExample]:
    indices = result.top_indices if kind == "top" else result.bottom_indices
    scores = result.top_scores if kind == "top" else result.bottom_scores
    entries = []
    for rank, (index, score) in enumerate(zip(indices[q], scores[q]), start=1):
        per_module = per_token = None
        if result.per_module is not None:
            per_module = {name: float(result.per_module[kind][q][rank - 1, m]) for m, name in enumerate(module_names)}
        if result.per_token is not None:
            per_token = [float(x) for x in result.per_token[kind][q][rank - 1]]
        entries.append(
            TrainingExample(
                rank=rank,
                index=int(index),
                id=ids[index],
                score=float(score),
                snippet=None if snippets is None else snippets[index],
                per_module=per_module,
                per_token=per_token,
            )
        )
    return entries


def attributions(
    queries: list[Query],
    result: QueryResult,
    ids: list[str],
    snippets: list[str] | None,
    method: str,
    measurement: str,
    module_names: list[str],
    pieces: list[list[str]],
) -> list[QueryAttribution]:
    records = []
    for q, query in enumerate(queries):
        top = _entries("top", q, result, ids, snippets, module_names)
        echoed, truncated = _echoed(
            {
                "text": query.text,
                "prompt": query.prompt if query.text is None else None,
                "completion": query.completion if query.text is None else None,
            }
        )
        records.append(
            QueryAttribution(
                query=q,
                id=query.id,
                method=method,
                measurement=measurement,
                generated=query.generated,
                completion_tokens=pieces[q],
                top_k=top,
                bottom_k=_entries("bottom", q, result, ids, snippets, module_names),
                token_scores=top[0].per_token if top else None,
                text=echoed["text"],
                prompt=echoed["prompt"],
                completion=echoed["completion"],
                truncated=truncated,
            )
        )
    return records


def result_records(
    queries: list[Query],
    result: QueryResult,
    ids: list[str],
    snippets: list[str] | None,
    method: str,
    measurement: str,
    module_names: list[str],
    pieces: list[list[str]],
) -> list[dict]:
    """The JSON records of a scored group of queries: what `--out` writes a line of and the service answers."""
    return as_json(attributions(queries, result, ids, snippets, method, measurement, module_names, pieces))
