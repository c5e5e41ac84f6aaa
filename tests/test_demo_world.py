"""The generated demo world: deterministic, answerable from the gold passage's text but not
from most others, identified by its rare name tokens, learnable by a bag-of-words
query-likelihood ranker, and read back unchanged by the corpus and question readers."""

import re
from collections import Counter

import numpy as np
import pytest

from art_jax.data.corpus import iter_passages
from art_jax.data.demo_world import make_world, write_world
from art_jax.data.questions import read_questions
from art_jax.evaluation.answers import has_answer, simple_tokenize


@pytest.fixture(scope="module")
def world():
    return make_world()


def _gold(world, question):
    """The passages of the entity a question names (the title that occurs in it)."""
    (name,) = {title for _, title, _ in world.passages if title in question.question}
    return [(pid, title, text) for pid, title, text in world.passages if title == name]


def test_deterministic_from_the_seed():
    world = make_world(seed=3, entities=30)
    assert world == make_world(seed=3, entities=30)
    other = make_world(seed=4, entities=30)
    assert other.passages != world.passages and other.train != world.train


def test_shape_and_unique_ids_and_names(world):
    ids = [pid for pid, _, _ in world.passages]
    assert ids == list(range(1, 401))
    names = Counter(title for _, title, _ in world.passages)
    assert len(names) == 200 and set(names.values()) == {2}
    words = [word for name in names for word in name.split()]
    assert len(words) == 400 and len(set(words)) == 400  # no name word is shared by two entities
    assert len(world.train) >= 700 and len(world.dev) >= 150
    assert len(set(world.train) | set(world.dev)) == len(world.train) + len(world.dev)
    for _, title, text in world.passages:
        assert title in text and 12 <= len(text.split()) <= 25
        assert not set('\t\n"') & set(text + title)  # DPR TSV rows need no quoting


def test_gold_text_holds_the_answer_and_most_passages_do_not(world):
    texts = [text for _, _, text in world.passages]
    shares = {}
    for q in world.train + world.dev:
        assert q.answers and all(q.answers)
        gold = _gold(world, q)
        assert any(has_answer(q.answers, text) for _, _, text in gold)
        assert not any(has_answer(q.answers, title) for _, title, _ in gold)  # the title never helps
        if q.answers not in shares:  # answers repeat (small pools): match each once
            shares[q.answers] = np.mean([has_answer(q.answers, text) for text in texts])
    assert max(shares.values()) <= 0.25


def test_question_rare_tokens_are_in_the_gold_passage(world):
    questions = world.train + world.dev
    frequency = Counter(token for q in questions for token in set(simple_tokenize(q.question)))
    passage_frequency = Counter(token for _, _, text in world.passages for token in set(simple_tokenize(text)))
    for q in questions:
        gold = _gold(world, q)
        rare = {t for t in simple_tokenize(q.question) if frequency[t] < 0.05 * len(questions)}
        assert rare and rare <= set(simple_tokenize(gold[0][2]))
        # The name tokens occur in that entity's passages only.
        assert all(passage_frequency[t] == len(gold) for t in rare)


def _ql_ranking(passages, questions, mu=50.0):
    """Passage rows of each question, best first, by Dirichlet query likelihood over words."""
    vocab = {}
    docs = [[vocab.setdefault(t, len(vocab)) for t in simple_tokenize(text)] for _, _, text in passages]
    counts = np.zeros((len(docs), len(vocab)))
    for row, doc in enumerate(docs):
        np.add.at(counts[row], doc, 1)
    background = counts.sum(0) / counts.sum()
    log_probs = np.log(counts + mu * background) - np.log(counts.sum(1, keepdims=True) + mu)
    # Words no passage has add the same to every passage's score: leave them out.
    scores = np.stack([log_probs[:, [vocab[t] for t in simple_tokenize(q.question) if t in vocab]].sum(1)
                       for q in questions])
    return np.argsort(-scores, axis=1, kind="stable")


def test_query_likelihood_oracle_finds_the_answer(world):
    top5 = _ql_ranking(world.passages, world.dev)[:, :5]
    hits = [any(has_answer(q.answers, world.passages[row][2]) for row in rows) for q, rows in zip(world.dev, top5)]
    assert np.mean(hits) >= 0.8


def test_write_world_round_trip(tmp_path):
    world = make_world(seed=1, entities=20, facts_per_entity=3)
    paths = write_world(world, str(tmp_path / "demo"))
    assert [(p.id, p.title, p.text) for p in iter_passages(paths["corpus"])] == world.passages
    assert read_questions(paths["train"]) == world.train and read_questions(paths["dev"]) == world.dev


@pytest.mark.parametrize("kwargs", [dict(entities=0), dict(facts_per_entity=4), dict(dev_fraction=1.0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_world(**kwargs)


def test_a_restated_world_is_the_same_world_with_each_fact_in_two_passages():
    """Each passage ends with its person's other passage's facts (place, year, instrument)."""
    plain, restated = make_world(seed=2, entities=30), make_world(seed=2, entities=30, restate=True)
    assert (plain.train, plain.dev) == (restated.train, restated.dev)
    for (pid, title, text), (_, _, again) in zip(plain.passages, restated.passages):
        assert again.startswith(text + " ")
        (other,) = [t for i, name, t in plain.passages if name == title and i != pid]  # two passages each
        added = again[len(text) + 1:]
        assert added.startswith(title)
        facts = re.findall(r"\b(?:[A-Z][a-z]+(?: [A-Z][a-z]+)*|\d{4}|[a-z]+)\b", added[len(title):])
        content = [f for f in facts if f not in ("was", "born", "in", "played", "the", "died")]
        assert content and all(f in other for f in content), (added, other)
