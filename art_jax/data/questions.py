"""Question files: DPR/ART TSV (``question<TAB>['a1', 'a2']``), DPR JSON lists and JSONL."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from typing import Any

from art_jax.core.errors import UserError
from art_jax.core.fileio import read_json, read_jsonl
from art_jax.core.remote import local_copy


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...] = ()


def read_questions(path: str) -> list[Question]:
    """All questions of ``path``: .tsv/.csv is the DPR question-answers table; .json/.jsonl
    is a JSON list if the file starts with ``[``, else one object per line (gs:// too)."""
    path = local_copy(path)
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tsv", ".csv"):
        return _read_tsv(path)
    if ext in (".json", ".jsonl"):
        return _read_json_list(path) if _first_char(path) == "[" else _read_jsonl(path)
    raise UserError(f"{path}: unknown question file type {ext or '(none)'}; "
                    "expected .tsv, .csv, .json or .jsonl")


def _first_char(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.lstrip()[0]
    return ""


def _read_tsv(path: str) -> list[Question]:
    questions = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            # Split on the tab, not with csv: csv quoting mangles questions that contain '"'.
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2:
                raise UserError(f"{path}:{number}: expected 2 tab-separated columns "
                                f"(question, answers), found {len(fields)}")
            question, column = fields
            if not question.strip():
                raise UserError(f"{path}:{number}: empty question")
            try:
                # DPR eval()s this column; a literal parse reads the same lists and runs no code.
                answers = ast.literal_eval(column.strip())
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise UserError(f"{path}:{number}: answers column is not a list literal: "
                                f"{column[:80]!r}") from None
            questions.append(Question(question, _answers(answers, f"{path}:{number}")))
    return questions


def _read_json_list(path: str) -> list[Question]:
    items = read_json(path)
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list of questions")
    return [_from_object(item, f"{path}: item {i}") for i, item in enumerate(items)]


def _read_jsonl(path: str) -> list[Question]:
    # read_jsonl skips blank lines, so the n-th row comes from the n-th non-blank line.
    with open(path, encoding="utf-8") as f:
        numbers = [number for number, line in enumerate(f, 1) if line.strip()]
    rows = read_jsonl(path, required=("question",), nonblank=("question",))
    return [_from_object(row, f"{path}:{number}") for number, row in zip(numbers, rows)]


def _from_object(item: Any, where: str) -> Question:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object")
    question = item.get("question")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: missing or empty 'question'")
    # Training questions may come without answers.
    return Question(question, _answers(item.get("answers", []), where))


def _answers(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise UserError(f"{where}: answers must be a list of strings")
    return tuple(value)
