"""Training questions as seqio Tasks, one per dataset (``art_nq``, ``art_trivia``, ...), read
as data shards (seqio ShardInfo), a run of them per process, and the deterministic batch order on top.

ART trains from questions alone, so a task yields ``{"index", "question"}``: the question's
line in the file (its global position) and its text. The order of batches is a pure
function of (seed, step): epoch e visits the shard in a permutation seeded by (seed, e), so a
resumed run needs nothing but its step to be back at the same place.
"""

from __future__ import annotations

import numpy as np

from art_jax.core.errors import UserError
from art_jax.core.storage import tensorflow
from art_jax.data.questions import read_questions

# the datasets of the paper and its follow-ups; any other name also works (the demo's, a user's)
DATASETS = ("nq", "trivia", "squad", "webq", "entityqs", "msmarco")


def task_name(dataset: str) -> str:
    return f"art_{dataset}"


def register_question_task(dataset: str, path: str):
    """The seqio Task of ``dataset``'s training questions in ``path`` (DPR/ART TSV, DPR JSON or
    JSONL), in seqio's TaskRegistry under ``art_{dataset}`` (replacing an earlier registration,
    since paths come from the config)."""
    import seqio

    if not dataset.isidentifier():
        raise UserError(f"data.dataset: {dataset!r} is not a name like {', '.join(DATASETS)}")
    tf = tensorflow()
    questions = [q.question for q in read_questions(path)]  # parsed and checked line by line here

    def source(split, shuffle_files):
        del split, shuffle_files  # one split; the order is the stream's business
        return tf.data.Dataset.from_tensor_slices({"index": np.arange(len(questions), dtype=np.int64),
                                                   "question": tf.constant(questions, tf.string)})

    name = task_name(dataset)
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(
        source, splits=("train",), num_input_examples={"train": len(questions)}), output_features={})


def read_shard(task, shard: int, num_shards: int) -> tuple[np.ndarray, list[str]]:
    """(global indices, texts) of shard ``shard`` of ``num_shards``: every num_shards-th question
    from the shard-th, so shards differ in size by at most one."""
    import seqio

    dataset = task.get_dataset(None, split="train", shuffle=False, shard_info=seqio.ShardInfo(shard, num_shards))
    rows = list(dataset.as_numpy_iterator())
    return np.array([row["index"] for row in rows], np.int64), [row["question"].decode("utf-8") for row in rows]


class QuestionStream:
    """Batches of this process's shards: ``batch_size`` questions of each shard per step, epoch e
    a permutation seeded by (seed, e) of each shard's first ``per_shard`` questions (every shard
    uses the same size, so all processes agree on the steps of an epoch); a step's batch is
    its shards' batches in shard order."""

    def __init__(self, shards: list[tuple[np.ndarray, list[str]]], *, per_shard: int, batch_size: int, seed: int):
        if per_shard < batch_size:
            raise UserError(f"train.batch_size: {batch_size} questions per data shard per step, but each shard "
                            f"holds {per_shard} training questions")
        self.shards = shards
        self.per_shard, self.batch_size, self.seed = per_shard, batch_size, seed
        self.steps_per_epoch = per_shard // batch_size

    def batch(self, step: int) -> tuple[np.ndarray, list[str]]:
        """(global indices, texts) of this process's questions of ``step``."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.per_shard)
        chosen = order[offset * self.batch_size:(offset + 1) * self.batch_size]
        indices = np.concatenate([shard_indices[chosen] for shard_indices, _ in self.shards])
        return indices, [texts[i] for _, texts in self.shards for i in chosen]


def question_stream(dataset: str, path: str, *, batch_size: int, seed: int, num_shards: int, process: int = 0,
                    processes: int = 1) -> QuestionStream:
    """The training questions of ``path`` split into ``num_shards`` seqio shards, of which process
    ``process`` of ``processes`` reads an equal run; each shard gives ``batch_size // num_shards``
    questions of each global batch. The global batch depends on (seed, step, num_shards) only,
    not on the number of processes, so a run can resume on another number of hosts and a 1-process
    rehearsal reproduces a multi-process run."""
    if num_shards % processes:
        raise UserError(f"data.shards={num_shards} must be a multiple of the {processes} processes")
    if batch_size % num_shards:
        raise UserError(f"train.batch_size={batch_size} must divide evenly over data.shards={num_shards}")
    task = register_question_task(dataset, path)
    per_process = num_shards // processes
    shards = [read_shard(task, shard, num_shards) for shard in range(process * per_process, (process + 1) * per_process)]
    return QuestionStream(shards, per_shard=task.num_input_examples("train") // num_shards,
                          batch_size=batch_size // num_shards, seed=seed)
