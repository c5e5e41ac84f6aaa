"""Supervised retriever training examples: DPR's training JSON (``question``, ``answers``,
``positive_ctxs``, ``negative_ctxs``, ``hard_negative_ctxs``, as ``biencoder-nq-train.json``;
also one such object per line) and Tevatron's JSONL (``query``, ``positive_passages``,
``negative_passages``, whose negatives are mined hard negatives)."""

from __future__ import annotations

import dataclasses
from typing import Any

from art_jax.core.errors import UserError
from art_jax.core.fileio import local_file, numbered_jsonl, read_json, text_lines


@dataclasses.dataclass(frozen=True)
class TrainingPassage:
    title: str
    text: str
    passage_id: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainingExample:
    question: str
    answers: tuple[str, ...]
    positives: tuple[TrainingPassage, ...]  # DPR trains on the first
    hard_negatives: tuple[TrainingPassage, ...]


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    examples: list[TrainingExample]
    without_positive: int  # examples left out: nothing to train on (DPR drops them too)


# field names of the question, the positives and the hard negatives, by format
_DPR = ("question", "positive_ctxs", "hard_negative_ctxs")
_TEVATRON = ("query", "positive_passages", "negative_passages")


def read_training_examples(path: str) -> TrainingSet:
    """Every example of ``path`` (local or gs://): a JSON list, or JSONL of DPR or Tevatron
    objects. Examples without a positive are counted and left out; a file with none left,
    or a malformed example, is an error naming file and line (or item)."""
    local = local_file(path)
    first = next((line.lstrip()[0] for _, line in text_lines(local) if line.strip()), "")
    if first == "[":
        items = read_json(local)
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON list of training examples")
        parsed = [_example(item, f"{path}: item {i}") for i, item in enumerate(items)]
    else:
        parsed = [_example(row, f"{path}:{number}") for number, row in numbered_jsonl(local)]
    examples = [example for example in parsed if example.positives]
    if not examples:
        raise UserError(f"{path}: no training example with a positive passage ({len(parsed)} example(s) read)")
    return TrainingSet(examples, len(parsed) - len(examples))


def _example(item: Any, where: str) -> TrainingExample:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object")
    question_key, positive_key, negative_key = _TEVATRON if "query" in item and "question" not in item else _DPR
    question = item.get(question_key)
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: missing or empty {question_key!r}")
    answers = item.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{where}: 'answers' must be a list of strings")
    return TrainingExample(question, tuple(answers), _passages(item, positive_key, where),
                           _passages(item, negative_key, where))


def _passages(item: dict, key: str, where: str) -> tuple[TrainingPassage, ...]:
    value = item.get(key, [])
    if not isinstance(value, list):
        raise UserError(f"{where}: {key!r} must be a list of passages")
    passages = []
    for i, ctx in enumerate(value):
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
            raise UserError(f"{where}: {key}[{i}] needs a string 'text'")
        title = ctx.get("title", "")
        if not isinstance(title, str):
            raise UserError(f"{where}: {key}[{i}]: 'title' must be a string")
        pid = ctx.get("passage_id", ctx.get("docid"))
        passages.append(TrainingPassage(title, ctx["text"], None if pid is None else str(pid)))
    return tuple(passages)
