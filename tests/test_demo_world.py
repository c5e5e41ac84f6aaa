"""The generated demo world: deterministic, answerable from the gold passage's text, not
from most others, and readable back through the corpus and question readers."""

import numpy as np

from art_jax.corpus import iter_passages
from art_jax.data.demo_world import make_world, write_world
from art_jax.data.questions import read_questions
from art_jax.evaluation import has_answer


def test_world_is_deterministic_and_answerable(tmp_path):
    world = make_world(seed=3, entities=40)
    assert world == make_world(seed=3, entities=40) and world != make_world(seed=4, entities=40)
    ids = [pid for pid, _, _ in world.passages]
    assert ids == list(range(1, len(ids) + 1))
    assert len({title for _, title, _ in world.passages}) == 40
    by_title = {}
    for _, title, text in world.passages:
        by_title.setdefault(title, []).append(text)
    shares = []
    for q in world.train + world.dev:
        (name,) = [t for t in by_title if t in q.question]
        assert any(has_answer(q.answers, text) for text in by_title[name])  # the gold text holds the answer
        assert not any(has_answer(q.answers, title) for title in by_title if title != name)  # titles are names
        shares.append(np.mean([has_answer(q.answers, text) for _, _, text in world.passages]))
    assert np.mean(shares) < 0.1  # random retrieval is poor
    paths = write_world(world, str(tmp_path))
    assert [(p.id, p.title, p.text) for p in iter_passages(paths["corpus"])] == world.passages
    assert read_questions(paths["train"]) == world.train and read_questions(paths["dev"]) == world.dev
