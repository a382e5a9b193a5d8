"""Reading documents from text files, with errors that point at the bad byte or line.

    .txt    the whole file is one document; with split_lines=True every non-blank line is one
    .jsonl  one JSON object per line; the document is its `text_key` field (blank lines are skipped)

Errors are ValueErrors that start with "FILE:LINE:" (or "FILE:" for whole-file problems) and, for
bad UTF-8, give the byte offset in the file: the position a user needs to fix the data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl")


def check_input_path(path: str | os.PathLike) -> Path:
    """Fail early (before any tokenization) on a missing file or an unsupported extension."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r}; expected one of {list(SUFFIXES)}")
    return path


def _decode(data: bytes, path: Path, file_offset: int, line_number: int | None) -> str:
    """UTF-8 text of `data`, which starts at byte `file_offset` of `path`; errors name the byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        offset = file_offset + err.start
        if line_number is None:  # whole file: count the lines before the bad byte
            line_number = data.count(b"\n", 0, err.start) + 1
        bad = data[err.start : err.start + 1].hex()
        raise ValueError(
            f"{path}:{line_number}: invalid UTF-8 at byte offset {offset} (byte 0x{bad}: {err.reason})"
        ) from None


def read_txt(path: Path, split_lines: bool = False) -> Iterator[str]:
    data = path.read_bytes()
    text = _decode(data, path, file_offset=0, line_number=None)
    if split_lines:
        documents = [line for line in text.splitlines() if line.strip()]
    else:
        documents = [text] if text.strip() else []
    if not documents:
        raise ValueError(f"{path}: no text (the file is empty or blank)")
    yield from documents


def read_jsonl(path: Path, text_key: str = "text") -> Iterator[str]:
    n_documents = 0
    offset = 0  # byte offset of the current line in the file
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            line_start, offset = offset, offset + len(raw)
            line = _decode(raw, path, file_offset=line_start, line_number=line_number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: invalid JSON at column {err.colno}: {err.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            if text_key not in record:
                raise ValueError(
                    f"{path}:{line_number}: no field {text_key!r} (fields: {sorted(record)}); choose one with --text-key"
                )
            text = record[text_key]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{line_number}: field {text_key!r} is a {type(text).__name__}, expected a string"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # a "\ud800" escape decodes to a lone surrogate
                raise ValueError(
                    f"{path}:{line_number}: field {text_key!r} has a lone surrogate at character {err.start}, not valid Unicode"
                ) from None
            if text:
                n_documents += 1
                yield text
    if n_documents == 0:
        raise ValueError(f"{path}: no documents (no line with a non-empty {text_key!r} field)")


def read_documents(path: str | os.PathLike, text_key: str = "text", split_lines: bool = False) -> Iterator[str]:
    """The documents of one input file, streamed (a .jsonl file is read line by line)."""
    path = check_input_path(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path, text_key)
    return read_txt(path, split_lines)
