"""The result records of a query run: one JSON object per query, the same from the CLI and the service."""

from __future__ import annotations

from dataclasses import dataclass

from engine.data.tokenize import TokenizedRow
from engine.query.scoring import QueryResult


@dataclass
class Query:
    """One query as attributed: its display fields and the exact tokens whose measurement is scored."""

    id: str
    row: TokenizedRow
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    generated: bool = False


def _entries(
    kind: str, q: int, result: QueryResult, ids: list[str], snippets: list[str] | None, module_names: list[str]
) -> list[dict]:
    indices = result.top_indices if kind == "top" else result.bottom_indices
    scores = result.top_scores if kind == "top" else result.bottom_scores
    entries = []
    for rank, (index, score) in enumerate(zip(indices[q], scores[q]), start=1):
        entry = {"rank": rank, "index": int(index), "id": ids[index], "score": float(score)}
        if snippets is not None:
            entry["snippet"] = snippets[index]
        if result.per_module is not None:
            entry["per_module"] = {
                name: float(result.per_module[kind][q][rank - 1, m]) for m, name in enumerate(module_names)
            }
        if result.per_token is not None:
            entry["per_token"] = [float(x) for x in result.per_token[kind][q][rank - 1]]
        entries.append(entry)
    return entries


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
    records = []
    for q, query in enumerate(queries):
        record = {
            "query": q,
            "id": query.id,
            "method": method,
            "measurement": measurement,
            "generated": query.generated,
            "completion_tokens": pieces[q],
            "top_k": _entries("top", q, result, ids, snippets, module_names),
            "bottom_k": _entries("bottom", q, result, ids, snippets, module_names),
        }
        if result.per_token is not None and record["top_k"]:
            record["token_scores"] = record["top_k"][0]["per_token"]
        if query.text is not None:
            record["text"] = query.text
        else:
            record.update(prompt=query.prompt, completion=query.completion)
        records.append(record)
    return records
