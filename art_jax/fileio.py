"""Reading user files with errors that name the line, and writing results atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from art_jax.errors import UserError
from art_jax.remote import local_copy


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
    path = local_copy(path)
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private files; published results get the usual permissions
FILE_MODE = 0o666 & ~_umask()
FOLDER_MODE = 0o777 & ~_umask()


def atomic_write(path: str, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
