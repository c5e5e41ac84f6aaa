"""Teacher-score reuse (beyond the reference): a frozen teacher gives a (question, passage) pair the
same score whenever it is asked, and ART asks again for every pair a question retrieves again in a
later epoch. ``ScoreCache`` keeps the run's teacher's scores in host memory, keyed by (global question
index, corpus row) within the one teacher it holds (a run fixes its checkpoint, prompt and dtype: a
cache is never shared between teachers), and scores only the pairs it does not hold; ``scorer.cache``
pairs at most, the least recently asked dropped first. It lives in the process: a resumed run starts
empty.

Each process asks for its own questions. A T5 teacher scores in batches every process runs together
(its params sharded over all devices), so the processes agree on how many pairs they score: the
most any of them misses, the others padding with their first pair, rounded up to a multiple of the
teacher's batch (its batches are full anyway) or, below one batch, to a power of two (a teacher
compiled per shape, query likelihood, then compiles a few shapes); never more than a step's pairs.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
from jax.experimental import multihost_utils


class ScoreCache:
    def __init__(self, teacher, capacity: int):
        self.teacher, self.capacity = teacher, capacity
        self.scores: collections.OrderedDict[tuple[int, int], float] = collections.OrderedDict()

    def score_retrieved(self, questions: list[str], question_ids: np.ndarray, rows: np.ndarray, store, *,
                        batch_size: int) -> tuple[np.ndarray, float]:
        """(scores [B, K] of each question with its K corpus rows, the share of every process's
        pairs served from the cache)."""
        keys = [(int(q), int(r)) for q, question_rows in zip(question_ids, rows) for r in question_rows]
        distinct = list(dict.fromkeys(keys))
        missing = [key for key in distinct if key not in self.scores]
        new = set(missing)
        counts = np.array([len(missing), sum(key not in new for key in keys), len(keys)], np.int64)
        if jax.process_count() > 1:
            counts = multihost_utils.process_allgather(counts)
        counts = counts.reshape(-1, 3)
        fresh = {}
        if counts[:, 0].max():
            asked = missing + [keys[0]] * (_padded(int(counts[:, 0].max()), batch_size, int(counts[:, 2].max()))
                                           - len(missing))
            text = dict(zip((int(q) for q in question_ids), questions))
            scores = self.teacher.score_retrieved([text[q] for q, _ in asked], np.array([[r] for _, r in asked]),
                                                  store, batch_size=batch_size)
            fresh = dict(zip(missing, np.asarray(scores, np.float32).reshape(-1).tolist()))
        found = np.array([fresh[key] if key in fresh else self.scores[key] for key in keys], np.float32)
        for key in distinct:  # the least recently asked go first
            if key in self.scores:
                self.scores.move_to_end(key)
        self.scores.update(fresh)
        while len(self.scores) > self.capacity:
            self.scores.popitem(last=False)
        return found.reshape(rows.shape), float(counts[:, 1].sum() / counts[:, 2].sum())


def _padded(misses: int, batch_size: int, pairs: int) -> int:
    """How many pairs every process asks the teacher for (see the module's docstring)."""
    padded = 1 << (misses - 1).bit_length() if misses < batch_size else -(-misses // batch_size) * batch_size
    return min(padded, pairs)
