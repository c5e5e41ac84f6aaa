"""Reading user files with errors that name the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.remote import local_copy


def read_jsonl(path: str, required: tuple[str, ...] = (),
               nonblank: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Objects of a JSONL file; a bad line is an error naming file and line. ``required``
    fields must be strings; ``nonblank`` ones must also hold more than whitespace."""
    path = local_copy(path)
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object")
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
        text = storage.read_text(path)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
