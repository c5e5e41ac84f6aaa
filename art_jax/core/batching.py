"""Padding token rows to a few static shapes (each new shape costs a jit compile)."""

from __future__ import annotations

import numpy as np


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def pad_rows(rows: list[list[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids [len(rows), length] padded with ``pad_id``, and the 0/1 mask."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask
