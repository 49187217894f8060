"""Read JSONL rows into text, prompt/completion or chat records, naming file and line for any bad row."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import JobConfig
from engine.data.chat import Messages, parse_messages
from engine.data.chat import display as chat_display
from engine.data.lines import json_records
from engine.data.sources import is_table_source, open_table_source
from engine.data.token_ids import ATTENTION_MASK, INPUT_IDS, LABELS, token_ids_of
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
    input_ids: tuple[int, ...] | None = None  # a pre-tokenized row (engine/data/token_ids.py), used as given
    labels: tuple[int, ...] | None = None  # its labels (-100 = no loss); None: every token after the first counts
    file: str | None = None  # Parquet/Arrow rows: the file they are in (`line` is then the row number in it)

    def location(self, source: str) -> str:
        """Where the row is, for errors: file:line of a JSONL `source`, or the Parquet/Arrow file and row."""
        return f"{self.file} row {self.line}" if self.file is not None else f"{source}:{self.line}"

    @property
    def display(self) -> str:
        if self.input_ids is not None:
            return f"<{len(self.input_ids)} token ids>"
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
    input_ids: str = INPUT_IDS


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


def _row_from_record(
    record: object, index: int, line: int, fields: FieldNames, source: str, file: str | None = None
) -> Row:
    where = f"{file} row {line}" if file is not None else f"{source}:{line}"
    if not isinstance(record, dict):
        raise TributaryError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    row_id = str(record.get(fields.id, index))
    if fields.input_ids in record:
        mixed = [f for f in (fields.text, fields.prompt, fields.completion, fields.messages) if f in record]
        if mixed:
            raise TributaryError(
                f"{where}: row has both '{fields.input_ids}' and '{mixed[0]}'; give either token ids or text, not both"
            )
        ids, labels = token_ids_of(record, where)
        return Row(index=index, id=row_id, line=line, input_ids=ids, labels=labels, file=file)
    if fields.text in record:
        text = record[fields.text]
        if not isinstance(text, str):
            raise TributaryError(f"{where}: field '{fields.text}' must be a string")
        if not text.strip():
            raise TributaryError(f"{where}: field '{fields.text}' is empty; remove the row or give it text")
        return Row(index=index, id=row_id, line=line, text=text, file=file)
    if fields.messages in record and not (fields.prompt in record and fields.completion in record):
        # a chat row; a stray prompt field (as in UltraChat: prompt + messages) does not make it a prompt row
        messages = parse_messages(record[fields.messages], where, fields.messages)
        return Row(index=index, id=row_id, line=line, messages=messages, file=file)
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
        return Row(index=index, id=row_id, line=line, prompt=prompt, completion=completion, file=file)
    raise TributaryError(
        f"{where}: row has neither '{fields.text}' nor '{fields.prompt}'+'{fields.completion}' nor "
        f"'{fields.messages}' nor '{fields.input_ids}' (keys: {sorted(record)}); set data.text_field / prompt_field / completion_field / "
        "messages_field to match"
    )


def read_rows(path: str | Path, fields: FieldNames = FieldNames(), what: str = "training file") -> list[Row]:
    """All rows of a JSONL file, or of Parquet files / a save_to_disk directory (engine/data/sources.py), in
    order. Blank JSONL lines are skipped; anything else malformed is an error. For large Parquet/Arrow inputs
    use iter_rows or rows_between, which hold one batch at a time."""
    if is_table_source(str(path)):
        rows = list(iter_rows(path, fields, what))
        if not rows:
            raise TributaryError(f"{what} {path} has no rows")
        return rows
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


def _columns(fields: FieldNames) -> list[str]:
    return [
        fields.id,
        fields.text,
        fields.prompt,
        fields.completion,
        fields.messages,
        fields.input_ids,
        LABELS,
        ATTENTION_MASK,
    ]


def iter_rows(path: str | Path, fields: FieldNames = FieldNames(), what: str = "training file") -> Iterator[Row]:
    """Every row, in order, one record batch in memory at a time for Parquet/Arrow (JSONL: read whole). Ids are
    checked unique with 8 bytes per row (a hash each); a duplicate is an error once the rows have been read,
    naming both rows."""
    if not is_table_source(str(path)):
        yield from read_rows(path, fields, what)
        return
    source = open_table_source(str(path), what)
    hashes = array("q")
    for row in _table_rows(source, fields, 0, source.rows):
        hashes.append(_id_hash(row.id))
        yield row
    ordered = np.sort(np.frombuffer(hashes, dtype=np.int64))
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if repeated:
        _refuse_repeated_id(source, fields, str(path), repeated)


def _id_hash(row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "little", signed=True)


def _refuse_repeated_id(source, fields: FieldNames, path: str, repeated: set[int]) -> None:
    """A second read, only of ids whose hash repeats: the first id that is really used twice is an error."""
    first: dict[str, str] = {}
    for row in _table_rows(source, fields, 0, source.rows):
        if _id_hash(row.id) not in repeated:
            continue
        where = row.location(path)
        if row.id in first:
            raise TributaryError(f"{where}: id '{row.id}' already used at {first[row.id]}; ids must be unique")
        first[row.id] = where


def rows_between(path: str | Path, fields: FieldNames, start: int, stop: int, what: str = "training file") -> list[Row]:
    """Rows start..stop-1 (a shard): read by row range from Parquet/Arrow, sliced from a whole JSONL read."""
    if not is_table_source(str(path)):
        return read_rows(path, fields, what)[start:stop]
    return list(_table_rows(open_table_source(str(path), what), fields, start, stop))


def row_count(path: str | Path, what: str = "training file") -> int:
    """How many rows, from Parquet metadata or Arrow batch headers (JSONL: by reading the rows)."""
    if not is_table_source(str(path)):
        return len(read_rows(path, FieldNames(), what))
    return open_table_source(str(path), what).rows


def _table_rows(source, fields: FieldNames, start: int, stop: int) -> Iterator[Row]:
    names = source.column_names()
    if source.files and not {fields.text, fields.prompt, fields.completion, fields.messages, fields.input_ids} & set(
        names
    ):
        raise TributaryError(
            f"{source.given}: its columns are {names}, none of them '{fields.text}', '{fields.prompt}'+"
            f"'{fields.completion}' or '{fields.messages}'; set data.text_field / prompt_field / completion_field / "
            "messages_field to the columns that hold the rows"
        )
    index = start
    for file, number, record in source.records(start, stop, _columns(fields)):
        yield _row_from_record(record, index, number, fields, source.given, file=str(file))
        index += 1


def dataset_fingerprint(path: str | Path) -> str:
    """The hash of the training data: the JSONL file's bytes, or every Parquet/Arrow data file's."""
    if is_table_source(str(path)):
        return open_table_source(str(path), "data.train").fingerprint()
    return file_fingerprint(path)
