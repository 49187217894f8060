"""Read JSONL rows into text, prompt/completion or chat records, naming file and line for any bad row."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from engine.config import JobConfig
from engine.data.chat import Messages, parse_messages
from engine.data.chat import display as chat_display
from engine.data.lines import json_records
from engine.errors import TributaryError


@dataclass(frozen=True)
class Row:
    """One example: `text` (every token counts), `prompt` + `completion` (only completion tokens count)
    or `messages`, a conversation of (role, content) pairs (only assistant turns count; engine/data/chat.py)."""

    index: int
    id: str
    line: int
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: Messages | None = None

    @property
    def display(self) -> str:
        if self.text is not None:
            return self.text
        if self.messages is not None:
            return chat_display(self.messages)
        return f"{self.prompt}{self.completion}"

    def snippet(self, chars: int) -> str:
        """What results show of the row: a prompt/completion row by its completion (the text it taught; its
        prompt carries no loss), any other row by its display text."""
        return (self.completion if self.completion is not None else self.display)[:chars]


@dataclass(frozen=True)
class FieldNames:
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    id: str = "id"
    messages: str = "messages"


def field_names(config: JobConfig) -> FieldNames:
    data = config.data
    return FieldNames(
        text=data.text_field,
        prompt=data.prompt_field,
        completion=data.completion_field,
        id=data.id_field,
        messages=data.messages_field,
    )


def file_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _row_from_record(record: object, index: int, line: int, fields: FieldNames, source: str) -> Row:
    where = f"{source}:{line}"
    if not isinstance(record, dict):
        raise TributaryError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    row_id = str(record.get(fields.id, index))
    if fields.text in record:
        text = record[fields.text]
        if not isinstance(text, str):
            raise TributaryError(f"{where}: field '{fields.text}' must be a string")
        if not text.strip():
            raise TributaryError(f"{where}: field '{fields.text}' is empty; remove the row or give it text")
        return Row(index=index, id=row_id, line=line, text=text)
    if fields.messages in record and not (fields.prompt in record and fields.completion in record):
        # a chat row; a stray prompt field (as in UltraChat: prompt + messages) does not make it a prompt row
        messages = parse_messages(record[fields.messages], where, fields.messages)
        return Row(index=index, id=row_id, line=line, messages=messages)
    if fields.prompt in record or fields.completion in record:
        prompt = record.get(fields.prompt)
        completion = record.get(fields.completion)
        if not isinstance(prompt, str):
            raise TributaryError(f"{where}: field '{fields.prompt}' is missing or not a string")
        if not isinstance(completion, str):
            raise TributaryError(
                f"{where}: field '{fields.completion}' is missing or not a string; a prompt row needs a completion"
            )
        if not completion.strip():
            raise TributaryError(
                f"{where}: field '{fields.completion}' is empty; nothing would carry loss — remove the row "
                "or give it a completion"
            )
        return Row(index=index, id=row_id, line=line, prompt=prompt, completion=completion)
    raise TributaryError(
        f"{where}: row has neither '{fields.text}' nor '{fields.prompt}'+'{fields.completion}' nor "
        f"'{fields.messages}' (keys: {sorted(record)}); set data.text_field / prompt_field / completion_field / "
        "messages_field to match"
    )


def read_rows(path: str | Path, fields: FieldNames = FieldNames(), what: str = "training file") -> list[Row]:
    """All rows of a JSONL file, in file order. Blank lines are skipped; anything else malformed is an error."""
    path = Path(path)
    rows: list[Row] = []
    for line_number, record in json_records(path, what):
        rows.append(_row_from_record(record, len(rows), line_number, fields, str(path)))
    if not rows:
        raise TributaryError(f"{what} {path} has no rows")
    seen: dict[str, int] = {}
    for row in rows:
        if row.id in seen:
            raise TributaryError(
                f"{path}:{row.line}: id '{row.id}' already used on line {seen[row.id]}; ids must be unique"
            )
        seen[row.id] = row.line
    return rows
