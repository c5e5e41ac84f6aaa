"""The questions the end-to-end methods (``end_to_end.py``) train on and evaluate with: a question
file's questions with answers (``data.train_questions``, ``data.dev_questions``), or the masked
sentences of a salient-span store (``data.salient_spans``; masked-salient-span pre-training), of
which ``data.salient_dev`` held-out examples can be the dev questions.

A span example reads differently per model: the question tower sees [MASK] where a span was, the
reader T5's sentinels; the reader's target is the span (several spans each after its sentinel),
a greedy answer is matched against the spans in order, and retrieval's answer match looks for any
span. The passage the sentence came from is kept out of the example's top-K (``exclude``), or, with
``data.salient_source_passage``, is the one passage the reader reads (a reader warm-up).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from art_jax.core.distributed import is_lead
from art_jax.core.errors import UserError
from art_jax.data.questions import Question, read_questions
from art_jax.data.salient_spans import gold_answer, reader_query, reader_target, retriever_query
from art_jax.data.span_store import SpanStore


@dataclasses.dataclass(frozen=True)
class Questions:
    retriever: list[str]  # the question tower's text
    reader: list[str]  # the reader's question
    targets: list[tuple[str, ...]]  # answers a training target is drawn from
    gold: list[tuple[str, ...]]  # answers a generated answer is matched against (EM, F1)
    matches: list[tuple[str, ...]]  # answers a retrieved passage is searched for (top-k accuracy)
    exclude: np.ndarray | None  # [n] the corpus row kept out of each question's top-K, or None

    def __len__(self) -> int:
        return len(self.retriever)

    def for_retrieval(self) -> list[Question]:
        return [Question(text, answers) for text, answers in zip(self.retriever, self.matches)]


class FileQuestions:
    """A question file's questions that have answers."""

    def __init__(self, path: str, key: str):
        questions = read_questions(path)
        self.questions = [q for q in questions if q.answers]
        if not self.questions:
            raise UserError(f"{key}: {path} has no question with answers")
        if len(self.questions) < len(questions) and is_lead():
            print(f"{path}: {len(questions) - len(self.questions)} question(s) without answers left out")

    def __len__(self) -> int:
        return len(self.questions)

    def take(self, indices) -> Questions:
        chosen = [self.questions[int(i)] for i in indices]
        texts, answers = [q.question for q in chosen], [q.answers for q in chosen]
        return Questions(texts, texts, answers, answers, answers, None)

    def excluded(self, indices) -> None:
        return None


class SpanQuestions:
    """A span store's examples but the held-out ones (``held_out``: sorted example numbers)."""

    def __init__(self, store: SpanStore, held_out: np.ndarray, retriever_tokenizer, reader_tokenizer):
        self.store, self.held_out = store, held_out
        self.retriever_tokenizer, self.reader_tokenizer = retriever_tokenizer, reader_tokenizer
        # the i-th kept example is example i + (held-out examples at or before it): searched on
        # held_out[j] - j, the kept examples before held-out example j, without a table of every example
        self._kept_before = held_out - np.arange(len(held_out))

    def __len__(self) -> int:
        return len(self.store) - len(self.held_out)

    def examples(self, indices) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        return indices + np.searchsorted(self._kept_before, indices, side="right")

    def excluded(self, indices) -> np.ndarray:
        """[n] the passage each example came from."""
        return self.store.passages[self.examples(indices)]

    def take(self, indices) -> Questions:
        return span_questions(self.store, self.examples(indices), self.retriever_tokenizer, self.reader_tokenizer)


def span_questions(store: SpanStore, examples, retriever_tokenizer, reader_tokenizer) -> Questions:
    queries = [store.query(int(e)) for e in examples]
    spans = [store.answers(int(e)) for e in examples]
    return Questions([retriever_query(q, retriever_tokenizer) for q in queries],
                     [reader_query(q, reader_tokenizer) for q in queries],
                     [(reader_target(s, reader_tokenizer),) for s in spans], [(gold_answer(s),) for s in spans],
                     spans, store.passages[np.asarray(examples, np.int64)])


def check_question_sources(cfg) -> None:
    """``data.salient_spans`` or ``data.train_questions``, and at most one source of dev questions."""
    data = cfg.data
    if data.salient_spans and data.train_questions:
        raise UserError("data.salient_spans and data.train_questions are both set; train on one of them")
    if not data.salient_spans and not data.train_questions:
        raise UserError(f"method={cfg.method} needs data.train_questions (questions with their answers) or "
                        "data.salient_spans (a salient-span store: art-jax prepare-salient-spans)")
    if data.salient_dev < 0:
        raise UserError(f"data.salient_dev={data.salient_dev} must be at least 0")
    if data.salient_dev and not data.salient_spans:
        raise UserError("data.salient_dev holds out examples of data.salient_spans, which is not set")
    if data.salient_dev and data.dev_questions:
        raise UserError("data.salient_dev and data.dev_questions are both set; evaluate on one of them")
    if data.salient_source_passage and not data.salient_spans:
        raise UserError("data.salient_source_passage reads the masked sentences of data.salient_spans, which is not "
                        "set")
    if data.salient_source_passage and cfg.train.topk != 1:
        raise UserError(f"data.salient_source_passage reads each sentence with one passage, its own: train.topk="
                        f"{cfg.train.topk} must be 1")


def _file_dev(cfg) -> Questions | None:
    if not cfg.data.dev_questions:
        return None
    questions = FileQuestions(cfg.data.dev_questions, "data.dev_questions")
    return questions.take(range(len(questions)))


def training_questions(cfg, corpus, retriever_tokenizer, reader_tokenizer):
    """(training questions: ``FileQuestions`` or ``SpanQuestions``, dev ``Questions`` or None) of
    the run's data keys; ``corpus``: the run's corpus store."""
    data = cfg.data
    if not data.salient_spans:
        return FileQuestions(data.train_questions, "data.train_questions"), _file_dev(cfg)
    store = SpanStore(data.salient_spans)
    store.check_corpus(corpus, "data.salient_spans")
    if data.salient_dev >= len(store):
        raise UserError(f"data.salient_dev={data.salient_dev} leaves none of {data.salient_spans}'s {len(store)} "
                        "examples to train on")
    held_out = np.sort(np.random.default_rng([cfg.seed, 1]).choice(len(store), data.salient_dev, replace=False))
    dev = span_questions(store, held_out, retriever_tokenizer, reader_tokenizer) if data.salient_dev else None
    return SpanQuestions(store, held_out, retriever_tokenizer, reader_tokenizer), dev or _file_dev(cfg)
