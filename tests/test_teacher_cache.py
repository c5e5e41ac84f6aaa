"""Teacher-score reuse (scorer.cache, teachers/cache.py): served scores are the teacher's own, only
pairs not held are asked for, the oldest are dropped beyond the capacity; in ART's batch the
cached teacher scores equal the uncached ones step after step."""

import json
import shutil

import numpy as np
import pytest

from art_jax.teachers.cache import ScoreCache


class CountingTeacher:
    """Scores a pair by its texts (question, row) and records what it was asked."""

    def __init__(self):
        self.asked = []

    def score_retrieved(self, questions, rows, store, *, batch_size):
        assert rows.shape == (len(questions), 1)  # one row per asked pair
        self.asked.append([(q, int(r)) for q, (r,) in zip(questions, rows)])
        return np.array([[len(q) + 0.01 * int(r)] for q, (r,) in zip(questions, rows)], np.float32)


def _want(questions, rows):
    return np.array([[len(q) + 0.01 * r for r in row] for q, row in zip(questions, rows)], np.float32)


def test_the_cache_serves_the_teachers_scores_and_asks_only_for_new_pairs():
    teacher = CountingTeacher()
    cache = ScoreCache(teacher, capacity=6)
    questions, ids = ["a", "bb"], np.array([10, 20])
    rows = np.array([[1, 2], [1, 3]])
    scores, hits = cache.score_retrieved(questions, ids, rows, store=None, batch_size=8)
    np.testing.assert_array_equal(scores, _want(questions, rows))
    assert hits == 0.0 and sorted(teacher.asked[0]) == [("a", 1), ("a", 2), ("bb", 1), ("bb", 3)]

    # question 10 again with rows 1 (held) and 4 (new), question 30 new: 3 pairs asked, padded to 4
    questions, ids, rows = ["a", "ccc"], np.array([10, 30]), np.array([[1, 4], [5, 6]])
    scores, hits = cache.score_retrieved(questions, ids, rows, store=None, batch_size=8)
    np.testing.assert_array_equal(scores, _want(questions, rows))
    assert hits == 0.25 and len(teacher.asked[1]) == 4
    assert set(teacher.asked[1][:3]) == {("a", 4), ("ccc", 5), ("ccc", 6)}
    # capacity 6: of the 7 pairs the least recently asked went, (10, 2), not the oldest, (10, 1)
    assert len(cache.scores) == 6 and (10, 2) not in cache.scores and (10, 1) in cache.scores
    scores, hits = cache.score_retrieved(["a"], np.array([10]), np.array([[2, 4]]), store=None, batch_size=8)
    assert hits == 0.5 and teacher.asked[2] == [("a", 2)]
    np.testing.assert_array_equal(scores, _want(["a"], [[2, 4]]))


def test_every_process_asks_the_teacher_for_as_many_pairs_even_with_none_missing(monkeypatch):
    """Two processes (simulated: this one and a peer whose counts the allgather returns): this one
    holds all its pairs, the peer misses 11 of 12; both ask the teacher for 11 rounded up to the
    batch of 8 (16, a step's 12 pairs at most: 12), and the hit share is over both processes' pairs."""
    from art_jax.teachers import cache as cache_module

    teacher = CountingTeacher()
    cache = ScoreCache(teacher, capacity=100)
    rows = np.arange(12).reshape(3, 4)
    cache.score_retrieved(["a", "b", "c"], np.array([1, 2, 3]), rows, store=None, batch_size=8)  # one process
    monkeypatch.setattr(cache_module.jax, "process_count", lambda: 2)
    monkeypatch.setattr(cache_module.multihost_utils, "process_allgather",
                        lambda counts: np.stack([counts, np.array([11, 1, 12])]))
    scores, hits = cache.score_retrieved(["a", "b", "c"], np.array([1, 2, 3]), rows, store=None, batch_size=8)
    assert len(teacher.asked[1]) == 12 and hits == 13 / 24
    np.testing.assert_array_equal(scores, _want(["a", "b", "c"], rows))


def test_an_art_batch_with_the_cache_has_the_uncached_teacher_scores(files, bert_dir, tmp_path):
    """The query-likelihood teacher of tests/test_train.py's run: six steps' batches from one state
    and towers without dropout (a question retrieves the same rows every time), with and without
    the cache. Its 40 questions
    are 5 steps of 8: step 5 asks again, in another order, what steps 0-4 asked."""
    import jax
    import optax

    from art_jax.core.errors import UserError
    from art_jax.core.sharding import make_mesh
    from art_jax.methods import METHODS
    from art_jax.retrieval.search import ShardedIndex
    from art_jax.training.state import init_state
    from tests.test_train import _config

    with pytest.raises(UserError, match="scorer.cache=-1 is negative"):
        METHODS["art"].check_config(_config(files, bert_dir, **{"scorer.cache": -1}))
    # the towers without dropout: a question retrieves the same rows whichever batch it is in
    quiet = tmp_path / "bert"
    shutil.copytree(bert_dir, quiet)
    settings = json.loads((quiet / "config.json").read_text())
    settings.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (quiet / "config.json").write_text(json.dumps(settings))
    mesh = make_mesh(devices=jax.devices()[:1])
    made = {cache: METHODS["art"](_config(files, str(quiet), **{"scorer.cache": cache, "train.batch_size": 8}),
                                  str(tmp_path / str(cache)), mesh) for cache in (0, 1000)}
    plain, cached = made[0], made[1000]
    state = init_state(plain.params, optax.identity(), 0)
    tokens = plain.store.retriever_tokens(np.arange(len(plain.store)), 32)
    tower = plain.groups.module(plain.params, "passage")
    index = ShardedIndex.from_array(np.asarray(tower.embed_cls(tokens.ids, tokens.mask)), mesh)
    hit_rates = []
    for step in range(6):
        want, metrics = plain.batch(state, step, index)
        got, cached_metrics = cached.batch(state, step, index)
        assert "teacher_cache_hit_rate" not in metrics
        hit_rates.append(cached_metrics["teacher_cache_hit_rate"])
        np.testing.assert_allclose(np.asarray(got["teacher_scores"]), np.asarray(want["teacher_scores"]),
                                   rtol=1e-6)
    assert hit_rates == [0.0] * 5 + [1.0], hit_rates
