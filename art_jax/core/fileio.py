"""Reading user files with errors that name the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.remote import local_copy


def local_file(path: str) -> str:
    """The input file ``path`` on local disk (a URL's cached copy), checked to be a file."""
    local = local_copy(path)
    if os.path.isdir(local):
        raise UserError(f"{path}: is a folder, expected a file")
    if not os.path.isfile(local):
        raise UserError(f"file not found: {path}")
    return local


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) of a local UTF-8 text file; a line that is not
    UTF-8 is an error naming file and line (decoding the whole stream would name neither)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{number}: invalid UTF-8") from None
            yield number, line.removesuffix("\n").removesuffix("\r")


def numbered_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file; a line that is not a JSON
    object is an error naming file and line."""
    path = local_file(path)
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object")
        yield number, row


def read_jsonl(path: str, required: tuple[str, ...] = (),
               nonblank: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Objects of a JSONL file; a bad line is an error naming file and line. ``required``
    fields must be strings; ``nonblank`` ones must also hold more than whitespace."""
    path = local_file(path)
    for number, row in numbered_jsonl(path):
        missing = [k for k in required if not isinstance(row.get(k), str)]
        if missing:
            raise UserError(f"{path}:{number}: missing or non-string field(s) {', '.join(missing)}")
        blank = [k for k in nonblank if not isinstance(row.get(k), str) or not row[k].strip()]
        if blank:
            raise UserError(f"{path}:{number}: empty {', '.join(blank)}")
        yield row


def read_json(path: str) -> Any:
    """A JSON file, local or a URL (read whole, not cached: workdir files change)."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a file") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: invalid UTF-8") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
