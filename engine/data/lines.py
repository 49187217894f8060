"""The numbered lines of a training or query file, read as bytes and decoded here, so that a byte that is
not UTF-8 is an error naming file:line and its byte offset, like any other bad row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from engine.errors import TributaryError


def check_input_file(path: Path, what: str) -> None:
    """A regular file, or an error saying what the path is instead (a directory, a device, nothing)."""
    if path.is_file():
        return
    if path.is_dir():
        raise TributaryError(f"{what} {path} is a directory; give the path of a JSONL file")
    if path.exists():
        raise TributaryError(
            f"{what} {path} is not a regular file (a device, pipe or socket); give the path of a JSONL file"
        )
    raise TributaryError(f"{what} {path} does not exist; check the path")


def _pieces(raw: bytes) -> list[bytes]:
    """One b"\\n"-terminated line cut also at a lone \\r, as Python's universal newlines read text (a raw
    \\r cannot occur inside a JSON string, so it only ever ends a line)."""
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    return raw.split(b"\r")


def numbered_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without its line end) for every line of `path`."""
    check_input_file(path, what)
    line_number = 0
    offset = 0  # of `raw` in the file
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                position = offset  # of `piece` in the file
                for piece in _pieces(raw):
                    line_number += 1
                    try:
                        text = piece.decode("utf-8")
                    except UnicodeDecodeError as error:
                        raise TributaryError(
                            f"{path}:{line_number}: not valid UTF-8: byte 0x{piece[error.start]:02x} at byte offset "
                            f"{position + error.start} of the file ({error.start} into the line); save the file "
                            "as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                        ) from None
                    yield line_number, text
                    position += len(piece) + 1
                offset += len(raw)
    except OSError as error:
        raise TributaryError(f"{what} {path} cannot be read ({error.strerror}); check its permissions") from None


def json_records(path: Path, what: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) for every non-blank line of a JSONL file."""
    for line_number, line in numbered_lines(path, what):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as error:
            raise TributaryError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
        except RecursionError:  # json.loads past Python's recursion limit ([[[[...]]]])
            raise TributaryError(f"{path}:{line_number}: JSON nested too deeply to parse") from None
