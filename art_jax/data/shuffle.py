"""An epoch's order of N examples without holding it: a seeded pseudo-random permutation
of 0..N-1 evaluated at any position (a 4-round Feistel network over the smallest even-bit
domain holding N, cycle-walking the values that land past N). Memory does not grow with N,
so tens of millions of pairs shuffle as cheaply as a thousand, and a step alone says which
examples it takes, on every host alike."""

from __future__ import annotations

import numpy as np

_ROUNDS = 4
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _round_function(values: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of (value + key): a well-mixed 64-bit hash."""
    with np.errstate(over="ignore"):
        z = values + key
        z = (z ^ (z >> np.uint64(30))) * _MIX[0]
        z = (z ^ (z >> np.uint64(27))) * _MIX[1]
        return z ^ (z >> np.uint64(31))


def _keys(seed: int, epoch: int) -> list[np.uint64]:
    words = np.random.default_rng([seed, epoch]).integers(0, 2 ** 63, size=_ROUNDS, dtype=np.int64)
    return [np.uint64(w) for w in words]


def permute(positions, count: int, *, seed: int, epoch: int) -> np.ndarray:
    """The examples (0..count-1) at ``positions`` of epoch ``epoch``'s order: a bijection of
    0..count-1 fixed by (seed, epoch)."""
    positions = np.asarray(positions, dtype=np.uint64)
    if count < 1 or np.any(positions >= count):
        raise ValueError(f"positions must lie in 0..{count - 1}")
    half = max(1, (max(count - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = _keys(seed, epoch)

    def encrypt(values: np.ndarray) -> np.ndarray:
        left, right = values >> np.uint64(half), values & mask
        for key in keys:
            left, right = right, left ^ (_round_function(right, key) & mask)
        return (left << np.uint64(half)) | right

    out = encrypt(positions)
    while np.any(outside := out >= count):  # cycle-walk: stays a bijection of 0..count-1
        out[outside] = encrypt(out[outside])
    return out.astype(np.int64)


def step_positions(step: int, *, steps_per_epoch: int, batch_size: int, accumulation: int, rows: slice,
                   count: int, seed: int) -> tuple[int, list[int]]:
    """The epoch of ``step`` and the examples (of ``count``) that ``rows`` of each of its micro-batches
    take, micro-batch-major: step s takes positions s*B .. s*B+B-1 of its epoch's order, so the step
    alone fixes the data, on every host."""
    epoch, start = divmod(step, steps_per_epoch)
    start *= batch_size
    micro_batch = batch_size // accumulation
    positions = [start + a * micro_batch + j for a in range(accumulation) for j in range(rows.start, rows.stop)]
    return epoch, permute(positions, count, seed=seed, epoch=epoch).tolist()
