"""Training questions through seqio: one registered Task per dataset, shards by seqio
ShardInfo, and a batch order that is a pure function of (seed, step)."""

import json

import numpy as np
import pytest
import seqio

from art_jax.core.errors import UserError
from art_jax.data.tasks import question_stream, read_shard, register_question_task


@pytest.fixture
def questions_file(tmp_path):
    path = tmp_path / "train.jsonl"
    texts = [f"who painted picture number {i}?" for i in range(23)]
    path.write_text("".join(json.dumps({"question": t, "answers": [str(i)]}) + "\n" for i, t in enumerate(texts)))
    return str(path), texts


def test_the_task_is_registered_and_yields_every_question_in_file_order(questions_file):
    path, texts = questions_file
    register_question_task("nq", path)
    task = seqio.get_mixture_or_task("art_nq")  # a user's own pipeline can take it from the registry
    rows = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    assert [int(r["index"]) for r in rows] == list(range(len(texts)))
    assert [r["question"].decode() for r in rows] == texts
    register_question_task("nq", path)  # a second run in the same process re-registers, no error


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_shards_are_disjoint_and_cover_the_file(questions_file, num_shards):
    path, texts = questions_file
    task = register_question_task("trivia", path)
    seen = []
    for shard in range(num_shards):
        indices, shard_texts = read_shard(task, shard, num_shards)
        assert list(indices) == list(range(shard, len(texts), num_shards))  # seqio shards by example
        assert shard_texts == [texts[i] for i in indices]
        seen += list(indices)
    assert sorted(seen) == list(range(len(texts)))


def test_every_question_once_per_epoch_and_the_order_follows_from_the_step(questions_file):
    path, texts = questions_file
    stream = question_stream("webq", path, batch_size=4, seed=7, num_shards=1)
    assert stream.steps_per_epoch == 5  # 23 // 4, the last 3 of each epoch's permutation dropped
    epochs = [np.concatenate([stream.batch(e * 5 + s)[0] for s in range(5)]) for e in range(2)]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 20
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    again = question_stream("webq", path, batch_size=4, seed=7, num_shards=1)
    for step in (0, 3, 7, 12):  # a resumed run needs only the step
        indices, batch_texts = again.batch(step)
        np.testing.assert_array_equal(indices, stream.batch(step)[0])
        assert batch_texts == [texts[i] for i in indices]
    other_seed = question_stream("webq", path, batch_size=4, seed=8, num_shards=1)
    assert not np.array_equal(other_seed.batch(0)[0], stream.batch(0)[0])


def test_processes_take_their_own_shards_and_agree_on_the_epoch(questions_file):
    path, _ = questions_file
    streams = [question_stream("squad", path, batch_size=4, seed=0, num_shards=2, process=p, processes=2)
               for p in range(2)]
    assert [s.steps_per_epoch for s in streams] == [5, 5]  # shards of 12 and 11: both use 11
    for step in range(5):
        first, second = (s.batch(step)[0] for s in streams)
        assert len(first) == len(second) == 2  # 4 per global batch over 2 processes
        assert set(first) <= set(range(0, 23, 2)) and set(second) <= set(range(1, 23, 2))


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_the_global_batch_does_not_depend_on_the_number_of_processes(questions_file, processes):
    """4 data shards read by 1, 2 or 4 processes: the processes' batches, in process order,
    are the same global batch (a 1-process rehearsal reproduces a multi-process run)."""
    path, texts = questions_file
    alone = question_stream("nq", path, batch_size=8, seed=3, num_shards=4)
    streams = [question_stream("nq", path, batch_size=8, seed=3, num_shards=4, process=p, processes=processes)
               for p in range(processes)]
    for step in range(6):  # into the second epoch
        indices, batch_texts = alone.batch(step)
        assert len(set(indices.tolist())) == 8 and batch_texts == [texts[i] for i in indices]
        parts = [s.batch(step) for s in streams]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), indices)
        assert sum((p[1] for p in parts), []) == batch_texts


def test_too_few_questions_for_the_batch_is_named(questions_file):
    path, _ = questions_file
    with pytest.raises(UserError, match="train.batch_size: 16 questions per data shard per step, but each "
                                        "shard holds 11"):
        question_stream("nq", path, batch_size=32, seed=0, num_shards=2, process=1, processes=2)
    with pytest.raises(UserError, match="data.shards=3 must be a multiple of the 2 processes"):
        question_stream("nq", path, batch_size=6, seed=0, num_shards=3, processes=2)
    with pytest.raises(UserError, match="train.batch_size=6 must divide evenly over data.shards=4"):
        question_stream("nq", path, batch_size=6, seed=0, num_shards=4)
    with pytest.raises(UserError, match="data.dataset"):
        register_question_task("not a name", path)
